"""`flasma-ws convert` and the readers/writers behind it (flasma_ws.formats)."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import flasma_ws.cli.convert as convert_cli
from flasma_ws import formats, vectors
from flasma_ws.cli import app
from flasma_ws.errors import VectorFileError
from flasma_ws.vectors import load_matrix, open_npy, open_targets, prepare

LEGACY_FIXTURE = (
    Path(__file__).resolve().parents[1].parent / "shared/fixtures/flasma-legacy-10000x100.npy"
)

runner = CliRunner()


def run_convert(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, ["convert", *map(str, args)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def reference_normalized(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def write_fvecs(path: Path, matrix: np.ndarray) -> None:
    """TEXMEX layout: per vector an int32 dimension, then the float32 values."""
    n, dim = matrix.shape
    records = np.empty((n, dim + 1), dtype="<f4")
    records[:, 0] = np.full(n, dim, dtype="<i4").view("<f4")
    records[:, 1:] = matrix
    records.tofile(path)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


# --- .npy -------------------------------------------------------------------------------------


def test_float64_npy_becomes_normalized_float32(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.standard_normal((300, 12)) * 25
    np.save(tmp_path / "in.npy", raw)
    code, output = run_convert(tmp_path / "in.npy", tmp_path / "out.npy")
    assert code == 0, output
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32 and out.shape == (300, 12)
    np.testing.assert_allclose(out, reference_normalized(raw), rtol=2e-6, atol=1e-7)
    assert "N=300" in output and "dim=12" in output and "dtype float64" in output
    assert "0 zero-norm rows" in output


def test_standard_legacy_standard_round_trip_is_exact(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    np.save(tmp_path / "in.npy", rng.standard_normal((500, 7)).astype(np.float16))
    std, legacy, back = tmp_path / "std.npy", tmp_path / "legacy.npy", tmp_path / "back.npy"
    assert run_convert(tmp_path / "in.npy", std)[0] == 0
    code, output = run_convert(std, legacy, "--to", "legacy")
    assert code == 0 and "--dim 7" in output  # the serve hint names the dimension
    assert run_convert(legacy, back, "--dim", "7")[0] == 0
    c = np.load(std)
    assert np.array_equal(np.load(legacy), np.transpose(c).astype(np.float32).flatten())
    assert np.array_equal(np.load(back), c)


def test_round_trip_across_chunks_with_dropped_rows(tmp_path: Path, monkeypatch) -> None:
    # More rows than one 65,536-row chunk, zero rows on both sides of the boundary.
    monkeypatch.setattr(vectors, "CHUNK_BYTES", 65_536 * 4 * 3)
    rng = np.random.default_rng(12)
    raw = rng.standard_normal((70_000, 3)).astype(np.float32)
    zeros = [0, 65_535, 65_536, 69_999]
    raw[zeros] = 0
    np.save(tmp_path / "in.npy", raw)
    legacy, back = tmp_path / "legacy.npy", tmp_path / "back.npy"
    code, output = run_convert(tmp_path / "in.npy", legacy, "--to", "legacy", "--drop-zero")
    assert code == 0, output
    assert "4 zero-norm rows" in output and "no longer match" in output
    assert run_convert(legacy, back, "--dim", "3")[0] == 0
    kept = np.delete(raw, zeros, axis=0)
    expected = load_matrix(prepare(formats.open_any(tmp_path / "in.npy"), drop_zero=True))
    assert np.array_equal(np.load(back), expected)
    np.testing.assert_allclose(np.load(back), reference_normalized(kept), rtol=2e-6, atol=1e-7)


def test_legacy_fixture_converts_to_its_transpose(tmp_path: Path) -> None:
    if not LEGACY_FIXTURE.exists():
        pytest.skip(f"{LEGACY_FIXTURE} is not present")
    code, output = run_convert(LEGACY_FIXTURE, tmp_path / "std.npy", "--dim", "100")
    assert code == 0, output
    assert "N=10000" in output and "legacy layout" in output
    flat = np.load(LEGACY_FIXTURE)
    assert np.array_equal(np.load(tmp_path / "std.npy"), flat.reshape(100, 10_000).T)


def test_existing_output_is_kept_without_force_and_replaced_with_it(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    np.save(tmp_path / "in.npy", rng.standard_normal((10, 4)))
    out = tmp_path / "out.npy"
    out.write_bytes(b"precious")
    code, output = run_convert(tmp_path / "in.npy", out)
    assert code == 1 and "already exists; pass --force" in output
    assert out.read_bytes() == b"precious"
    code, output = run_convert(tmp_path / "in.npy", out, "--force")
    assert code == 0, output
    assert np.load(out).shape == (10, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy"]  # no leftovers


def test_in_place_conversion_with_force(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.standard_normal((40, 5))
    path = tmp_path / "vectors.npy"
    np.save(path, raw)
    code, output = run_convert(path, path, "--force")
    assert code == 0, output
    np.testing.assert_allclose(np.load(path), reference_normalized(raw), rtol=2e-6, atol=1e-7)


def test_progress_bar_on_large_inputs(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert_cli, "PROGRESS_MIN_VALUES", 100)
    np.save(tmp_path / "in.npy", rng.standard_normal((60, 2)))  # 120 values
    code, output = run_convert(tmp_path / "in.npy", tmp_path / "out.npy")
    assert code == 0, output
    assert "Checking rows" in output and "Writing rows" in output and "60/60" in output
    np.save(tmp_path / "small.npy", rng.standard_normal((10, 2)))
    code, output = run_convert(tmp_path / "small.npy", tmp_path / "small-out.npy")
    assert code == 0 and "Checking rows" not in output


def test_write_npy_reports_progress_and_reads_back(tmp_path: Path) -> None:
    raw = np.arange(1, 31, dtype=np.float64).reshape(10, 3)
    np.save(tmp_path / "in.npy", raw)
    targets = open_targets(tmp_path / "in.npy", None)
    seen: list[int] = []
    out = formats.write_npy(targets, tmp_path / "out.npy", "legacy", progress=seen.append)
    assert sum(seen) == 10
    assert np.array_equal(load_matrix(open_targets(out, 3)), load_matrix(targets))
    with pytest.raises(VectorFileError, match="already exists"):
        formats.write_npy(targets, out, "standard")


# --- .npz -------------------------------------------------------------------------------------


def test_npz_with_key(tmp_path: Path, rng: np.random.Generator) -> None:
    emb, other = rng.standard_normal((30, 6)), rng.standard_normal((5, 2))
    np.savez(tmp_path / "in.npz", emb=emb, other=other)
    code, output = run_convert(tmp_path / "in.npz", tmp_path / "out.npy", "--key", "emb")
    assert code == 0, output
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), reference_normalized(emb), rtol=2e-6, atol=1e-7
    )


def test_npz_single_array_needs_no_key(tmp_path: Path, rng: np.random.Generator) -> None:
    emb = rng.standard_normal((30, 6)).astype(np.float32)
    np.savez_compressed(tmp_path / "in.npz", emb)
    code, output = run_convert(tmp_path / "in.npz", tmp_path / "out.npy")
    assert code == 0, output
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), reference_normalized(emb), rtol=2e-6, atol=1e-7
    )


@pytest.mark.parametrize("order", ["C", "F"])
def test_stored_npz_member_is_memory_mapped(
    tmp_path: Path, rng: np.random.Generator, order: str
) -> None:
    emb = np.asarray(rng.standard_normal((25, 4)), order=order)
    np.savez(tmp_path / "in.npz", pad=np.zeros(3), emb=emb)
    source = formats.open_any(tmp_path / "in.npz", key="emb")
    assert isinstance(source.array, np.memmap)
    assert np.array_equal(source.rows(0, 25), emb.astype(np.float32))


def test_compressed_npz_member_is_read_correctly(tmp_path: Path, rng: np.random.Generator) -> None:
    emb = rng.standard_normal((25, 4))
    np.savez_compressed(tmp_path / "in.npz", emb=emb)
    source = formats.open_any(tmp_path / "in.npz")
    assert not isinstance(source.array, np.memmap)
    assert np.array_equal(source.rows(0, 25), emb.astype(np.float32))


def test_npz_legacy_member_with_dim(tmp_path: Path, rng: np.random.Generator) -> None:
    c = reference_normalized(rng.standard_normal((9, 4)))
    np.savez(tmp_path / "in.npz", flat=np.transpose(c).astype(np.float32).flatten())
    targets = prepare(formats.open_any(tmp_path / "in.npz", dim=4))
    assert np.array_equal(load_matrix(targets), c.astype(np.float32))


# --- .fvecs -----------------------------------------------------------------------------------


def test_fvecs(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.standard_normal((40, 16)).astype(np.float32)
    write_fvecs(tmp_path / "in.fvecs", raw)
    source = formats.open_any(tmp_path / "in.fvecs")
    assert (source.n, source.dim) == (40, 16) and isinstance(source.array, np.memmap)
    code, output = run_convert(tmp_path / "in.fvecs", tmp_path / "out.npy", "--dim", "16")
    assert code == 0, output
    assert "dtype float32" in output
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), reference_normalized(raw), rtol=2e-6, atol=1e-7
    )


# --- .hdf5 ------------------------------------------------------------------------------------


def write_ann_benchmarks(path: Path, train: np.ndarray, **datasets_kw: object) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "angular"
        f.create_dataset("train", data=train, **datasets_kw)
        f.create_dataset("test", data=train[:3] * 2)
        f.create_dataset("neighbors", data=np.zeros((3, 10), dtype=np.int32))


def test_hdf5_train_by_default(tmp_path: Path, rng: np.random.Generator) -> None:
    train = rng.standard_normal((50, 8)).astype(np.float32)
    write_ann_benchmarks(tmp_path / "in.hdf5", train)
    source = formats.open_any(tmp_path / "in.hdf5")
    assert isinstance(source.array, np.memmap)  # contiguous: read straight from the file
    code, output = run_convert(tmp_path / "in.hdf5", tmp_path / "out.npy")
    assert code == 0, output
    assert "N=50" in output
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), reference_normalized(train), rtol=2e-6, atol=1e-7
    )


def test_hdf5_other_key(tmp_path: Path, rng: np.random.Generator) -> None:
    train = rng.standard_normal((50, 8))
    write_ann_benchmarks(tmp_path / "in.h5", train)
    code, output = run_convert(tmp_path / "in.h5", tmp_path / "out.npy", "--key", "test")
    assert code == 0, output
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), reference_normalized(train[:3]), rtol=2e-6, atol=1e-7
    )


def test_hdf5_chunked_compressed_dataset(tmp_path: Path, rng: np.random.Generator) -> None:
    train = rng.standard_normal((50, 8))
    write_ann_benchmarks(tmp_path / "in.hdf5", train, chunks=(7, 8), compression="gzip")
    source = formats.open_any(tmp_path / "in.hdf5")
    assert not isinstance(source.array, np.memmap)
    assert np.array_equal(source.rows(10, 30), train[10:30].astype(np.float32))


def test_missing_h5py_says_how_to_install(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ann_benchmarks(tmp_path / "in.hdf5", rng.standard_normal((5, 2)))
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(VectorFileError, match=r"pip install 'flasma-ws\[hdf5\]'"):
        formats.open_any(tmp_path / "in.hdf5")
    code, output = run_convert(tmp_path / "in.hdf5", tmp_path / "out.npy")
    assert code == 1 and "h5py" in output and "pip install" in output
    assert not (tmp_path / "out.npy").exists()


def test_hdf5_arrays_match_open_npy(tmp_path: Path, rng: np.random.Generator) -> None:
    # The same matrix through .npy and .hdf5 gives identical normalized rows.
    train = rng.standard_normal((20, 5))
    np.save(tmp_path / "in.npy", train)
    write_ann_benchmarks(tmp_path / "in.hdf5", train)
    via_npy = load_matrix(prepare(open_npy(tmp_path / "in.npy")))
    via_hdf5 = load_matrix(prepare(formats.open_any(tmp_path / "in.hdf5")))
    assert np.array_equal(via_npy, via_hdf5)
