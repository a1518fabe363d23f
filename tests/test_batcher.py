"""The batcher on its own: merging, splitting big requests, retrying failed batches in halves.

The engine here is a numpy stand-in, so that failures can be placed on exact rows; the real
engine behind the batcher is exercised by tests/test_server.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from reference import assert_exact

from flasma_ws.batcher import Batcher, Failure, Overloaded
from flasma_ws.errors import EngineError
from flasma_ws.metrics import Metrics
from flasma_ws.settings import BatcherSettings

POISON = 666.0


class NumpyEngine:
    """Brute force in numpy; any batch containing a row starting with POISON fails."""

    max_k = 10

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        self.batches: list[int] = []

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(queries))
        if (queries[:, 0] == POISON).any():
            raise EngineError("simulated out of memory")
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = q @ self.matrix.T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(scores, rows, axis=1).astype(np.float32)


class Owner:
    alive = True


@pytest.fixture
def matrix() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)


async def run_requests(batcher: Batcher, requests: list[np.ndarray], k: int = 3, owner=None):
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in requests]
    for vectors, future in zip(requests, futures):
        batcher.submit(vectors, k, time.monotonic() + 10, future.set_result, owner)
    return await asyncio.gather(*futures)


async def test_requests_merge_into_batches_and_big_ones_split(matrix):
    engine = NumpyEngine(matrix)
    batcher = Batcher(engine, Metrics(), BatcherSettings(queue_size=1000), max_batch=16)
    batcher.start()
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 1, 40, 3, 1)]
    answers = await run_requests(batcher, requests)
    for vectors, (rows, scores) in zip(requests, answers):
        assert_exact(matrix, vectors, rows, scores, k=3)
    assert max(engine.batches) <= 16 and sum(engine.batches) == 46
    assert len(engine.batches) < 46  # merged, not one call per query
    await batcher.close()


async def test_failed_batch_is_retried_in_halves_and_only_the_bad_request_fails(matrix):
    engine = NumpyEngine(matrix)
    batcher = Batcher(engine, Metrics(), BatcherSettings(queue_size=1000), max_batch=32)
    rng = np.random.default_rng(2)
    requests = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(20)]
    requests[7][0, 0] = POISON
    batcher.start()
    answers = await run_requests(batcher, requests)
    assert isinstance(answers[7], Failure) and answers[7].code == "internal"
    for i, (vectors, answer) in enumerate(zip(requests, answers)):
        if i != 7:
            assert_exact(matrix, vectors, *answer, k=3)
    await batcher.close()


async def test_queue_limit_raises_overloaded_and_counts_rows(matrix):
    batcher = Batcher(NumpyEngine(matrix), Metrics(), BatcherSettings(queue_size=10), max_batch=8)
    batcher.submit(np.ones((6, 8), np.float32), 3, time.monotonic() + 10, lambda _: None)
    with pytest.raises(Overloaded, match="capacity"):
        batcher.submit(np.ones((5, 8), np.float32), 3, time.monotonic() + 10, lambda _: None)
    assert batcher.queued == 6
    await batcher.close()


async def test_requests_of_a_gone_owner_are_skipped(matrix):
    engine = NumpyEngine(matrix)
    batcher = Batcher(engine, Metrics(), BatcherSettings(queue_size=100), max_batch=8)
    gone = Owner()
    gone.alive = False
    batcher.submit(np.ones((4, 8), np.float32), 3, time.monotonic() + 10, lambda _: None, gone)
    batcher.start()
    ((rows, _),) = await run_requests(batcher, [np.ones((1, 8), np.float32)])
    assert engine.batches == [1]  # the gone owner's four rows never reached the engine
    await batcher.close()


async def test_max_wait_fills_batches(matrix):
    engine = NumpyEngine(matrix)
    batcher = Batcher(
        engine, Metrics(), BatcherSettings(queue_size=100, max_wait_ms=50), max_batch=64
    )
    batcher.start()
    loop = asyncio.get_running_loop()
    futures = []
    for _ in range(5):
        future = loop.create_future()
        batcher.submit(np.ones((1, 8), np.float32), 3, time.monotonic() + 10, future.set_result)
        futures.append(future)
        await asyncio.sleep(0.002)
    await asyncio.gather(*futures)
    assert engine.batches == [5]
    await batcher.close()
