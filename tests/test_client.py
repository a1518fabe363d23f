"""The Python client against a real server on loopback (BackgroundServer), no mocks."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import reference
from websockets.asyncio.server import ServerConnection, serve
from websockets.sync.server import ServerConnection as SyncServerConnection
from websockets.sync.server import serve as sync_serve

from flasma_ws.client import Client, ConnectionLost, SyncClient, TopK, server_info
from flasma_ws.errors import FlasmaError, ServerError
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings

SETTINGS = Settings(dim=16, demo_size=2000, demo_seed=3, port=0)


def random_queries(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, SETTINGS.dim), dtype=np.float32)


def assert_exact(
    matrix: np.ndarray, query: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int
) -> None:
    """The client's shapes and dtypes, then the float64 reference's rows and scores."""
    assert ids.shape == scores.shape == (k,)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    reference.assert_exact(matrix, query, ids, scores, k)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_100_concurrent_tasks_on_one_connection_get_exact_answers(
    server: BackgroundServer, matrix: np.ndarray, binary: bool
) -> None:
    queries = random_queries(100, seed=1)
    async with Client(server.url, binary=binary) as client:
        answers = await asyncio.gather(*(client.query(q, k=10) for q in queries))
        assert client.in_flight == 0
    for query, answer in zip(queries, answers):
        assert_exact(matrix, query, answer.ids, answer.scores, 10)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_query_many_is_exact_and_splits_large_matrices(
    server: BackgroundServer, matrix: np.ndarray, binary: bool
) -> None:
    queries = random_queries(20, seed=2)
    async with Client(server.url, binary=binary, frame_queries=7) as client:  # 3 frames
        answer = await client.query_many(queries, k=5)
        one_row = await client.query_many(queries[:1], k=3)
    assert answer.ids.shape == answer.scores.shape == (20, 5)
    for b, query in enumerate(queries):
        assert_exact(matrix, query, answer.ids[b], answer.scores[b], 5)
    assert one_row.ids.shape == (1, 3)  # a one-row multi query keeps its 2-D shape
    assert_exact(matrix, queries[0], one_row.ids[0], one_row.scores[0], 3)


async def test_default_k_and_pairs(server: BackgroundServer) -> None:
    async with Client(server.url) as client:
        answer = await client.query([1.0] * SETTINGS.dim)
    assert answer.ids.shape == (SETTINGS.top_k,)
    pairs = answer.pairs()
    assert pairs[0] == (int(answer.ids[0]), float(answer.scores[0]))
    many = TopK(answer.ids[None, :], answer.scores[None, :]).pairs()
    assert many == [pairs]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_server_errors_carry_the_code_and_the_connection_survives(
    server: BackgroundServer, binary: bool
) -> None:
    query = random_queries(1, seed=4)[0]
    async with Client(server.url, binary=binary) as client:
        with pytest.raises(ServerError) as bad_k:
            await client.query(query, k=SETTINGS.max_k + 1)
        with pytest.raises(ServerError) as bad_dimension:
            await client.query(np.ones(SETTINGS.dim + 1, np.float32))
        with pytest.raises(ServerError) as zero:
            await client.query(np.zeros(SETTINGS.dim, np.float32))
        assert (await client.query(query, k=2)).ids.shape == (2,)
    assert bad_k.value.code == "bad_k"
    assert bad_dimension.value.code == "bad_dimension"
    assert zero.value.code == "bad_value"
    assert isinstance(bad_k.value, FlasmaError)
    assert bad_k.value.request_id is not None


async def test_client_checks_shapes_and_binary_k_locally(server: BackgroundServer) -> None:
    async with Client(server.url, binary=True) as client:
        with pytest.raises(ValueError, match="shape"):
            await client.query(np.ones((2, SETTINGS.dim), np.float32))
        with pytest.raises(ValueError, match="k must be"):
            await client.query(np.ones(SETTINGS.dim, np.float32), k=0)  # 0 = default on the wire
        with pytest.raises(ValueError, match="matrix"):
            await client.query_many(np.ones(SETTINGS.dim, np.float32))


async def test_reconnects_after_a_server_restart() -> None:
    first = BackgroundServer(SETTINGS).start()
    port = first.server.port
    client = Client(first.url, connect_attempts=2, backoff_s=0.05)
    try:
        assert (await client.query(np.ones(SETTINGS.dim), k=1)).ids.shape == (1,)
        first.stop()
        with pytest.raises(ConnectionLost):  # down: bounded attempts, then a clear error
            await client.query(np.ones(SETTINGS.dim), k=1)
        with BackgroundServer(SETTINGS.replace(port=port)):
            answer = await client.query(np.ones(SETTINGS.dim), k=1)
            assert answer.ids.shape == (1,)
            assert client.connected
    finally:
        await client.close()
        first.stop()


async def test_a_dropped_connection_fails_pending_requests_with_connection_lost() -> None:
    """A server that reads one request and drops the connection without answering."""

    async def drop(connection: ServerConnection) -> None:
        await connection.recv()
        await connection.close(1011, "gone")

    async with serve(drop, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/ws", connect_attempts=1) as client:
            with pytest.raises(ConnectionLost, match="1011") as lost:
                await client.query(np.ones(4), k=1)
            assert client.in_flight == 0
    assert isinstance(lost.value, ConnectionError) and isinstance(lost.value, FlasmaError)


async def test_unreachable_server_raises_connection_lost_after_bounded_attempts() -> None:
    client = Client("ws://127.0.0.1:1/ws", connect_attempts=3, backoff_s=0.01)
    with pytest.raises(ConnectionLost, match="after 3 attempts"):
        await client.query(np.ones(4))
    await client.close()


def test_sync_client(server: BackgroundServer, matrix: np.ndarray) -> None:
    queries = random_queries(3, seed=5)
    with SyncClient(server.url, binary=True) as client:
        ids, scores = client.query(queries[0], k=4)
        many = client.query_many(queries, k=4)
        with pytest.raises(ServerError) as error:
            client.query(queries[0], k=SETTINGS.max_k + 1)
    assert_exact(matrix, queries[0], ids, scores, 4)
    for b, query in enumerate(queries):
        assert_exact(matrix, query, many.ids[b], many.scores[b], 4)
    assert error.value.code == "bad_k"


async def test_token_is_sent_and_a_refusal_is_not_retried() -> None:
    with BackgroundServer(SETTINGS.replace(token="s3cret")) as guarded:
        async with Client(guarded.url, token="s3cret") as client:
            assert (await client.query(np.ones(SETTINGS.dim), k=1)).ids.shape == (1,)
        client = Client(guarded.url, connect_attempts=50, backoff_s=1.0)  # 401: no retries
        with pytest.raises(ConnectionLost, match="HTTP 401"):
            await asyncio.wait_for(client.connect(), timeout=5)
        await client.close()


def test_server_info(server: BackgroundServer) -> None:
    info = server_info(server.url)
    assert (info["dim"], info["n"]) == (SETTINGS.dim, SETTINGS.demo_size)
    with pytest.raises(ConnectionLost):
        server_info("ws://127.0.0.1:1/ws", timeout_s=1)


def test_sync_client_timeout_cancels_the_request_it_abandons() -> None:
    """A server that reads requests and never answers: the timeout raises, and the request
    left behind on the client's loop is cancelled rather than awaited forever."""

    def silent(connection: SyncServerConnection) -> None:
        for _ in connection:
            pass

    with sync_serve(silent, "127.0.0.1", 0) as listener:
        thread = threading.Thread(target=listener.serve_forever, daemon=True)
        thread.start()
        url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/ws"
        with SyncClient(url, timeout_s=0.3, connect_attempts=1) as client:
            with pytest.raises(TimeoutError):
                client.query(np.ones(4), k=1)
            deadline = time.monotonic() + 5
            while client.client.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.client.in_flight == 0
        listener.shutdown()
        thread.join(5)
