"""Snapshots of a live collection, and the collection's identity file, written atomically.

`DIR/collection.json` names the collection (dim, key type). `DIR/snapshots/snap-{lsn:020d}/`
holds every row live after the record with that lsn:
- `vectors.npy`: a 1-D float32 array of dim*n values whose reshape (dim, n) has row j as
  column j, the engine's own layout and Flasma's legacy one, so `vectors.open_npy(path, dim)`
  reads it and the engine copies its columns without a transpose;
- `keys.npy` (int64, row order) for int keys, or `keys.bin` (the UTF-8 keys, concatenated)
  and `key_offsets.npy` (int64, n + 1: key j is bytes offsets[j]..offsets[j+1]) for str keys;
- `manifest.json`, written last: format, lsn, n, dim, key type, and each file's size and
  CRC32C.

Why a crash leaves either the old snapshot set or the new one, whole: a snapshot is built in
`snap-{lsn}.tmp/`; every file, then the manifest, then that directory are fsync'd before it is
renamed to `snap-{lsn}`, and `snapshots/` is fsync'd after. A rename is atomic, so a name
without `.tmp` only ever points at a complete, durable directory, and a `.tmp` is garbage
that `latest_snapshot` removes. Older snapshots are deleted only after the newer one's rename
is durable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from .errors import StorageError
from .keys import KEY_TYPES, Key, KeyType
from .wal import fdatasync, fsync_directory

log = logging.getLogger("flasma_ws")

FORMAT = 1
COLLECTION_FILE = "collection.json"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
INT_KEYS = "keys.npy"
STR_KEYS, STR_KEY_OFFSETS = "keys.bin", "key_offsets.npy"
SNAPSHOT_NAME = re.compile(r"snap-(\d{20})")
READ_CHUNK = 8 * 1024 * 1024  # bytes per read while checksumming: bounded memory at any size
Fill = Callable[[np.ndarray], None]  # fills the (dim, n) float32 view of vectors.npy
# Bytes of a snapshot written, then fdatasync'd, at a time when its rows come as bands (below).
WRITEBACK_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Bands:
    """The (dim, n) matrix of a snapshot by row bands: `read(lo, hi)` returns its rows lo..hi
    as a (hi - lo, n) float32 array, bytes lo*n*4 .. hi*n*4 of vectors.npy's data. Written in
    file order, WRITEBACK_CHUNK bytes and one fdatasync at a time: a write-ack's fdatasync on
    the same disk then waits behind one chunk, not behind the whole file. On a virtio disk,
    40 MB written at once raised a group-commit probe's p99 beside it from ~1.2 ms to 16-19 ms;
    in fdatasync'd chunks of 1 MiB, 2.3-2.9 ms, for 60-75 ms of writing instead of 40
    (docs/benchmarks.md)."""

    read: Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Snapshot:
    """A complete, verified snapshot."""

    path: Path
    lsn: int
    n: int
    dim: int
    key_type: KeyType

    @property
    def vectors_path(self) -> Path:
        return self.path / VECTORS

    def columns(self) -> np.ndarray:
        """The rows as the read-only (dim, n) float32 memory map: row j is column j."""
        return np.load(self.vectors_path, mmap_mode="r").reshape(self.dim, self.n)

    def keys(self) -> np.ndarray | list[str]:
        """The keys in row order: an int64 array, or a list of str."""
        if self.key_type == "int":
            return np.load(self.path / INT_KEYS, allow_pickle=False)
        data = (self.path / STR_KEYS).read_bytes()
        offsets = np.load(self.path / STR_KEY_OFFSETS, allow_pickle=False).tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]


def snapshot_name(lsn: int) -> str:
    return f"snap-{lsn:020d}"


# ---- writing -------------------------------------------------------------------------------


def write_snapshot(
    directory: Path,
    lsn: int,
    dim: int,
    key_type: KeyType,
    n: int,
    fill: Fill | Bands,
    keys: Sequence[Key] | np.ndarray,
) -> Path:
    """Write the snapshot of the n rows live after lsn and return its path. `fill(view)` writes
    the rows into the (dim, n) float32 memory map of vectors.npy (slab by slab, so no second
    full copy is held), or `Bands` give them in file order, written in paced chunks; `keys` are
    the rows' keys in the same order. A snapshot already complete at this lsn holds the same
    live set and is kept as it is."""
    snapshots = Path(directory) / SNAPSHOTS
    final = snapshots / snapshot_name(lsn)
    if (final / MANIFEST).exists():
        return final
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} rows")
    snapshots.mkdir(parents=True, exist_ok=True)
    tmp = snapshots / (snapshot_name(lsn) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        vectors = np.lib.format.open_memmap(tmp / VECTORS, mode="w+", dtype="<f4", shape=(dim * n,))
        if isinstance(fill, Bands):
            data_offset = vectors.offset  # the file holds the header; the rows come after
            del vectors
            _write_bands(tmp / VECTORS, data_offset, dim, n, fill)
        else:
            fill(vectors.reshape(dim, n))
            vectors.flush()
            del vectors
        names = [VECTORS, *_write_keys(tmp, key_type, keys)]
        files = {name: _sync_and_sum(tmp / name) for name in names}
        manifest = {
            "format": FORMAT,
            "lsn": lsn,
            "n": n,
            "dim": dim,
            "key_type": key_type,
            "files": files,
        }
        _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_directory(tmp)
        os.replace(tmp, final)
        fsync_directory(snapshots)
    except OSError as exc:
        raise StorageError(
            f"Writing the snapshot {final} failed ({exc}); check the disk (space, permissions). "
            "The previous snapshot and the WAL are untouched."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    return final


def _write_bands(path: Path, offset: int, dim: int, n: int, bands: Bands) -> None:
    """Write the rows of `bands` into vectors.npy at `offset`, in file order, fdatasync'ing
    every WRITEBACK_CHUNK bytes (`Bands` says why)."""
    rows = max(1, WRITEBACK_CHUNK // (4 * n))
    fd = os.open(path, os.O_WRONLY)
    try:
        for lo in range(0, dim, rows):
            hi = min(lo + rows, dim)
            band = np.ascontiguousarray(bands.read(lo, hi), dtype="<f4")
            if band.shape != (hi - lo, n):
                raise ValueError(f"rows {lo}..{hi} came as {band.shape}, not ({hi - lo}, {n})")
            view = band.data.cast("B")
            at = offset + 4 * lo * n
            for begin in range(0, len(view), WRITEBACK_CHUNK):
                _pwrite_all(fd, view[begin : begin + WRITEBACK_CHUNK], at + begin)
                fdatasync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:  # a regular file may take fewer bytes than asked (a full disk)
        written = os.pwrite(fd, data, at)
        if written == 0:
            raise OSError(f"the disk took no bytes at offset {at}")
        data, at = data[written:], at + written


def _write_keys(tmp: Path, key_type: KeyType, keys: Sequence[Key] | np.ndarray) -> list[str]:
    if key_type == "int":
        np.save(tmp / INT_KEYS, np.asarray(keys, dtype="<i8").reshape(-1))
        return [INT_KEYS]
    encoded = [str(key).encode("utf-8") for key in keys]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum([len(raw) for raw in encoded], out=offsets[1:])
    (tmp / STR_KEYS).write_bytes(b"".join(encoded))
    np.save(tmp / STR_KEY_OFFSETS, offsets)
    return [STR_KEYS, STR_KEY_OFFSETS]


def _sync_and_sum(path: Path) -> dict[str, int]:
    """fsync a written file and return its manifest entry (size and CRC32C, read back)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return {"bytes": path.stat().st_size, "crc32c": file_crc32c(path)}


def file_crc32c(path: Path) -> int:
    """CRC32C of a file, streamed through one buffer (hardware CRC32C: GB/s)."""
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while read := fh.readinto(buffer):
            crc = crc32c.crc32c(view[:read], crc)
    return crc


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# ---- reading -------------------------------------------------------------------------------


def latest_snapshot(directory: Path) -> Snapshot | None:
    """The newest snapshot, verified (manifest, sizes, CRC32C), or None if there is none.

    `.tmp` leftovers of an interrupted write are removed. A damaged newest snapshot raises
    StorageError: older ones may exist, but the WAL they would need may already be retired,
    so falling back silently could lose writes.
    """
    snapshots = Path(directory) / SNAPSHOTS
    if not snapshots.is_dir():
        return None
    found = []
    for path in snapshots.iterdir():
        if path.name.endswith(".tmp"):
            log.info("Removing %s, left by an interrupted snapshot.", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        match = SNAPSHOT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    lsn, path = max(found)
    return _verified(path, lsn, [p for other, p in sorted(found) if other < lsn])


def _verified(path: Path, lsn: int, older: list[Path]) -> Snapshot:
    fallback = (
        f" or, if the WAL still holds the records after it, move {path.name} out of "
        f"{path.parent} to start from {older[-1].name}"
        if older
        else ""
    )

    def damaged(why: str) -> StorageError:
        return StorageError(
            f"The snapshot {path} is damaged ({why}); restore the data directory from a "
            f"backup{fallback}."
        )

    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        snapshot = Snapshot(
            path,
            int(manifest["lsn"]),
            int(manifest["n"]),
            int(manifest["dim"]),
            manifest["key_type"],
        )
        files = dict(manifest["files"])
        if manifest["format"] != FORMAT:
            raise damaged(f"manifest format {manifest['format']}, expected {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"its manifest cannot be read: {exc}") from exc
    if snapshot.lsn != lsn or snapshot.key_type not in KEY_TYPES:
        raise damaged("its manifest does not match its name")
    for name in (
        [VECTORS, INT_KEYS] if snapshot.key_type == "int" else [VECTORS, STR_KEYS, STR_KEY_OFFSETS]
    ):
        entry = files.get(name)
        if entry is None:
            raise damaged(f"its manifest lists no {name}")
        file = path / name
        size = file.stat().st_size if file.exists() else None
        if size != entry["bytes"]:
            raise damaged(f"{name} has {size} bytes, the manifest says {entry['bytes']}")
        if file_crc32c(file) != entry["crc32c"]:
            raise damaged(f"{name} fails its CRC32C check")
    _check_shapes(snapshot, damaged)
    return snapshot


def _check_shapes(snapshot: Snapshot, damaged: Callable[[str], StorageError]) -> None:
    """The files as the manifest describes them (a bug, not a disk, would break this)."""
    vectors = np.load(snapshot.vectors_path, mmap_mode="r")
    if vectors.dtype != np.float32 or vectors.shape != (snapshot.dim * snapshot.n,):
        raise damaged(f"{VECTORS} is {vectors.dtype} {vectors.shape}, not float32 (dim*n,)")
    name = INT_KEYS if snapshot.key_type == "int" else STR_KEY_OFFSETS
    keys = np.load(snapshot.path / name, mmap_mode="r")
    expected = snapshot.n if snapshot.key_type == "int" else snapshot.n + 1
    if keys.dtype != np.int64 or keys.shape != (expected,):
        raise damaged(f"{name} is {keys.dtype} {keys.shape}, not int64 ({expected},)")


def retire_snapshots(directory: Path, keep_lsn: int) -> int:
    """Delete the snapshots older than the complete one at keep_lsn; returns how many."""
    snapshots = Path(directory) / SNAPSHOTS
    if not (snapshots / snapshot_name(keep_lsn) / MANIFEST).exists():
        raise StorageError(
            f"No complete snapshot at lsn {keep_lsn} in {snapshots}: the older ones are kept."
        )
    doomed = [
        path
        for path in snapshots.iterdir()
        if (match := SNAPSHOT_NAME.fullmatch(path.name)) and int(match.group(1)) < keep_lsn
    ]
    for path in doomed:
        shutil.rmtree(path)
    if doomed:
        fsync_directory(snapshots)
    return len(doomed)


# ---- the collection file -------------------------------------------------------------------


def create_collection(directory: Path, dim: int, key_type: KeyType) -> None:
    """Write DIR/collection.json atomically (tmp, fsync, rename, fsync DIR), creating DIR."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_directory(directory.resolve().parent)
    tmp = directory / (COLLECTION_FILE + ".tmp")
    body = {"format": FORMAT, "dim": dim, "key_type": key_type}
    _write_durably(tmp, json.dumps(body).encode())
    os.replace(tmp, directory / COLLECTION_FILE)
    fsync_directory(directory)


def read_collection(directory: Path) -> tuple[int, KeyType] | None:
    """(dim, key type) of the collection in DIR, or None where DIR is missing or empty (not a
    collection yet). Any other DIR without a valid collection.json is refused."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise StorageError(f"--data-dir {directory} is a file; give a directory.")
    (directory / (COLLECTION_FILE + ".tmp")).unlink(missing_ok=True)
    path = directory / COLLECTION_FILE
    if not path.exists():
        entries = sorted(p.name for p in directory.iterdir())
        if not entries:
            return None
        if set(entries) <= {SNAPSHOTS, "wal"}:
            raise StorageError(
                f"--data-dir {directory} holds an unfinished import (no {COLLECTION_FILE}); "
                "delete it and import again."
            )
        raise StorageError(
            f"--data-dir {directory} is not empty and holds no {COLLECTION_FILE}, so it is not "
            "a flasma-ws data directory; give a new or empty directory."
        )
    try:
        body = json.loads(path.read_bytes())
        dim, key_type = int(body["dim"]), body["key_type"]
        valid = body["format"] == FORMAT and dim > 0 and key_type in KEY_TYPES
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{path} cannot be read ({exc}); restore it from a backup.") from exc
    if not valid:
        raise StorageError(
            f"{path} holds {body}; expected format {FORMAT}, a positive dim and a key type "
            "int or str. Restore it from a backup."
        )
    return dim, key_type
