"""The TensorFlow engine against a float64 numpy brute force (real TensorFlow, on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from reference import SCORE_TOLERANCE as SCORE_TOL
from reference import assert_exact_scores, reference_scores, stable_top_k

import flasma_ws.engine as engine_module
from flasma_ws.engine import Engine, EngineConfig, choose_block_size, warmup_batches
from flasma_ws.errors import ConfigError, EngineError
from flasma_ws.vectors import Targets, load_matrix, open_targets

# Reduced precision: rounding unit-norm q and m to p significant bits moves q.m by at most
# about 2 * 2**-p (products accumulate in float32 on CPU), so a returned score is within this
# of its true score and the answer is the exact top-k up to swaps among candidates this close.
# float16 keeps p=11 bits, bfloat16 p=8; measured errors are about 5x below these bounds.
LOW_PRECISION_TOL = {"float16": 1e-3, "bfloat16": 8e-3}
MIN_RECALL = {"float16": 0.97, "bfloat16": 0.9}  # recall@10, random data, d=64, N=3000


def cpu_engine(targets: Targets, **config: object) -> Engine:
    config.setdefault("device", "cpu")
    return Engine(targets, EngineConfig(**config))  # type: ignore[arg-type]


def npy_targets(tmp_path: Path, array: np.ndarray, drop_zero: bool = False) -> Targets:
    path = tmp_path / "targets.npy"
    np.save(path, array)
    return open_targets(path, None, drop_zero=drop_zero)


def assert_exact(ref: np.ndarray, rows: np.ndarray, scores: np.ndarray, k: int) -> None:
    """The engine's dtypes and shape, then the reference's rows and scores (tests/reference.py)."""
    assert rows.shape == scores.shape == (ref.shape[0], min(k, ref.shape[1]))
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    assert_exact_scores(ref, rows, scores, k)


def random_case(n: int, dim: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, dim), dtype=np.float32),
        rng.standard_normal((batch, dim), dtype=np.float32),
    )


# -- exactness ---------------------------------------------------------------------------------
SHAPES = [  # n, dim, batch, k, block_size (None = the engine's choice)
    (1000, 16, 3, 10, None),
    (1000, 16, 3, 10, 64),  # 15 blocks + a 40-row tail
    (777, 33, 5, 7, 50),  # N not a multiple of the block
    (40, 8, 2, 5, 64),  # N smaller than one block: everything is tail
    (257, 5, 4, 257, 16),  # k = N
    (300, 1, 3, 10, 16),  # dim = 1: every score is +1 or -1, all tied
    (2000, 64, 1, 1, None),  # B = 1, k = 1
    (1500, 128, 8, 10, None),  # B = max_batch
    (1500, 128, 21, 10, None),  # B > max_batch: split into pieces
    (613, 300, 6, 50, 32),
]


@pytest.mark.parametrize(("n", "dim", "batch", "k", "block"), SHAPES)
def test_matches_float64_reference(n: int, dim: int, batch: int, k: int, block: int | None) -> None:
    queries = np.random.default_rng(n * 31 + dim).standard_normal((batch, dim), dtype=np.float32)
    targets = open_targets(None, dim, demo_size=n, demo_seed=n + dim)
    engine = cpu_engine(targets, max_batch=8, max_k=max(k, 10), block_size=block)
    rows, scores = engine.search(queries, k)
    assert_exact(reference_scores(load_matrix(targets), queries), rows, scores, k)


def test_npy_file_matches_reference(tmp_path: Path) -> None:
    matrix, queries = random_case(1234, 24, 16, seed=7)
    targets = npy_targets(tmp_path, matrix * 3.5)  # unnormalized on disk
    engine = cpu_engine(targets, max_batch=16, block_size=40)
    rows, scores = engine.search(queries, 10)
    assert_exact(reference_scores(load_matrix(targets), queries), rows, scores, 10)


def test_query_scale_does_not_matter() -> None:
    targets = open_targets(None, 16, demo_size=500)
    engine = cpu_engine(targets, max_batch=4)
    queries = np.random.default_rng(3).standard_normal((4, 16), dtype=np.float32)
    queries[1] *= 1e30  # would overflow float32 squares without the engine's pre-scaling
    queries[2] *= 1e-30
    rows, scores = engine.search(queries, 10)
    assert_exact(reference_scores(load_matrix(targets), queries), rows, scores, 10)


# -- ties --------------------------------------------------------------------------------------
def one_hot_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows that are positive multiples of unit vectors: normalized, each score is exactly a
    query component, so many scores are exactly equal, across blocks and the tail."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((n, dim), np.float32)
    matrix[np.arange(n), rng.integers(0, dim, n)] = rng.uniform(0.5, 4.0, n).astype(np.float32)
    return matrix


def tie_queries(dim: int, batch: int, seed: int) -> np.ndarray:
    """Distinct integer components (so float32 and float64 rank them alike), some zero."""
    rng = np.random.default_rng(seed)
    queries = np.stack([rng.permutation(dim) - dim // 3 for _ in range(batch)])
    return queries.astype(np.float32)


@pytest.mark.parametrize(("n", "block", "k"), [(203, 8, 50), (203, 16, 203), (64, 64, 20)])
def test_ties_follow_stable_order(tmp_path: Path, n: int, block: int, k: int) -> None:
    dim = 6
    targets = npy_targets(tmp_path, one_hot_rows(n, dim, seed=n + block))
    engine = cpu_engine(targets, max_batch=8, max_k=n, block_size=block)
    queries = tie_queries(dim, 5, seed=block)
    rows, scores = engine.search(queries, k)
    ref = reference_scores(load_matrix(targets), queries)
    np.testing.assert_array_equal(rows, stable_top_k(ref, k))
    np.testing.assert_allclose(scores, np.take_along_axis(ref, rows, 1), rtol=0, atol=SCORE_TOL)


@pytest.mark.parametrize(("n", "block", "k"), [(203, 8, 50), (203, 16, 203), (64, 64, 20)])
def test_ties_alone_as_in_a_batch(tmp_path: Path, n: int, block: int, k: int) -> None:
    """One query alone takes the BLAS path, several the TensorFlow path: the same tie order."""
    dim = 6
    targets = npy_targets(tmp_path, one_hot_rows(n, dim, seed=n + block))
    engine = cpu_engine(targets, max_batch=8, max_k=n, block_size=block)
    queries = tie_queries(dim, 5, seed=block + 1)
    batched_rows, batched_scores = engine.search(queries, k)
    ref = reference_scores(load_matrix(targets), queries)
    for b in range(len(queries)):
        rows, scores = engine.search(queries[b : b + 1], k)
        np.testing.assert_array_equal(rows[0], batched_rows[b])
        np.testing.assert_array_equal(rows[0], stable_top_k(ref, k)[b])
        np.testing.assert_allclose(scores[0], batched_scores[b], rtol=0, atol=SCORE_TOL)


def test_identical_rows_come_back_lowest_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    row = rng.standard_normal(12, dtype=np.float32)
    targets = npy_targets(tmp_path, np.tile(row, (150, 1)))
    engine = cpu_engine(targets, max_batch=2, block_size=16)
    rows, scores = engine.search(rng.standard_normal((2, 12), dtype=np.float32), 25)
    np.testing.assert_array_equal(rows, np.tile(np.arange(25), (2, 1)))
    assert (scores == scores[:, :1]).all()


# -- batching ----------------------------------------------------------------------------------
def dot_product_bound(dim: int) -> float:
    """How far two float32 computations of one score may differ: each sum of `dim` products
    of unit vectors' components is within gamma_d = d u / (1 - d u) of the exact value
    (u = 2^-24; the sum of |q_i x_i| is at most |q| |x| = 1), whatever the order of the sum;
    both paths score the same normalized float32 query against the same stored rows."""
    u = 2.0**-24
    return 2 * dim * u / (1 - dim * u)


def test_answer_does_not_depend_on_the_batch() -> None:
    """A query's answer is the same alone (the BLAS path) and among any 127 others (the
    TensorFlow path), at any position: the same rows, and scores that differ by no more than
    two float32 dot-product errors. That is what every CPU's kernels give; bit-identical
    scores across batch compositions are a property of some kernels only, not promised."""
    dim = 48
    targets = open_targets(None, dim, demo_size=5000, demo_seed=5)
    engine = cpu_engine(targets, max_batch=128)
    rng = np.random.default_rng(12)
    probe = rng.standard_normal((1, dim), dtype=np.float32)
    alone_rows, alone_scores = engine.search(probe, 10)
    assert_exact(reference_scores(load_matrix(targets), probe), alone_rows, alone_scores, 10)
    for at in (0, 40, 127):  # a batch of 128, the probe among different neighbours
        others = rng.standard_normal((127, dim), dtype=np.float32)
        rows, scores = engine.search(np.insert(others, at, probe, axis=0), 10)
        np.testing.assert_array_equal(rows[at], alone_rows[0])
        np.testing.assert_allclose(scores[at], alone_scores[0], rtol=0, atol=dot_product_bound(dim))


def test_every_batch_size_and_more() -> None:
    targets = open_targets(None, 20, demo_size=900, demo_seed=9)
    engine = cpu_engine(targets, max_batch=6)
    assert engine.warmup_batches == [1, 2, 4, 6] == warmup_batches(6)
    ref_matrix = load_matrix(targets)
    rng = np.random.default_rng(4)
    for batch in (1, 2, 3, 5, 6, 7, 13):
        queries = rng.standard_normal((batch, 20), dtype=np.float32)
        rows, scores = engine.search(queries, 5)
        assert_exact(reference_scores(ref_matrix, queries), rows, scores, 5)


def test_empty_batch() -> None:
    engine = cpu_engine(open_targets(None, 4, demo_size=50), max_batch=4)
    rows, scores = engine.search(np.zeros((0, 4), np.float32), 3)
    assert rows.shape == scores.shape == (0, 3)


# -- reduced precision -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_is_close(dtype: str) -> None:
    targets = open_targets(None, 64, demo_size=3000, demo_seed=2)
    engine = cpu_engine(targets, max_batch=32, dtype=dtype)
    queries = np.random.default_rng(8).standard_normal((32, 64), dtype=np.float32)
    rows, scores = engine.search(queries, 10)
    ref = reference_scores(load_matrix(targets), queries)
    tol = LOW_PRECISION_TOL[dtype]
    true_of_returned = np.take_along_axis(ref, rows, 1)
    np.testing.assert_allclose(scores, true_of_returned, rtol=0, atol=tol)
    kth_best = np.sort(ref, axis=1)[:, -10]
    assert (true_of_returned >= kth_best[:, None] - 2 * tol).all()
    expected = stable_top_k(ref, 10)
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, expected, strict=True)])
    assert recall >= MIN_RECALL[dtype]


@pytest.mark.parametrize("flags", [["avx2", "fma", "avx512f"], ["avx512_fp16", "amx_bf16"]])
def test_float16_on_cpu_warns_unless_amx_makes_it_fast(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    """The flags stand for the machine's (they decide the note; the engine itself is real)."""
    monkeypatch.setattr(engine_module, "cpu_flags", lambda: flags)
    engine = cpu_engine(open_targets(None, 4, demo_size=20), dtype="float16", max_batch=1)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if "amx_bf16" in flags and engine.onednn.enabled:  # AMX tiles: float16 is the faster one
        assert not [w for w in warned if "float16" in w]
    else:
        assert [w for w in warned if "float16" in w and "--dtype float32 is faster" in w]


# -- the bench's ceiling -----------------------------------------------------------------------
def test_matmul_only_is_the_best_score() -> None:
    targets = open_targets(None, 24, demo_size=700, demo_seed=3)
    engine = cpu_engine(targets, max_batch=8, block_size=64)  # 10 blocks and a 60-row tail
    queries = np.random.default_rng(6).standard_normal((5, 24), dtype=np.float32)
    best = engine.matmul_only(queries)
    ref = reference_scores(load_matrix(targets), queries)
    np.testing.assert_allclose(best, ref.max(axis=1), rtol=0, atol=SCORE_TOL)
    np.testing.assert_allclose(best, engine.search(queries, 1)[1][:, 0], rtol=0, atol=SCORE_TOL)


# -- zero rows ---------------------------------------------------------------------------------
def test_drop_zero_returns_file_rows(tmp_path: Path) -> None:
    matrix, queries = random_case(600, 10, 4, seed=21)
    zero = np.array([0, 5, 6, 7, 299, 599])
    matrix[zero] = 0
    targets = npy_targets(tmp_path, matrix, drop_zero=True)
    assert targets.n == 600 - zero.size
    engine = cpu_engine(targets, max_batch=4, block_size=32)
    rows, scores = engine.search(queries, 20)
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-30)
    ref = reference_scores(unit, queries)
    ref[:, zero] = -np.inf
    assert not np.isin(rows, zero).any()
    assert_exact(ref, rows, scores, 20)


# -- errors ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_engine() -> Engine:
    return cpu_engine(open_targets(None, 8, demo_size=30), max_batch=4, max_k=50)


@pytest.mark.parametrize("k", [0, -1, 31, 50])
def test_bad_k(small_engine: Engine, k: int) -> None:
    assert small_engine.max_k == 30  # capped at N
    with pytest.raises(EngineError, match="k must be"):
        small_engine.search(np.ones((1, 8), np.float32), k)


@pytest.mark.parametrize("shape", [(8,), (1, 7), (2, 9), (1, 1, 8)])
def test_bad_query_shape(small_engine: Engine, shape: tuple[int, ...]) -> None:
    with pytest.raises(EngineError, match="shape"):
        small_engine.search(np.ones(shape, np.float32), 3)


def test_bad_config() -> None:
    targets = open_targets(None, 4, demo_size=10)
    with pytest.raises(ConfigError):
        cpu_engine(targets, max_k=0)
    with pytest.raises(ConfigError):
        cpu_engine(targets, max_batch=0)
    with pytest.raises(ConfigError):
        cpu_engine(targets, device="tpu:7")


def test_describe_and_warmup(small_engine: Engine) -> None:
    assert small_engine.warmup() >= 0
    info = small_engine.describe()
    assert info["n"] == 30 and info["dim"] == 8 and info["device"] == "/device:CPU:0"
    assert 16 <= choose_block_size(100_000, 10) <= 4096


# -- slabs: the columns cut into several score matrices ---------------------------------------
@pytest.fixture
def tiny_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slabs of 3 blocks of 8 (max_batch 8), so small matrices span several slabs."""
    monkeypatch.setattr(engine_module, "SLAB_SCORE_BYTES", 4 * 8 * 8 * 3)


@pytest.mark.parametrize(("n", "k"), [(203, 50), (203, 203), (203, 1), (50, 7)])
def test_ties_follow_stable_order_across_slabs(tmp_path: Path, tiny_slabs: None, n: int, k: int):
    dim = 6
    targets = npy_targets(tmp_path, one_hot_rows(n, dim, seed=n + k))
    engine = cpu_engine(targets, max_batch=8, max_k=n, block_size=8)
    assert len(engine.slabs) > 1
    queries = tie_queries(dim, 5, seed=k)
    rows, scores = engine.search(queries, k)
    ref = reference_scores(load_matrix(targets), queries)
    np.testing.assert_array_equal(rows, stable_top_k(ref, k))
    np.testing.assert_allclose(scores, np.take_along_axis(ref, rows, 1), rtol=0, atol=SCORE_TOL)


@pytest.mark.parametrize(("n", "dim", "batch", "k"), [(1000, 16, 3, 10), (777, 33, 8, 40)])
def test_matches_reference_across_slabs(tiny_slabs: None, n: int, dim: int, batch: int, k: int):
    queries = np.random.default_rng(n).standard_normal((batch, dim), dtype=np.float32)
    targets = open_targets(None, dim, demo_size=n, demo_seed=n)
    engine = cpu_engine(targets, max_batch=8, max_k=k, block_size=8)
    assert len(engine.slabs) > 1
    rows, scores = engine.search(queries, k)
    assert_exact(reference_scores(load_matrix(targets), queries), rows, scores, k)
    best = engine.matmul_only(queries)
    np.testing.assert_allclose(best, scores[:, 0], rtol=0, atol=SCORE_TOL)


def test_slabs_cover_the_blocked_columns_once():
    slabs = engine_module.column_slabs(10_000, 128, 128)
    assert slabs[0][0] == 0 and slabs[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))
    assert all((hi - lo) % 128 == 0 for lo, hi in slabs[:-1])
    assert engine_module.column_slabs(0, 128, 128) == []


# -- GPU: runs where TensorFlow sees one (not in CI, which has none) ---------------------------
@pytest.mark.skipif(not tf.config.list_logical_devices("GPU"), reason="TensorFlow sees no GPU here")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_engine_matches_reference(dtype: str) -> None:
    queries = np.random.default_rng(5).standard_normal((17, 64), dtype=np.float32)
    targets = open_targets(None, 64, demo_size=5000, demo_seed=5)
    engine = Engine(targets, EngineConfig(device="gpu", dtype=dtype, max_batch=16))
    assert "GPU" in engine.device
    rows, scores = engine.search(queries, 10)
    ref = reference_scores(load_matrix(targets), queries)
    if dtype == "float32":
        assert_exact(ref, rows, scores, 10)
    else:
        true = np.take_along_axis(ref, rows, 1)
        np.testing.assert_allclose(scores, true, atol=LOW_PRECISION_TOL[dtype])


def test_score_memory_sets_the_slabs():
    targets = open_targets(None, 8, demo_size=5000)
    engine = cpu_engine(targets, max_batch=16, block_size=64, score_memory_mib=1)
    width = 1024 * 1024 // (4 * 16) // 64 * 64
    assert engine.slabs == [(0, 4992)]  # all 78 blocks fit in one 16,384-column slab
    assert engine_module.column_slabs(100_000, 64, 16, 1024 * 1024)[0] == (0, width)
