"""Snapshots and the collection file on real files: round trips readable as Flasma legacy
files, leftovers of a crash ignored, damage detected, retirement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flasma_ws import snapshot as snap
from flasma_ws.errors import StorageError
from flasma_ws.keys import Key, KeyType
from flasma_ws.snapshot import (
    Bands,
    create_collection,
    latest_snapshot,
    read_collection,
    retire_snapshots,
    write_snapshot,
)
from flasma_ws.vectors import normalize_rows, open_npy

DIM = 6


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return normalize_rows(rng.standard_normal((n, DIM), dtype=np.float32) + 0.1)


def keys_for(key_type: KeyType, n: int) -> list[Key]:
    return [3 * j + 1 for j in range(n)] if key_type == "int" else [f"k-{j}-é" for j in range(n)]


def written(
    directory: Path, lsn: int, rows: np.ndarray, key_type: KeyType = "int", slab: int = 7
) -> Path:
    """A snapshot of `rows`, filled slab by slab as the engine does."""

    def fill(view: np.ndarray) -> None:
        assert view.shape == (DIM, rows.shape[0]) and view.dtype == np.float32
        for start in range(0, rows.shape[0], slab):
            view[:, start : start + slab] = rows[start : start + slab].T

    keys = keys_for(key_type, rows.shape[0])
    return write_snapshot(directory, lsn, DIM, key_type, rows.shape[0], fill, keys)


@pytest.mark.parametrize("key_type", ["int", "str"])
def test_round_trip_is_a_legacy_file_bit_for_bit(tmp_path: Path, key_type: KeyType) -> None:
    rows = unit_rows(50)
    path = written(tmp_path, 12, rows, key_type)
    assert path == tmp_path / "snapshots" / f"snap-{12:020d}"
    found = latest_snapshot(tmp_path)
    assert found is not None
    assert (found.path, found.lsn, found.n, found.dim, found.key_type) == (
        path,
        12,
        50,
        DIM,
        key_type,
    )
    source = open_npy(found.vectors_path, DIM)
    assert source.layout == "legacy" and (source.n, source.dim) == (50, DIM)
    assert np.array_equal(source.rows(0, 50), rows)  # bit for bit: same float32 values
    assert np.array_equal(found.columns(), rows.T)
    keys = found.keys()
    expected = keys_for(key_type, 50)
    if key_type == "int":
        assert isinstance(keys, np.ndarray) and keys.dtype == np.int64
        assert keys.tolist() == expected
    else:
        assert keys == expected
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["lsn"] == 12 and manifest["n"] == 50
    assert manifest["files"]["vectors.npy"]["bytes"] == (path / "vectors.npy").stat().st_size


def test_an_empty_snapshot_round_trips(tmp_path: Path) -> None:
    written(tmp_path, 3, np.zeros((0, DIM), np.float32), "str")
    found = latest_snapshot(tmp_path)
    assert found is not None and found.n == 0
    assert found.columns().shape == (DIM, 0) and found.keys() == []


def test_the_newest_snapshot_wins_and_a_tmp_leftover_is_removed(tmp_path: Path) -> None:
    written(tmp_path, 5, unit_rows(10, seed=1))
    newest = written(tmp_path, 9, unit_rows(20, seed=2))
    # A crash while writing lsn 15 left its .tmp, complete up to the rename.
    leftover = written(tmp_path / "other", 15, unit_rows(4, seed=3))
    tmp = tmp_path / "snapshots" / f"snap-{15:020d}.tmp"
    leftover.rename(tmp)
    found = latest_snapshot(tmp_path)
    assert found is not None and found.path == newest and found.n == 20
    assert not tmp.exists()


def test_none_before_the_first_snapshot(tmp_path: Path) -> None:
    assert latest_snapshot(tmp_path) is None
    (tmp_path / "snapshots").mkdir()
    assert latest_snapshot(tmp_path) is None


@pytest.mark.parametrize("name", ["vectors.npy", "keys.npy"])
def test_a_flipped_byte_is_detected(tmp_path: Path, name: str) -> None:
    written(tmp_path, 5, unit_rows(10, seed=1))
    path = written(tmp_path, 9, unit_rows(30))
    data = bytearray((path / name).read_bytes())
    data[len(data) - 5] ^= 0x10
    (path / name).write_bytes(bytes(data))
    with pytest.raises(
        StorageError, match=f"{path}.*damaged.*{name} fails its CRC32C.*snap-{5:020d}"
    ):
        latest_snapshot(tmp_path)


def test_a_truncated_file_and_a_broken_manifest_are_detected(tmp_path: Path) -> None:
    path = written(tmp_path, 9, unit_rows(30), "str")
    keys = path / "keys.bin"
    keys.write_bytes(keys.read_bytes()[:-1])
    with pytest.raises(StorageError, match="keys.bin has .* bytes, the manifest says"):
        latest_snapshot(tmp_path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StorageError, match="manifest cannot be read"):
        latest_snapshot(tmp_path)


@pytest.mark.parametrize("chunk", [64, 100, 1 << 20])  # pieces of a band; bands of rows
def test_rows_given_as_bands_are_written_in_paced_chunks_and_read_back_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    rows = unit_rows(37)  # 37 * 4 bytes per row of the (dim, n) matrix: bands of 1 row or more
    monkeypatch.setattr(snap, "WRITEBACK_CHUNK", chunk)
    columns = np.ascontiguousarray(rows.T)
    asked: list[tuple[int, int]] = []

    def read(lo: int, hi: int) -> np.ndarray:
        asked.append((lo, hi))
        return columns[lo:hi]

    write_snapshot(tmp_path, 3, DIM, "int", 37, Bands(read), list(range(37)))
    found = latest_snapshot(tmp_path)  # verifies sizes and CRC32C
    assert found is not None and found.lsn == 3
    np.testing.assert_array_equal(found.columns(), columns)
    assert [lo for lo, _ in asked] == sorted(lo for lo, _ in asked)  # file order
    assert asked[-1][1] == DIM and len(asked) == -(-DIM // max(1, chunk // (4 * 37)))


def test_a_band_of_the_wrong_shape_fails_and_leaves_the_old_snapshot(tmp_path: Path) -> None:
    old = written(tmp_path, 4, unit_rows(8))
    with pytest.raises(ValueError, match="came as"):
        write_snapshot(tmp_path, 6, DIM, "int", 8, Bands(lambda lo, hi: np.zeros((1, 8))), [0] * 8)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [old.name]


def test_a_snapshot_at_an_lsn_already_written_is_kept(tmp_path: Path) -> None:
    path = written(tmp_path, 4, unit_rows(8))
    before = (path / "manifest.json").read_bytes()

    def never(view: np.ndarray) -> None:
        raise AssertionError("not rewritten")

    assert write_snapshot(tmp_path, 4, DIM, "int", 8, never, list(range(8))) == path
    assert (path / "manifest.json").read_bytes() == before


def test_a_failing_fill_leaves_no_tmp_and_the_old_snapshot(tmp_path: Path) -> None:
    old = written(tmp_path, 4, unit_rows(8))

    def broken(view: np.ndarray) -> None:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError):
        write_snapshot(tmp_path, 6, DIM, "int", 8, broken, list(range(8)))
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [old.name]
    found = latest_snapshot(tmp_path)
    assert found is not None and found.lsn == 4


def test_retire_keeps_the_given_snapshot_and_newer(tmp_path: Path) -> None:
    for lsn in (2, 5, 9):
        written(tmp_path, lsn, unit_rows(5, seed=lsn))
    assert retire_snapshots(tmp_path, 5) == 1
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names == [f"snap-{5:020d}", f"snap-{9:020d}"]
    with pytest.raises(StorageError, match="No complete snapshot at lsn 7"):
        retire_snapshots(tmp_path, 7)
    assert retire_snapshots(tmp_path, 9) == 1
    found = latest_snapshot(tmp_path)
    assert found is not None and found.lsn == 9


def test_collection_file_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "data"
    assert read_collection(directory) is None
    directory.mkdir(parents=True)
    assert read_collection(directory) is None  # empty: not a collection yet
    create_collection(directory, 100, "str")
    assert read_collection(directory) == (100, "str")
    assert sorted(p.name for p in directory.iterdir()) == ["collection.json"]
    assert json.loads((directory / "collection.json").read_text())["format"] == 1


def test_a_directory_that_is_not_a_collection_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty and holds no collection.json"):
        read_collection(tmp_path)
    with pytest.raises(StorageError, match="is a file"):
        read_collection(tmp_path / "notes.txt")


def test_an_unfinished_import_is_named(tmp_path: Path) -> None:
    written(tmp_path, 0, unit_rows(3))
    with pytest.raises(StorageError, match="unfinished import"):
        read_collection(tmp_path)


def test_a_bad_collection_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "collection.json").write_text('{"format": 1, "dim": 0, "key_type": "int"}')
    with pytest.raises(StorageError, match="a positive dim"):
        read_collection(tmp_path)
    (tmp_path / "collection.json").write_text("[")
    with pytest.raises(StorageError, match="cannot be read"):
        read_collection(tmp_path)


def test_checksums_stream_through_a_small_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than the read buffer gets the same CRC as one read whole."""
    import crc32c

    data = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(snap, "READ_CHUNK", 999)
    assert snap.file_crc32c(tmp_path / "f") == crc32c.crc32c(data)
