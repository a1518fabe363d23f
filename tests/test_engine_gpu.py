"""float32 on a GPU is float32: TensorFloat-32 off, exact top-k at a real size.

Runs where TensorFlow sees a GPU; skips cleanly elsewhere (CI has none). Checked against a
float64 numpy brute force over the same stored rows."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from reference import brute_force

from flasma_ws.engine import Engine, EngineConfig
from flasma_ws.vectors import load_matrix, open_targets

pytestmark = pytest.mark.skipif(
    not tf.config.list_logical_devices("GPU"), reason="TensorFlow sees no GPU here"
)

N, DIM, K = 100_000, 768, 100


@pytest.fixture(scope="module")
def gpu_case() -> tuple[Engine, np.ndarray]:
    targets = open_targets(None, DIM, demo_size=N, demo_seed=3)
    engine = Engine(targets, EngineConfig(device="gpu", max_batch=128, max_k=K, top_k=K))
    return engine, load_matrix(targets)


def test_float32_matmuls_are_not_tf32(gpu_case: tuple[Engine, np.ndarray]) -> None:
    engine, _ = gpu_case
    assert "GPU" in engine.device
    assert engine.tf32 is False and engine.describe()["tf32"] is False


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 17, 64, 128])
def test_recall_one_and_float64_scores(gpu_case: tuple[Engine, np.ndarray], batch: int) -> None:
    engine, matrix = gpu_case
    queries = np.random.default_rng(batch).standard_normal((batch, DIM), dtype=np.float32)
    rows, scores = engine.search(queries, K)
    ref_rows, ref_scores = brute_force(matrix, queries, K)
    recall = np.mean([len(set(r) & set(e)) / K for r, e in zip(rows.tolist(), ref_rows.tolist())])
    assert recall == 1.0
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)


def test_answers_do_not_depend_on_the_other_rows(gpu_case: tuple[Engine, np.ndarray]) -> None:
    engine, _ = gpu_case
    rng = np.random.default_rng(7)
    probe = rng.standard_normal((1, DIM), dtype=np.float32)
    alone_rows, alone_scores = engine.search(probe, K)
    for at, size in ((0, 128), (40, 64), (16, 17)):
        others = rng.standard_normal((size - 1, DIM), dtype=np.float32)
        rows, scores = engine.search(np.insert(others, at, probe, axis=0), K)
        np.testing.assert_array_equal(rows[at], alone_rows[0])
        np.testing.assert_allclose(scores[at], alone_scores[0], rtol=0, atol=1e-6)
