"""The fair batcher against a real server: a light client is served behind its own queries, not
behind a heavy client's backlog, and a full queue refuses the heavy client, not the light one.

Ordering, not timing: under first-in, first-out the light client's answer would come after
every heavy frame; under fairness it comes in the next batch. The engine is made slow enough
(300k rows, batches of 32) that the heavy backlog is still queued when the light query comes."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import websockets
from reference import assert_exact, pairs_to_arrays

from flasma_ws.metrics import read_samples
from flasma_ws.settings import Settings

DIM, N = 64, 300_000
SETTINGS = Settings(  # `server`, `matrix`: conftest.py
    dim=DIM, demo_size=N, port=0, max_batch=32, queue_size=256, max_inflight=4096
)


def queries(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


async def send_frames(ws, frames: list[np.ndarray]) -> None:
    for i, frame in enumerate(frames):
        await ws.send(orjson.dumps({"id": i, "embeddings": frame.tolist(), "k": 5}).decode())


async def queued_at_least(server, rows: int) -> None:
    """Wait (bounded) until the server's queue holds `rows` rows: the backlog is in place."""
    for _ in range(2000):
        if server.service.batcher.queued >= rows:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the queue never held {rows} rows")


async def answers(ws, count: int, into: list[dict]) -> None:
    for _ in range(count):
        into.append(orjson.loads(await ws.recv()))


async def heavy_then_light(server, heavy_frames, light, backlog_rows):
    """The heavy client's frames, then (once `backlog_rows` are queued) the light query on a
    second connection: (the light answer, the heavy answers, heavy answers seen before it)."""
    heavy_answers: list[dict] = []
    async with websockets.connect(server.url) as heavy, websockets.connect(server.url) as lone:
        await send_frames(heavy, heavy_frames)
        reading = asyncio.ensure_future(answers(heavy, len(heavy_frames), heavy_answers))
        await queued_at_least(server, backlog_rows)
        request = {"id": "light", "embedding": light[0].tolist(), "k": 5}
        await lone.send(orjson.dumps(request).decode())
        answer = orjson.loads(await lone.recv())
        answered_before = len(heavy_answers)
        await reading
    return answer, heavy_answers, answered_before


async def test_a_light_client_is_answered_before_a_heavy_backlog(server, matrix):
    heavy_frames = [queries(64, seed=s) for s in range(3)]  # 192 rows: 6 batches of 32
    light = queries(1, seed=99)
    answer, heavy_answers, answered_before = await heavy_then_light(
        server, heavy_frames, light, 150
    )
    assert answer["id"] == "light"
    assert_exact(matrix, light, *pairs_to_arrays(answer["result"]), k=5)
    assert answered_before <= 1  # first-in, first-out would have answered all 3 first
    samples = read_samples(httpx.get(f"{server.http_url}/metrics").text)
    assert samples["flasma_queue_wait_seconds_count"] >= 4  # 3 heavy frames and the light one
    assert samples["flasma_active_flows"] == 0  # all answered: no flow waits
    for got in heavy_answers:  # the heavy client still gets every answer, exact
        frame = heavy_frames[got["id"]]
        rows = np.array([[p[0] for p in r] for r in got["results"]])
        scores = np.array([[p[1] for p in r] for r in got["results"]])
        assert_exact(matrix, frame, rows, scores, k=5)


async def test_a_full_queue_refuses_the_heavy_client_not_a_light_one(server, matrix):
    heavy_frames = [queries(32, seed=10 + s) for s in range(12)]  # 384 rows for 256 places
    light = queries(1, seed=7)
    answer, heavy_answers, _ = await heavy_then_light(server, heavy_frames, light, 200)
    assert "error" not in answer, answer  # within its share: never refused for another's backlog
    assert_exact(matrix, light, *pairs_to_arrays(answer["result"]), k=5)
    codes = [got["error"]["code"] for got in heavy_answers if "error" in got]
    assert codes and set(codes) == {"overloaded"}  # the heavy client pays for its backlog
    assert len(heavy_answers) == 12 and {got["id"] for got in heavy_answers} == set(range(12))


def test_what_loading_made_is_frozen_out_of_the_collector(server):
    """TensorFlow's ~330k objects would make each full collection a ~235 ms pause of every
    client (the light client's p99 beside a heavy one); frozen once the server is ready."""
    import gc

    assert server.service.batcher is not None  # ready
    assert gc.get_freeze_count() > 100_000
