"""Loading target vectors: layouts, normalization, zero rows and NaN/Inf (flasma_ws.vectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flasma_ws import vectors
from flasma_ws.errors import VectorFileError
from flasma_ws.vectors import (
    load_matrix,
    normalize_rows,
    open_demo,
    open_npy,
    open_targets,
    prepare,
)

LEGACY_FIXTURE = (
    Path(__file__).resolve().parents[1].parent / "shared/fixtures/flasma-legacy-10000x100.npy"
)


def reference_normalized(matrix: np.ndarray) -> np.ndarray:
    """Float64 reference for what loading should produce (as float64)."""
    m = np.asarray(matrix, dtype=np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


@pytest.fixture
def legacy_fixture() -> Path:
    if not LEGACY_FIXTURE.exists():
        pytest.skip(f"{LEGACY_FIXTURE} is not present")
    return LEGACY_FIXTURE


def test_legacy_fixture_loads_exactly_as_transposed_matrix(legacy_fixture: Path) -> None:
    flat = np.load(legacy_fixture)
    assert flat.shape == (10_000 * 100,)
    source = open_npy(legacy_fixture, dim=100)
    assert (source.n, source.dim, source.layout) == (10_000, 100, "legacy")
    matrix = load_matrix(open_targets(legacy_fixture, 100))
    assert matrix.dtype == np.float32
    assert np.array_equal(matrix, flat.reshape(100, 10_000).T)


def test_legacy_fixture_rows_are_unit_norm(legacy_fixture: Path) -> None:
    matrix = load_matrix(open_targets(legacy_fixture, 100))
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_legacy_round_trip_of_the_spec_formula(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    c = reference_normalized(rng.standard_normal((37, 6)))
    np.save(tmp_path / "legacy.npy", np.transpose(c).astype(np.float32).flatten())
    matrix = load_matrix(open_targets(tmp_path / "legacy.npy", 6))
    assert np.array_equal(matrix, c.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.float32, np.int32])
def test_standard_input_of_any_dtype_is_float32_normalized(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(2)
    raw = (rng.standard_normal((50, 9)) * rng.uniform(0.5, 40.0, (50, 1))).astype(dtype)
    raw[np.all(raw == 0, axis=1), 0] = 1  # int32 rows could round to all zeros
    np.save(tmp_path / "in.npy", raw)
    matrix = load_matrix(open_targets(tmp_path / "in.npy", None))
    assert matrix.dtype == np.float32 and matrix.shape == (50, 9)
    # The reference starts from the values as stored (float16/int rounding included).
    np.testing.assert_allclose(matrix, reference_normalized(raw), rtol=2e-6, atol=1e-7)


def test_huge_float32_values_normalize_without_overflow(tmp_path: Path) -> None:
    raw = np.full((3, 4), 3e38, dtype=np.float32)
    raw[1] = [1e-30, 0, 0, 0]  # tiny but not zero
    np.save(tmp_path / "in.npy", raw)
    matrix = load_matrix(open_targets(tmp_path / "in.npy", None))
    np.testing.assert_allclose(matrix, reference_normalized(raw), rtol=1e-6)


def test_unit_rows_stay_bit_exact_and_others_are_normalized() -> None:
    rng = np.random.default_rng(3)
    unit = reference_normalized(rng.standard_normal((5, 8))).astype(np.float32)
    block = np.concatenate([unit, 3 * unit])
    out = normalize_rows(block)
    assert np.array_equal(out[:5], unit)
    np.testing.assert_allclose(out[5:], unit, rtol=1e-6)
    assert np.array_equal(block[5:], 3 * unit)  # the input block is not modified


def test_zero_rows_are_refused_with_count_and_first_index(tmp_path: Path) -> None:
    raw = np.ones((10, 3), dtype=np.float32)
    raw[[4, 7]] = 0
    np.save(tmp_path / "in.npy", raw)
    with pytest.raises(VectorFileError, match=r"2 zero-norm rows \(first at row 4\).*--drop-zero"):
        open_targets(tmp_path / "in.npy", None)


def test_drop_zero_keeps_original_row_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((20, 5))
    zeros = [0, 6, 7, 19]
    raw[zeros] = 0
    np.save(tmp_path / "in.npy", raw)
    targets = open_targets(tmp_path / "in.npy", None, drop_zero=True)
    kept = np.setdiff1d(np.arange(20), zeros)
    assert targets.n == 16 and targets.zero_rows == 4
    assert np.array_equal(targets.keep, kept)
    matrix = load_matrix(targets)
    np.testing.assert_allclose(matrix, reference_normalized(raw[kept]), rtol=2e-6, atol=1e-7)
    # Engine row 5 is the 6th kept row: file row 8 (rows 6 and 7 were dropped).
    assert np.array_equal(targets.original_index(np.array([0, 5, 15])), [1, 8, 18])


def test_drop_zero_chunks_agree_across_chunk_boundaries(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((23, 4)).astype(np.float32)
    raw[[2, 3, 4, 5, 11]] = 0  # one whole chunk of 4 rows and a row inside another
    np.save(tmp_path / "in.npy", raw)
    targets = open_targets(tmp_path / "in.npy", None, drop_zero=True)
    starts, blocks = zip(*targets.chunks(chunk_rows=4), strict=True)
    stacked = np.concatenate(blocks)
    assert np.array_equal(stacked, load_matrix(targets))
    assert starts[0] == 0
    assert list(starts[1:]) == list(np.cumsum([b.shape[0] for b in blocks])[:-1])


def test_all_zero_rows_are_refused_even_with_drop_zero(tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", np.zeros((3, 4)))
    with pytest.raises(VectorFileError, match="Every row"):
        open_targets(tmp_path / "in.npy", None, drop_zero=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_first_row(tmp_path: Path, bad: float) -> None:
    raw = np.ones((8, 3))
    raw[5, 1] = bad
    raw[6, 0] = bad
    np.save(tmp_path / "in.npy", raw)
    with pytest.raises(VectorFileError, match=r"NaN or infinite values \(first in row 5\)"):
        open_targets(tmp_path / "in.npy", None)


def test_prepare_reports_progress_for_every_row(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vectors, "CHUNK_BYTES", 65_536 * 4 * 2)  # 65,536 rows of dim 2
    np.save(tmp_path / "in.npy", np.ones((70_000, 2), dtype=np.float32))
    seen: list[int] = []
    prepare(open_npy(tmp_path / "in.npy"), progress=seen.append)
    assert sum(seen) == 70_000 and len(seen) == 2  # two chunks of at most 65,536 rows


def test_demo_rows_are_the_same_whatever_the_slice() -> None:
    source = open_demo(10_000, 4, seed=7)
    whole = source.rows(0, 10_000)
    assert whole.shape == (10_000, 4) and whole.dtype == np.float32
    assert np.array_equal(source.rows(4_000, 8_300), whole[4_000:8_300])
    assert not np.array_equal(open_demo(10_000, 4, seed=8).rows(0, 10), whole[:10])


def test_no_file_and_no_dim_is_refused() -> None:
    with pytest.raises(VectorFileError, match="--npy FILE"):
        open_targets(None, None)
