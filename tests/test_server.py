"""The streaming server end to end: a real server on a loopback port, real WebSocket and HTTP
clients, real TensorFlow. Every answer is checked against a float64 brute force."""

from __future__ import annotations

import asyncio
import logging
import struct

import httpx
import numpy as np
import orjson
import pytest
import websockets
from reference import assert_exact, pairs_to_arrays

from flasma_ws.protocol import BINARY_HEADER, Codec, encode_binary_query
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings

DIM, N = 32, 3000


SETTINGS = Settings(dim=DIM, demo_size=N, port=0, max_batch=64)  # `server`, `matrix`: conftest.py


def queries(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


async def ask(ws, request: dict) -> dict:
    await ws.send(orjson.dumps(request).decode())
    return orjson.loads(await ws.recv())


async def test_json_query_is_exact_and_echoes_integer_and_string_ids(server, matrix):
    q = queries(2)
    async with websockets.connect(server.url) as ws:
        by_int = await ask(ws, {"id": 7, "embedding": q[0].tolist(), "k": 5})
        by_str = await ask(ws, {"id": "seven", "embedding": q[1].tolist()})
    assert by_int["id"] == 7 and type(by_int["id"]) is int
    assert by_str["id"] == "seven"
    assert_exact(matrix, q[:1], *pairs_to_arrays(by_int["result"]), k=5)
    assert_exact(matrix, q[1:], *pairs_to_arrays(by_str["result"]), k=10)  # server default k


async def test_multi_query_frame_is_exact(server, matrix):
    q = queries(150, seed=2)  # more rows than max_batch: split across batches
    async with websockets.connect(server.url) as ws:
        answer = await ask(ws, {"id": "m", "embeddings": q.tolist(), "k": 3})
    assert answer["id"] == "m" and len(answer["results"]) == 150
    rows = np.array([[p[0] for p in r] for r in answer["results"]])
    scores = np.array([[p[1] for p in r] for r in answer["results"]])
    assert_exact(matrix, q, rows, scores, k=3)


async def test_binary_frames_are_exact(server, matrix):
    q = queries(3, seed=3)
    async with websockets.connect(server.url) as ws:
        await ws.send(encode_binary_query(2**40 + 5, q, k=4))
        await ws.send(encode_binary_query(9, q[0], k=0))  # k 0: the server's default
        answers = {}
        for _ in range(2):
            request_id, rows, scores = Codec.decode_binary_result(await ws.recv())
            answers[request_id] = (rows, scores)
    assert_exact(matrix, q, *answers[2**40 + 5], k=4)
    assert_exact(matrix, q[:1], *answers[9], k=10)


async def test_pipelined_requests_each_get_one_answer(server, matrix):
    q = queries(300, seed=4)
    async with websockets.connect(server.url) as ws:
        for i, vector in enumerate(q):
            await ws.send(orjson.dumps({"id": i, "embedding": vector.tolist(), "k": 2}).decode())
        answers = [orjson.loads(await ws.recv()) for _ in q]
    ids = [a["id"] for a in answers]
    assert sorted(ids) == list(range(300))
    rows = np.array([[p[0] for p in a["result"]] for a in sorted(answers, key=lambda a: a["id"])])
    scores = np.array([[p[1] for p in a["result"]] for a in sorted(answers, key=lambda a: a["id"])])
    assert_exact(matrix, q, rows, scores, k=2)


def batch_stats(server) -> tuple[float, float]:
    text = httpx.get(f"{server.http_url}/metrics").text
    values = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("flasma_batch")
    )
    return float(values["flasma_batch_size_count"]), float(values["flasma_batch_size_sum"])


async def test_concurrent_connections_are_exact_and_batched_together(server, matrix):
    before = batch_stats(server)
    q = queries(24 * 40, seed=5).reshape(24, 40, DIM)

    async def one_client(c: int) -> list[dict]:
        async with websockets.connect(server.url) as ws:
            for i in range(40):
                await ws.send(orjson.dumps({"id": i, "embedding": q[c, i].tolist()}).decode())
            return [orjson.loads(await ws.recv()) for _ in range(40)]

    results = await asyncio.gather(*(one_client(c) for c in range(24)))
    for c, answers in enumerate(results):
        answers.sort(key=lambda a: a["id"])
        assert [a["id"] for a in answers] == list(range(40))
        rows = np.array([[p[0] for p in a["result"]] for a in answers])
        scores = np.array([[p[1] for p in a["result"]] for a in answers])
        assert_exact(matrix, q[c], rows, scores, k=10)
    after = batch_stats(server)
    batches, rows_computed = after[0] - before[0], after[1] - before[1]
    assert rows_computed == 24 * 40
    assert rows_computed / batches > 1, "the global batcher never merged queries"


BAD_FRAMES = [
    ("not json", "bad_json", None),
    ("[1, 2]", "bad_request", None),
    ('{"embedding": [1]}', "bad_request", None),
    ('{"id": 1.5, "embedding": [1]}', "bad_request", None),
    ('{"id": 3, "embedding": [1, 2]}', "bad_dimension", 3),
    ('{"id": "nan", "embedding": [NaN' + ", 1" * (DIM - 1) + "]}", "bad_value", "nan"),
    ('{"id": 4, "embedding": [1e39' + ", 1" * (DIM - 1) + "]}", "bad_value", 4),
    ('{"id": 5, "embedding": [0' + ", 0" * (DIM - 1) + "]}", "bad_value", 5),
    ('{"id": 6, "embedding": [1' + ", 1" * (DIM - 1) + '], "k": 0}', "bad_k", 6),
    ('{"id": 7, "embedding": [1' + ", 1" * (DIM - 1) + '], "k": 101}', "bad_k", 7),
    ('{"id": 8, "embedding": [1' + ", 1" * (DIM - 1) + '], "k": "3"}', "bad_k", 8),
    ('{"id": 9, "embedding": [1' + ", 1" * (DIM - 1) + '], "topk": 3}', "bad_request", 9),
    ('{"id": 10, "embeddings": []}', "bad_request", 10),
    ('{"id": 11, "embedding": ["a"' + ", 1" * (DIM - 1) + "]}", "bad_request", 11),
]


@pytest.mark.parametrize(("frame", "code", "request_id"), BAD_FRAMES)
async def test_bad_frames_get_their_code_and_the_connection_keeps_answering(
    server, matrix, frame, code, request_id
):
    q = queries(1, seed=6)
    async with websockets.connect(server.url) as ws:
        await ws.send(frame)
        error = orjson.loads(await ws.recv())
        assert error["id"] == request_id
        assert error["error"]["code"] == code
        assert "Traceback" not in error["error"]["message"] and error["error"]["message"]
        answer = await ask(ws, {"id": "after", "embedding": q[0].tolist()})
    assert_exact(matrix, q, *pairs_to_arrays(answer["result"]), k=10)


async def test_bad_binary_frames_get_their_code(server):
    async with websockets.connect(server.url) as ws:
        await ws.send(b"\x01\x02")
        assert orjson.loads(await ws.recv())["error"]["code"] == "bad_request"
        await ws.send(encode_binary_query(5, np.ones((1, DIM - 1), np.float32)))
        error = orjson.loads(await ws.recv())
        assert (error["id"], error["error"]["code"]) == (5, "bad_dimension")
        nan = np.full((1, DIM), np.nan, np.float32)
        await ws.send(encode_binary_query(6, nan))
        assert orjson.loads(await ws.recv())["error"]["code"] == "bad_value"


def test_cos_route_answers_like_flasma(server, matrix):
    q = queries(1, seed=7)[0]
    response = httpx.post(f"{server.http_url}/cos", json={"embedding": q.tolist()})
    assert response.status_code == 200
    assert_exact(matrix, q[None], *pairs_to_arrays(response.json()["result"]), k=10)
    with_k = httpx.post(f"{server.http_url}/cos", json={"embedding": q.tolist(), "k": 3}).json()
    assert len(with_k["result"]) == 3


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "bad_json"),
        (b'{"embedding": [1, 2]}', 400, "bad_dimension"),  # never padded with 1.0 like Flasma
        (orjson.dumps({"embedding": [1.0] * (DIM + 1)}), 400, "bad_dimension"),  # nor truncated
        (orjson.dumps({"embedding": [0.0] * DIM}), 400, "bad_value"),
        (orjson.dumps({"embedding": [1.0] * DIM, "k": -1}), 400, "bad_k"),
        (b'{"nothing": 1}', 400, "bad_request"),
    ],
)
def test_bad_cos_bodies_get_4xx_json(server, body, status, code):
    response = httpx.post(f"{server.http_url}/cos", content=body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_health_info_metrics_and_unknown_routes(server):
    assert httpx.get(f"{server.http_url}/healthz").json() == {"status": "ready"}
    info = httpx.get(f"{server.http_url}/info").json()
    assert (info["n"], info["dim"], info["source"]) == (N, DIM, "demo")
    assert info["demo"] == {"size": N, "seed": 0, "dim": DIM}
    from flasma_ws.machine import cpu_model
    from flasma_ws.tf_runtime import onednn_state

    assert info["cpu"]["model"] == cpu_model() and info["cpu"]["cores"] >= 1
    assert info["onednn"] == onednn_state().describe()  # what TensorFlow reports, and who chose
    assert info["tf32"] is False and info["blas_max_batch"] == 1
    assert "flasma_queue_depth" in httpx.get(f"{server.http_url}/metrics").text
    assert httpx.get(f"{server.http_url}/nope").status_code == 404
    assert httpx.get(f"{server.http_url}/cos").status_code == 405


async def test_client_aborting_with_requests_in_flight_leaves_server_healthy(server, matrix):
    q = queries(1, seed=8)
    ws = await websockets.connect(server.url)
    for i in range(500):
        await ws.send(orjson.dumps({"id": i, "embedding": q[0].tolist()}).decode())
    ws.transport.abort()  # no close handshake, answers unread
    await asyncio.sleep(0.3)
    assert httpx.get(f"{server.http_url}/healthz").status_code == 200
    async with websockets.connect(server.url) as other:
        answer = await ask(other, {"id": 1, "embedding": q[0].tolist()})
    assert_exact(matrix, q, *pairs_to_arrays(answer["result"]), k=10)


# -- overload and deadlines: a server with a tiny queue and a slow-ish matrix ----------------


@pytest.fixture(scope="module")
def small_queue_server():
    settings = Settings(dim=64, demo_size=40_000, port=0, queue_size=200, max_batch=32)
    with BackgroundServer(settings) as running:
        yield running


async def test_full_queue_answers_overloaded_at_once_and_nothing_is_lost(small_queue_server):
    vector = np.ones(64, np.float32).tolist()
    async with websockets.connect(small_queue_server.url) as ws:
        too_big = np.ones((201, 64), np.float32).tolist()  # more rows than the whole queue
        refused = await ask(ws, {"id": "big", "embeddings": too_big})
        assert refused["error"]["code"] == "overloaded"
        for i in range(1000):
            await ws.send(orjson.dumps({"id": i, "embedding": vector}).decode())
        answers = [orjson.loads(await ws.recv()) for _ in range(1000)]
    assert sorted(a["id"] for a in answers) == list(range(1000))  # exactly one answer each
    codes = [a["error"]["code"] for a in answers if "error" in a]
    assert codes and set(codes) == {"overloaded"}
    assert sum("result" in a for a in answers) >= 200


async def test_expired_deadline_is_answered_timeout_and_not_computed(small_queue_server):
    def computed() -> float:
        text = httpx.get(f"{small_queue_server.http_url}/metrics").text
        return next(
            float(x.split()[1]) for x in text.splitlines() if x.startswith("flasma_batch_size_sum")
        )

    before = computed()
    busy = np.random.default_rng(9).standard_normal((150, 64)).tolist()
    async with websockets.connect(small_queue_server.url) as ws:
        await ws.send(orjson.dumps({"id": "busy", "embeddings": busy}).decode())
        late = {"id": "late", "embedding": busy[0], "timeout_ms": 1}
        await ws.send(orjson.dumps(late).decode())
        answers = {a["id"]: a for a in [orjson.loads(await ws.recv()) for _ in range(2)]}
    assert answers["late"]["error"]["code"] == "timeout"
    assert len(answers["busy"]["results"]) == 150
    assert computed() - before == 150  # the late query never reached the engine


def test_healthz_is_503_while_draining():
    with BackgroundServer(Settings(dim=8, demo_size=100, port=0, drain_timeout_s=2)) as running:
        assert httpx.get(f"{running.http_url}/healthz").status_code == 200
        running.service.state = type(running.service.state).DRAINING
        response = httpx.get(f"{running.http_url}/healthz")
        assert (response.status_code, response.json()) == (503, {"status": "draining"})


def test_binary_header_layout_is_documented_size():
    assert BINARY_HEADER.size == 16
    assert struct.calcsize("<QHHI") == 16


def test_ready_log_names_the_bound_port_when_started_on_port_0(caplog):
    caplog.set_level(logging.INFO, logger="flasma_ws")
    with BackgroundServer(Settings(dim=8, demo_size=100, port=0)) as running:
        port = running.server.port
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ready on")]
    assert port != 0
    assert len(ready) == 1 and ready[0].startswith(f"Ready on 127.0.0.1:{port}:"), ready
