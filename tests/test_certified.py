"""Certified narrow precision (flasma_ws/certified.py): bfloat16, float16 and TF32 answers that
are exact, checked against the float64 oracle on adversarial data (real TensorFlow, CPU).

"tfloat32" below is `--dtype float32 --tf32`. A CPU has no TF32, so there its matmul is plain
float32 and these tests check the certification's plumbing with TF32's a-priori bound (the
candidates, widening, fallback and rescore); the bound itself meets real TF32 in the GPU test."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_exact, assert_exact_scores

from flasma_ws import certified
from flasma_ws.engine import Engine, EngineConfig, unit_queries
from flasma_ws.errors import ConfigError
from flasma_ws.metrics import Metrics, read_samples
from flasma_ws.reference import scores as reference_scores
from flasma_ws.reference import unit_rows
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings
from flasma_ws.vectors import open_targets, prepare, source_from_array

NARROW = ["bfloat16", "float16"]  # stored narrow: the host rounds the values the matmul reads
CERTIFIED = [*NARROW, "tfloat32"]


def config_for(dtype: str, **config: object) -> EngineConfig:
    config.setdefault("device", "cpu")
    if dtype == "tfloat32":
        dtype, config["tf32"] = "float32", True
    return EngineConfig(dtype=dtype, **config)  # type: ignore[arg-type]


def engine_for(matrix: np.ndarray, dtype: str, **config: object) -> Engine:
    targets = prepare(source_from_array(matrix.astype(np.float32), "test matrix"), False)
    config.setdefault("max_k", min(100, len(matrix)))
    return Engine(targets, config_for(dtype, **config))


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return unit_rows(rng.standard_normal((n, dim)))


def around(q: np.ndarray, cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows whose score against the unit query q is each of `cosines`."""
    other = rng.standard_normal((len(cosines), q.shape[0]))
    other -= np.outer(other @ q, q)
    other = unit_rows(other)
    return cosines[:, None] * q + np.sqrt(1 - cosines**2)[:, None] * other


def epsilon(engine: Engine) -> float:
    return float(engine.precision()["epsilon"])  # type: ignore[arg-type]


# -- the bound ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CERTIFIED)
@pytest.mark.parametrize("dim", [3, 64, 300])
def test_bound_holds_for_every_row(dtype: str, dim: int) -> None:
    """Every narrow score the graph sees is within E + 2u|s^| of the float64 score of the
    float32 rows, and E is far below the trivial 2u + u^2 bound's use (it is not vacuous)."""
    rng = np.random.default_rng(dim)
    matrix = unit(rng, 2000, dim)
    engine = engine_for(matrix, dtype, max_batch=16)
    search = engine.certified
    assert search is not None
    q = unit_queries(rng.standard_normal((16, dim)).astype(np.float32))
    qn = q.astype(search.narrow.host)
    narrow = tf.cast(tf.matmul(tf.constant(qn), engine._slab_tensors[0]), tf.float32).numpy()
    width = narrow.shape[1]
    exact = q.astype(np.float64) @ search.rows32[:width].astype(np.float64).T
    e = certified.slack(search.narrow, search.rows, q, qn)
    error = np.abs(narrow - exact)
    assert (error <= e[:, None] + 2 * search.narrow.output_u * np.abs(narrow)).all()
    # Not vacuous: measured, about 1.5u; TF32's a-priori input terms (5), about 4u.
    assert e.max() < (4.5 if search.narrow.inside else 2.5) * search.narrow.u


def test_probe_catches_a_narrow_accumulator() -> None:
    """The probe's data: a bfloat16 accumulator stalls far outside the bound; float32 passes."""
    m = 768
    q = np.full(m, 1 / np.sqrt(m)).astype(ml_dtypes.bfloat16)
    products = (q.astype(np.float32) ** 2).astype(ml_dtypes.bfloat16)
    total = ml_dtypes.bfloat16(0)
    for p in products:
        total = ml_dtypes.bfloat16(float(total) + float(p))
    exact = m * float(q[0]) ** 2
    narrow = certified.NARROW["bfloat16"]
    allowed = 2 * narrow.u * abs(float(total)) + certified.gamma(m) + narrow.alpha
    assert abs(float(total) - exact) > 10 * allowed
    certified.probe_accumulator(tf, narrow, "/device:CPU:0", m)  # the real kernel passes
    certified.probe_accumulator(tf, certified.TF32, "/device:CPU:0", m)


# -- adversarial data --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CERTIFIED)
@pytest.mark.parametrize(("near", "path"), [(60, "widened"), (600, "fallbacks")])
def test_many_rows_within_epsilon_of_the_kth(dtype: str, near: int, path: str) -> None:
    """`near` rows all within epsilon of the k-th score: the first K' (60) or even the cap
    (600 > 8k + 64) overflows, and the answer is still exact."""
    rng = np.random.default_rng(near)
    dim, k = 48, 10
    q = unit(rng, 1, dim)[0]
    probe = engine_for(unit(rng, 50, dim), dtype, max_batch=4)
    eps = epsilon(probe)
    close = around(q, 0.6 + rng.uniform(-eps, eps, near), rng)
    matrix = np.concatenate([unit(rng, 3000, dim), close])[rng.permutation(3000 + near)]
    engine = engine_for(matrix, dtype, max_batch=4)
    queries = np.stack([q, q + 1e-3 * rng.standard_normal(dim), unit(rng, 1, dim)[0]])
    rows, scores = engine.search(queries.astype(np.float32), k)
    assert_exact(matrix, queries, rows, scores, k)
    assert getattr(engine.certified.stats, path) >= 1  # type: ignore[union-attr]


def rank_inversions(dtype: str, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A query and rows where the narrow top k misses every exact top-k row.

    Rounding to nearest is monotone, so the narrow order inverts only through input
    rounding. Around a midpoint m between two adjacent narrow values near 0.6, take rows
    just below m whose input rounding pushes their float32 accumulator above m (they come
    out as the upper value) and rows just above m pushed below it (the lower value): the
    narrow k-th score is the upper value, the exact top k are rows narrow scores put below.
    """
    host = certified.NARROW[dtype].host
    dim = 48
    q32 = unit_queries(rng.standard_normal((1, dim)).astype(np.float32))[0]
    u = certified.NARROW[dtype].u  # the spacing of narrow values in [0.5, 1)
    m = float(np.array(0.6, host)) + u / 2
    pool = around(q32.astype(np.float64), m + 0.1 * u * rng.standard_normal(20000), rng)
    x32 = unit_rows(pool).astype(np.float32)
    exact = x32.astype(np.float64) @ q32.astype(np.float64)
    narrow = x32.astype(host).astype(np.float64) @ q32.astype(host).astype(np.float64)
    up = np.flatnonzero((exact < m) & (narrow > m))[: 2 * k]  # narrow: hi, exact: below m
    down = np.flatnonzero((exact > m) & (narrow < m))[: 2 * k]  # narrow: lo, exact: above m
    assert len(up) >= k and len(down) >= k, "the construction found too few inversions"
    matrix = np.concatenate([unit(rng, 2000, dim), x32[up], x32[down]])
    return q32, matrix


@pytest.mark.parametrize("dtype", NARROW)
def test_narrow_rank_inversions(dtype: str) -> None:
    """The exact top 10 all score below the narrow 10th: only a margin below it finds them."""
    rng = np.random.default_rng(13)
    q, matrix = rank_inversions(dtype, 10, rng)
    engine = engine_for(matrix, dtype, max_batch=2)
    approximate = engine_for(matrix, dtype, max_batch=2, approximate=True)
    queries = np.stack([q, q])
    rows, scores = engine.search(queries, 10)
    assert_exact(matrix, queries, rows, scores, 10)
    narrow_rows, _ = approximate.search(queries, 10)
    assert not set(narrow_rows[0].tolist()) & set(rows[0].tolist())


@pytest.mark.parametrize("dtype", CERTIFIED)
def test_exact_duplicates_at_max_k(dtype: str) -> None:
    """50 rows, each 12 times: k = max_k = 100 ties everywhere, lower rows first."""
    rng = np.random.default_rng(5)
    base = unit(rng, 50, 32)
    matrix = np.repeat(base, 12, axis=0)[rng.permutation(600)]
    engine = engine_for(matrix, dtype, max_batch=8, max_k=100)
    queries = np.concatenate([base[:3], rng.standard_normal((5, 32))])
    rows, scores = engine.search(queries.astype(np.float32), 100)
    assert_exact(matrix, queries, rows, scores, 100)
    for r, s in zip(rows, scores, strict=True):  # equal rows score equal: in row order
        for value in np.unique(s):
            tied = r[s == value]
            assert (np.diff(tied) > 0).all()


@pytest.mark.parametrize("dtype", CERTIFIED)
def test_near_duplicates(dtype: str) -> None:
    """Clusters of rows 1e-5 apart: their narrow scores are equal, float32 tells them apart."""
    rng = np.random.default_rng(6)
    centers = unit(rng, 40, 64)
    matrix = np.repeat(centers, 25, axis=0) + 1e-5 * rng.standard_normal((1000, 64))
    engine = engine_for(matrix, dtype, max_batch=8)
    queries = np.concatenate([centers[:4], centers[:4] + 0.01 * rng.standard_normal((4, 64))])
    rows, scores = engine.search(queries.astype(np.float32), 20)
    assert_exact(matrix, queries, rows, scores, 20)


@pytest.mark.parametrize("dtype", CERTIFIED)
@pytest.mark.parametrize(("n", "dim"), [(1, 5), (2, 1), (3, 2), (7, 16), (17, 3)])
def test_tiny_n(dtype: str, n: int, dim: int) -> None:
    rng = np.random.default_rng(n * dim)
    matrix = rng.standard_normal((n, dim))
    engine = engine_for(matrix, dtype, max_batch=4)
    queries = rng.standard_normal((4, dim))
    for k in sorted({1, n}):
        rows, scores = engine.search(queries.astype(np.float32), k)
        assert_exact(matrix, queries, rows, scores, k)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(CERTIFIED),
    n=st.integers(1, 500),
    dim=st.integers(1, 40),
    kind=st.sampled_from(["gaussian", "clustered", "duplicates", "quantized"]),
    seed=st.integers(0, 2**16),
    k_frac=st.floats(0, 1),
)
def test_property_exact(dtype: str, n: int, dim: int, kind: str, seed: int, k_frac: float) -> None:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        matrix = rng.standard_normal((n, dim))
    elif kind == "clustered":
        centers = rng.standard_normal((max(n // 20, 1), dim))
        matrix = centers[rng.integers(0, len(centers), n)] + 1e-3 * rng.standard_normal((n, dim))
    elif kind == "duplicates":
        matrix = rng.standard_normal((max(n // 4, 1), dim))[rng.integers(0, max(n // 4, 1), n)]
    else:  # rows already exact in bfloat16: the narrow scores lose only in the output
        matrix = rng.standard_normal((n, dim)).astype(ml_dtypes.bfloat16).astype(np.float64)
        matrix[np.linalg.norm(matrix, axis=1) == 0, 0] = 1.0
    engine = engine_for(matrix, dtype, max_batch=8)
    k = 1 + int(k_frac * (engine.max_k - 1))
    queries = np.concatenate([matrix[:2], rng.standard_normal((6, dim))])
    rows, scores = engine.search(queries.astype(np.float32), k)
    assert_exact(matrix, queries, rows, scores, k)


@pytest.mark.parametrize("dtype", CERTIFIED)
def test_fallback_counts_and_scores_are_float32(dtype: str) -> None:
    """Every query on a matrix of one repeated row falls back (all N rows are candidates,
    N > cap); the scores are float32 values of the exact ones."""
    rng = np.random.default_rng(9)
    row = unit(rng, 1, 16)
    matrix = np.repeat(row, 400, axis=0) + 1e-7 * rng.standard_normal((400, 16))
    engine = engine_for(matrix, dtype, max_batch=8)
    queries = rng.standard_normal((3, 16))
    rows, scores = engine.search(queries.astype(np.float32), 5)
    assert scores.dtype == np.float32
    assert_exact(matrix, queries, rows, scores, 5)
    stats = engine.certified.stats  # type: ignore[union-attr]
    assert stats.queries == 3 and stats.fallbacks == 3


def test_batch_composition_does_not_change_the_answer() -> None:
    """A query alone and among others, with widening and fallbacks in the batch."""
    rng = np.random.default_rng(10)
    q = unit(rng, 1, 24)[0]
    matrix = np.concatenate([unit(rng, 2000, 24), around(q, 0.7 + 1e-3 * rng.random(300), rng)])
    engine = engine_for(matrix, "bfloat16", max_batch=16)
    queries = np.concatenate([[q], rng.standard_normal((15, 24))]).astype(np.float32)
    rows, scores = engine.search(queries, 10)
    for b in (0, 7):
        alone = engine.search(queries[b : b + 1], 10)
        np.testing.assert_array_equal(alone[0][0], rows[b])
        np.testing.assert_allclose(alone[1][0], scores[b], rtol=0, atol=2 * 24 * 2**-24)


# -- settings, /info, /metrics, warnings -------------------------------------------------------
def test_approximate_keeps_narrow_scores() -> None:
    matrix = unit(np.random.default_rng(11), 500, 32)
    engine = engine_for(matrix, "bfloat16", max_batch=4, approximate=True)
    assert engine.certified is None
    assert engine.precision() == {"mode": "approximate", "unit_roundoff": 2**-8}
    rows, scores = engine.search(matrix[:4].astype(np.float32), 3)
    assert (rows[:, 0] == np.arange(4)).all()
    narrow = scores.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(scores, narrow)  # bfloat16 values: not rescored


def test_tf32_is_certified_and_says_it_gains_nothing_on_a_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matrix = unit(np.random.default_rng(15), 300, 16)
    with caplog.at_level("WARNING"):
        engine = engine_for(matrix, "tfloat32", max_batch=4)
    precision = engine.precision()
    assert precision["mode"] == "certified" and precision["arithmetic"] == "tfloat32"
    assert precision["epsilon_per_score"] == 0  # the output is the float32 accumulator: (5)
    assert 2**-10 < precision["epsilon"] < 2**-8  # type: ignore[operator]
    assert "gains nothing on a CPU" in caplog.text
    approximate = engine_for(matrix, "tfloat32", max_batch=4, approximate=True)
    assert approximate.precision() == {"mode": "approximate", "unit_roundoff": 2**-11}


def test_each_engine_sets_tf32_for_its_own_searches() -> None:
    """TF32 is one process-wide switch read when a kernel runs: two engines in one process
    (as in `bench --tf32 --compare`) each search with their own setting."""
    matrix = unit(np.random.default_rng(16), 300, 16)
    with_tf32, plain = engine_for(matrix, "tfloat32"), engine_for(matrix, "float32")
    queries = matrix[:4].astype(np.float32)
    with_tf32.search(queries, 3)
    assert tf.config.experimental.tensor_float_32_execution_enabled()
    plain.search(queries, 3)
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    with_tf32.search(queries, 3)
    assert tf.config.experimental.tensor_float_32_execution_enabled()
    plain.search(queries, 3)  # leave the process as the other tests expect it


def test_tf32_is_refused_where_it_cannot_be_certified(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tf32 applies to --dtype float32 only"):
        engine_for(unit(np.random.default_rng(17), 20, 4), "bfloat16", tf32=True)
    with pytest.raises(ConfigError, match="--tf32 applies to --dtype float32 only"):
        Settings(dim=4, dtype="float16", tf32=True).validate()
    with pytest.raises(ConfigError, match="--tf32 cannot be combined with --data-dir"):
        Settings(dim=4, tf32=True, data_dir=tmp_path).validate()


def test_float32_precision_mode() -> None:
    engine = engine_for(unit(np.random.default_rng(1), 50, 8), "float32", max_batch=2)
    assert engine.certified is None and engine.precision() == {"mode": "float32"}


SETTINGS = Settings(dim=24, demo_size=3000, dtype="bfloat16", max_batch=16, top_k=5)


def test_info_and_metrics_of_a_certified_server() -> None:
    import httpx

    from flasma_ws.client import SyncClient

    with BackgroundServer(SETTINGS) as server:
        queries = np.random.default_rng(3).standard_normal((6, 24)).astype(np.float32)
        with SyncClient(server.url) as client:
            answer = client.query_many(queries, k=5)
        info = httpx.get(f"{server.http_url}/info").json()
        metrics = read_samples(httpx.get(f"{server.http_url}/metrics").text)
    precision = info["precision"]
    assert precision["mode"] == "certified" and precision["unit_roundoff"] == 2**-8
    assert 0 < precision["epsilon"] < 0.02 and precision["epsilon_per_score"] == 2**-7
    matrix = load_unit(SETTINGS)
    ref = reference_scores(matrix, queries)
    assert_exact_scores(ref, answer.ids, answer.scores, 5)
    assert metrics["flasma_certified_queries_total"] >= 6  # and the warm-up's
    assert metrics["flasma_certified_candidates_total"] >= 5 * 6


def load_unit(settings: Settings) -> np.ndarray:
    from flasma_ws.vectors import load_matrix

    return load_matrix(open_targets(None, settings.dim, settings.demo_size, settings.demo_seed))


def test_metrics_collector_reads_live_counts() -> None:
    metrics, stats = Metrics(), certified.Stats()
    metrics.track_certified(lambda: stats)
    stats.queries, stats.fallbacks, stats.candidates = 10, 1, 200
    samples = read_samples(metrics.render().decode())
    assert samples["flasma_certified_queries_total"] == 10
    assert samples["flasma_certified_fallbacks_total"] == 1
    assert samples["flasma_certified_candidates_total"] == 200


def test_approximate_is_a_setting_and_a_flag() -> None:
    from typer.testing import CliRunner

    from flasma_ws.cli import app

    assert Settings(dim=4, approximate=True).engine.approximate is True
    assert Settings(dim=4, tf32=True).engine.tf32 is True
    for command in ("serve", "bench"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--approximate" in out and "--tf32" in out


@pytest.mark.parametrize(
    ("dtype", "flags", "onednn", "says"),
    [
        ("bfloat16", ["avx2", "avx512f"], True, "no bfloat16 arithmetic"),
        ("bfloat16", ["avx512_bf16"], False, "without oneDNN"),
        ("float16", ["avx512_bf16"], True, "only through oneDNN on AMX"),
        ("float16", ["avx512_fp16"], True, "only through oneDNN on AMX"),
        ("float16", ["amx_bf16"], True, "only through oneDNN on AMX"),
        ("float16", ["amx_fp16"], False, "only through oneDNN on AMX"),
        ("float16", ["avx512_fp16", "amx_fp16"], True, None),
        ("float16", ["avx512_fp16", "amx_bf16"], True, None),  # a VM may hide amx_fp16
        ("bfloat16", ["avx512_bf16"], True, None),
        ("bfloat16", ["amx_bf16"], True, None),
    ],
)
def test_speed_note(dtype: str, flags: list[str], onednn: bool, says: str | None) -> None:
    note = certified.speed_note(dtype, "/device:CPU:0", flags, onednn)
    assert (note is None) if says is None else (says in (note or "") and "float32" in note)
    assert certified.speed_note(dtype, "/device:GPU:0", flags, onednn) is None


def test_gpu_float16_accumulating_in_float16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_FP16_MATMUL_USE_FP32_COMPUTE", "0")
    with pytest.raises(ConfigError, match="approximate"):
        certified.check_device_setting(certified.NARROW["float16"], "/device:GPU:0")
    certified.check_device_setting(certified.NARROW["bfloat16"], "/device:GPU:0")


@pytest.mark.skipif(not tf.config.list_logical_devices("GPU"), reason="no GPU")
@pytest.mark.parametrize("dtype", CERTIFIED)
def test_gpu_certified_is_exact(dtype: str) -> None:
    rng = np.random.default_rng(12)
    q = unit(rng, 1, 128)[0]
    matrix = np.concatenate([unit(rng, 20000, 128), around(q, 0.5 + 1e-3 * rng.random(200), rng)])
    targets = prepare(source_from_array(matrix.astype(np.float32), "gpu test"), False)
    engine = Engine(targets, config_for(dtype, device="gpu", max_batch=32))
    queries = np.concatenate([[q], rng.standard_normal((31, 128))])
    rows, scores = engine.search(queries.astype(np.float32), 10)
    assert_exact(matrix, queries, rows, scores, 10)


def test_bench_reports_fallbacks_candidates_and_float32(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flasma_ws.cli import app

    out = tmp_path / "bench.json"
    args = ["bench", "--n", "2000", "--dims", "16", "--batches", "2,8", "--dtype", "bfloat16"]
    args += ["--compare", "--recall", "--data", "clustered", "--seconds", "0.05"]
    result = CliRunner().invoke(app, [*args, "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "candidates rescored" in result.output and "float32 engine" in result.output
    cells = json.loads(out.read_text())["results"]
    for cell in cells:
        assert cell["recall"] == 1.0 and cell["max_score_error"] <= 1e-5
        assert 0 <= cell["fallback_fraction"] <= 1 and cell["mean_candidates"] >= 10
        assert cell["float32_qps"] > 0 and cell["engine_over_float32"] > 0


@pytest.mark.parametrize("dtype", CERTIFIED)
def test_deletion_mask_composes(dtype: str) -> None:
    """(4) of the proof: masked rows are -inf before the narrow top K' and after the float32
    rescore; the answer is exact over the live rows, even in the fallback."""
    rng = np.random.default_rng(14)
    q = unit(rng, 1, 24)[0]
    matrix = np.concatenate([unit(rng, 1500, 24), around(q, 0.8 + 1e-3 * rng.random(400), rng)])
    targets = prepare(source_from_array(matrix.astype(np.float32), "masked"), False)
    engine = Engine(targets, config_for(dtype, max_batch=8), masked=True)
    dead = np.concatenate([np.arange(1500, 1700), rng.choice(1500, 100, replace=False)])
    engine.mask_columns(dead)
    queries = np.stack([q, *rng.standard_normal((3, 24))])
    rows, scores = engine.search(queries.astype(np.float32), 10)
    ref = reference_scores(unit_rows(matrix), queries)
    ref[:, dead] = -np.inf
    assert_exact_scores(ref, rows, scores, 10)
    assert engine.certified.stats.fallbacks >= 1  # type: ignore[union-attr]
    live = np.setdiff1d(np.arange(len(matrix)), np.arange(5, len(matrix)))  # rows 0-4 live
    engine.mask_columns(np.arange(5, len(matrix)))
    rows, scores = engine.search(queries.astype(np.float32), 10)
    assert (np.sort(rows[:, :5], axis=1) == live).all() and np.isneginf(scores[:, 5:]).all()
