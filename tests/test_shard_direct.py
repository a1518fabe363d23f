"""The direct lane to a shard (flasma_ws/shard_direct.py) on real loopback sockets: answers
as the shard's search gives them, several in flight, a wrong key refused, a broken lane
failing its requests with LaneBroken (the front end then retries through Ray)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import struct
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection

import numpy as np
import pytest
from reference import stable_top_k

from flasma_ws import shard_direct
from flasma_ws.shard_direct import Lane, LaneBroken, LaneServer, connect

DIM, N, KEY = 8, 300, b"k" * 32
ROWS = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)


def brute_force(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A shard's search: float64 scores, the lower row first among equal ones."""
    if k > N:
        raise ValueError(f"k={k} is more than the {N} rows")
    scores = queries.astype(np.float64) @ ROWS.T.astype(np.float64)
    rows = stable_top_k(scores, k)
    return rows + 1000, np.take_along_axis(scores, rows, 1).astype(np.float32), 0.001


@pytest.fixture
def server() -> LaneServer:
    lane_server = LaneServer("127.0.0.1", KEY, DIM, brute_force)
    yield lane_server
    lane_server.close()


def test_answers_come_back_by_id_with_several_in_flight(server: LaneServer) -> None:
    lane = connect({"lane": server.address, "incarnation": "a", "shard": 0}, KEY)
    assert lane is not None and lane.incarnation == "a"
    batches = [np.random.default_rng(s).standard_normal((b, DIM)).astype(np.float32)
               for s, b in enumerate([1, 5, 128, 3])]  # fmt: skip
    futures = [lane.submit(q, 7) for q in batches]  # all sent before any is read
    for q, future in zip(batches, futures, strict=True):
        answer = future.result(timeout=10)
        rows, scores, _ = brute_force(q, 7)
        assert np.array_equal(answer.rows, rows) and np.array_equal(answer.scores, scores)
        assert answer.rows.dtype == np.int64 and answer.seconds == 0.001
    # Each frame is sent at once: with Nagle's algorithm on, a 51 KB batch waited 40 ms.
    with socket.fromfd(lane._conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as ours:
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    lane.close()


def test_an_error_of_the_shards_search_comes_back_as_its_message(server: LaneServer) -> None:
    lane = Lane(server.address, KEY, "a")
    with pytest.raises(RuntimeError, match="more than the 300 rows"):
        lane.submit(np.ones((1, DIM), np.float32), N + 1).result(timeout=10)
    assert not lane.broken  # the lane itself is fine: the next request is answered
    assert lane.submit(np.ones((1, DIM), np.float32), 3).result(timeout=10).rows.shape == (1, 3)
    lane.close()


def test_a_client_without_the_key_is_refused(server: LaneServer) -> None:
    with pytest.raises(AuthenticationError):
        Lane(server.address, b"x" * 32, "a")
    assert connect({"lane": None, "incarnation": "a"}, KEY) is None  # a shard without a lane
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nobody listens on: refused, so None (Ray's way)
    info = {"lane": closed.getsockname(), "incarnation": "a", "shard": 1}
    assert connect(info, KEY) is None
    closed.listen()  # now a port that takes the connection and never sends the challenge
    started = time.monotonic()
    assert connect(info, KEY) is None
    assert time.monotonic() - started < 4 * shard_direct.CONNECT_TIMEOUT_S
    closed.close()


def test_a_client_that_leaves_before_the_handshake_does_not_stop_the_listener(
    server: LaneServer,
) -> None:
    """A reset in the middle of a handshake once ended the accept loop, and every later
    lane to the restarted shard hung."""
    for _ in range(5):
        quitter = socket.create_connection(server.address)
        quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        quitter.close()  # a reset, not a FIN
    lane = Lane(server.address, KEY, "b")
    assert lane.submit(np.ones((1, DIM), np.float32), 2).result(timeout=10).rows.shape == (1, 2)
    lane.close()


def _slow_shard(address_out: Connection) -> None:
    """A shard process whose search takes 0.5 s (run under spawn: a fresh interpreter)."""

    def slow(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        time.sleep(0.5)
        return brute_force(queries, k)

    address_out.send(LaneServer("127.0.0.1", KEY, DIM, slow).address)
    time.sleep(60)


def test_a_lane_whose_shard_is_killed_fails_its_requests_with_lane_broken() -> None:
    context = multiprocessing.get_context("spawn")
    theirs, ours = context.Pipe()
    shard = context.Process(target=_slow_shard, args=(theirs,), daemon=True)
    shard.start()
    try:
        lane = Lane(ours.recv(), KEY, "a")
        pending = lane.submit(np.ones((1, DIM), np.float32), 3)
        time.sleep(0.1)  # the shard is searching
        os.kill(shard.pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(LaneBroken):
            pending.result(timeout=10)
        assert lane.broken
        with pytest.raises(LaneBroken):
            lane.submit(np.ones((1, DIM), np.float32), 3)
    finally:
        shard.kill()
        shard.join(10)
