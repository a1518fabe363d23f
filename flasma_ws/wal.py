"""The write-ahead log of a live collection: checksummed records in segment files, a torn tail
truncated on recovery, and group commit (many writes, one fsync) in a committer thread.

Layout: `DIR/wal/wal-{first_lsn:020d}.log`. Each segment starts with a 16-byte header
(magic, dim, key type) so that a segment of another collection is refused, then records:

    u32 payload_length | u32 crc32c(payload) | payload
    payload = u64 lsn | u32 n_upserts | u32 n_deletes | upsert keys | float32 vectors
              | delete keys                                   (all little-endian)

One record holds one client frame's writes; replay applies its upserts, then its deletes.
LSNs start at 1 (0 means "nothing") and increase by exactly 1 across records and segments.

Why a torn tail can be told from corruption. Groups are written strictly one after another:
group g+1 is written only after group g's fsync returned, and after a failed write or fsync
the log takes no more groups. So the bytes after the last durable point all belong to the
one group being written when the process died, at the end of the newest segment. Recovery
scans records until the first one that is incomplete or fails its checksum, at byte p:
- if no complete, valid record starts anywhere after p (any byte offset), the bad bytes are
  the unfinished group: truncate at p. Nothing acknowledged is lost, because an
  acknowledgement follows the fsync, and an fsync'd record passes its checksum;
- if a valid record does follow, bytes in the middle of the log changed after they were
  written: that is corruption, never silently dropped (StorageError), and so is any bad
  record in an older segment, which was complete and fsync'd before the next one began.
The scan for a following record looks at every byte offset, so a damaged length field
cannot hide the records behind it; a candidate must carry a plausible lsn before its
checksum is computed, which keeps the scan linear.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np

from .errors import StorageError
from .keys import Key, KeyType, decode_keys, encode_keys
from .text import counted

log = logging.getLogger("flasma_ws")

SEGMENT_MAGIC = b"FLWAL1\0\0"
SEGMENT_HEADER = struct.Struct("<8sIB3x")  # magic, dim, key type code; 16 bytes
RECORD_HEAD = struct.Struct("<II")  # payload length, crc32c(payload)
PAYLOAD_HEAD = struct.Struct("<QII")  # lsn, n_upserts, n_deletes
KEY_TYPE_CODES: dict[KeyType, int] = {"int": 0, "str": 1}
SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
# One group's vectors at most: bounds the group's encoded copy; a 1,000 x 100 bulk frame is 0.4 MB.
MAX_GROUP_BYTES = 16 * 1024 * 1024
SCAN_CHUNK = 1 << 22  # byte offsets examined at once when looking for records after a bad one
fdatasync = getattr(os, "fdatasync", os.fsync)  # the data, not the mtime: one seek less


@dataclass(frozen=True)
class Record:
    """One durable frame of writes. `vectors` is (len(upsert_keys), dim) float32, C-contiguous."""

    lsn: int
    upsert_keys: list[Key]
    vectors: np.ndarray
    delete_keys: list[Key]


@dataclass
class WalStats:
    """Counters for /metrics; written by the appending thread, read anywhere."""

    bytes_written: int = 0
    fsyncs: int = 0
    records: int = 0
    groups: int = 0
    last_fsync_seconds: float = 0.0


@dataclass(frozen=True)
class _Segment:
    first_lsn: int
    path: Path


def segment_name(first_lsn: int) -> str:
    return f"wal-{first_lsn:020d}.log"


def encode_record(
    lsn: int,
    upsert_keys: Sequence[Key],
    vectors: np.ndarray,
    delete_keys: Sequence[Key],
    key_type: KeyType,
) -> bytes:
    """A record's bytes (head + payload); the keys must be valid and the vectors float32."""
    body = b"".join(
        (
            PAYLOAD_HEAD.pack(lsn, len(upsert_keys), len(delete_keys)),
            encode_keys(upsert_keys, key_type),
            np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            encode_keys(delete_keys, key_type),
        )
    )
    return RECORD_HEAD.pack(len(body), crc32c.crc32c(body)) + body


def decode_payload(payload: memoryview, dim: int, key_type: KeyType) -> Record:
    """A payload whose checksum passed; ValueError if its fields do not add up."""
    lsn, n_upserts, n_deletes = PAYLOAD_HEAD.unpack_from(payload, 0)
    upserts, offset = decode_keys(payload, PAYLOAD_HEAD.size, n_upserts, key_type)
    end = offset + 4 * dim * n_upserts
    if end > len(payload):
        raise ValueError(f"{n_upserts} vectors of dimension {dim} do not fit the record")
    vectors = np.frombuffer(payload, dtype="<f4", count=dim * n_upserts, offset=offset)
    deletes, offset = decode_keys(payload, end, n_deletes, key_type)
    if offset != len(payload):
        raise ValueError(f"{len(payload) - offset} bytes after the record's fields")
    return Record(lsn, upserts, vectors.reshape(n_upserts, dim).astype(np.float32), deletes)


class WriteAheadLog:
    """The segments under `directory / "wal"`. Call `replay` once, to its end, before `append`.

    `append`, `rotate` and `retire` hold one lock, so they may be called from any thread; the
    GroupCommitter calls `append` from its own thread. `fsync=False` is for tests and benches
    only: it acknowledges writes a power cut can lose.
    """

    def __init__(self, directory: Path, dim: int, key_type: KeyType, *, fsync: bool = True):
        self.directory = Path(directory) / "wal"
        self.dim = dim
        self.key_type = key_type
        self.fsync = fsync
        self.stats = WalStats()
        self._header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, dim, KEY_TYPE_CODES[key_type])
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._current: _Segment | None = None
        self._current_records = 0
        self._sizes: dict[Path, int] = {}
        self._next_lsn = 0  # 0 until replay has run to its end
        self._failed: str | None = None

    @property
    def next_lsn(self) -> int:
        """The lsn the next appended record gets; known once `replay` has run to its end."""
        if not self._next_lsn:
            raise StorageError("The WAL was not replayed; run replay() to its end first.")
        return self._next_lsn

    @property
    def last_lsn(self) -> int:
        """The lsn of the last durable record (0 for none)."""
        return self.next_lsn - 1

    @property
    def size_bytes(self) -> int:
        """Bytes in all segments (read from any thread: list() copies under the GIL)."""
        return sum(list(self._sizes.values()))

    @property
    def segments(self) -> list[Path]:
        return [segment.path for segment in self._list_segments()]

    # ---- recovery --------------------------------------------------------------------------

    def replay(self, after_lsn: int = 0) -> Iterator[Record]:
        """Every record with lsn > after_lsn, in order; truncates a torn tail (see the module
        docstring) and raises StorageError on corruption, a gap, or a foreign segment.

        Segments wholly before after_lsn (those followed by one that starts at or before
        after_lsn + 1) are skipped unread: a snapshot covers them and `retire` deletes them.
        """
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            fsync_directory(self.directory.parent)  # the wal folder's own entry, durable
        segments = self._list_segments()
        for segment in segments:
            self._sizes[segment.path] = segment.path.stat().st_size
        needed = [
            s for i, s in enumerate(segments[:-1]) if segments[i + 1].first_lsn > after_lsn + 1
        ]
        needed += segments[-1:]
        if needed and needed[0].first_lsn > after_lsn + 1:
            raise StorageError(
                f"The WAL in {self.directory} starts at lsn {needed[0].first_lsn}, but the "
                f"snapshot covers only up to lsn {after_lsn}: the records between are missing. "
                "Restore the data directory from a backup."
            )
        expected = needed[0].first_lsn if needed else after_lsn + 1
        for index, segment in enumerate(needed):
            last = index == len(needed) - 1
            expected = yield from self._replay_segment(segment, expected, after_lsn, last)
        self._open_for_append(needed[-1] if needed else None, expected, after_lsn)

    def _replay_segment(
        self, segment: _Segment, expected: int, after_lsn: int, last: bool
    ) -> Generator[Record, None, int]:
        """Yield the segment's records past after_lsn; returns the lsn expected next."""
        if segment.first_lsn != expected:
            raise StorageError(
                f"The WAL segment {segment.path} starts at lsn {segment.first_lsn}, but lsn "
                f"{expected} was expected next: records are missing or repeated. Restore the "
                "data directory from a backup."
            )
        view = _mapped(segment.path)
        self._check_header(segment.path, view)
        offset, records = SEGMENT_HEADER.size, 0
        payload: memoryview | None = None
        while offset < len(view):
            payload = _valid_payload(view, offset)
            if payload is None:
                self._check_torn(segment, view, offset, expected, last)
                break
            lsn = PAYLOAD_HEAD.unpack_from(payload)[0]
            if lsn != expected:
                raise self._corrupt(segment, offset, f"it holds lsn {lsn}, not lsn {expected}")
            if lsn > after_lsn:
                try:
                    yield decode_payload(payload, self.dim, self.key_type)
                except ValueError as exc:
                    raise self._corrupt(
                        segment, offset, f"its fields do not add up: {exc}"
                    ) from exc
            offset += RECORD_HEAD.size + len(payload)
            expected += 1
            records += 1
        size = len(view)
        del view, payload  # unmaps the segment (nothing else holds its pages)
        if offset < size:
            self._truncate(segment, offset, size, expected - 1)
        if last:
            self._current_records = records
        return expected

    def _check_header(self, path: Path, data: memoryview) -> None:
        if data[: SEGMENT_HEADER.size] == self._header:
            return
        if len(data) < SEGMENT_HEADER.size or data[:8] != SEGMENT_MAGIC:
            raise StorageError(
                f"{path} is not a flasma-ws WAL segment (bad header); move it out of "
                f"{self.directory}."
            )
        _, dim, code = SEGMENT_HEADER.unpack_from(data)
        raise StorageError(
            f"{path} belongs to another collection (dim {dim}, key type code {code}; this one "
            f"has dim {self.dim}, key type {self.key_type}); move it out of {self.directory}."
        )

    def _check_torn(
        self, segment: _Segment, view: memoryview, offset: int, expected: int, last: bool
    ) -> None:
        """A record at `offset` is incomplete or fails its checksum: return if it starts a torn
        tail, else raise StorageError (see the module docstring)."""
        what = "is incomplete or fails its checksum"
        if not last:
            raise self._corrupt(segment, offset, what + " in a segment older than the newest")
        follower = _next_valid_record(view, offset, expected)
        if follower is not None:
            raise self._corrupt(
                segment, offset, f"{what}, and a valid record follows at byte {follower:,}"
            )

    def _truncate(self, segment: _Segment, offset: int, size: int, last_lsn: int) -> None:
        with open(segment.path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        self._sizes[segment.path] = offset
        log.warning(
            "WAL %s ended with a torn record: dropped %s after byte %s (the last complete "
            "record is lsn %d).",
            segment.path,
            counted(size - offset, "byte"),
            f"{offset:,}",
            last_lsn,
        )

    def _corrupt(self, segment: _Segment, offset: int, why: str) -> StorageError:
        return StorageError(
            f"The WAL segment {segment.path} is corrupt at byte {offset:,} (not its tail: {why}). "
            f"Restore {self.directory.parent} from a backup, or move {segment.path.name} and the "
            "segments after it out of the wal folder to start from the last snapshot (the writes "
            "they hold are lost)."
        )

    def _list_segments(self) -> list[_Segment]:
        """The segments, oldest first; a `.tmp` left by a crash while creating one is removed."""
        found = []
        for path in self.directory.iterdir():
            match = SEGMENT_NAME.fullmatch(path.name)
            if match:
                found.append(_Segment(int(match.group(1)), path))
            elif path.name.endswith(".log.tmp"):
                path.unlink()
        return sorted(found, key=lambda segment: segment.first_lsn)

    def _open_for_append(self, segment: _Segment | None, next_lsn: int, after_lsn: int) -> None:
        if next_lsn <= after_lsn:
            log.warning(
                "The WAL in %s ends at lsn %d, before the snapshot's lsn %d; starting a new "
                "segment after the snapshot.",
                self.directory,
                next_lsn - 1,
                after_lsn,
            )
            segment, next_lsn = None, after_lsn + 1
        self._next_lsn = next_lsn
        if segment is None:
            segment = self._create_segment(next_lsn)
            self._current_records = 0
        self._current = segment
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)

    def _create_segment(self, first_lsn: int) -> _Segment:
        """A new segment holding only its header, made durable before it is named (tmp,
        fsync, rename, fsync the directory), so a segment file never has a torn header."""
        path = self.directory / segment_name(first_lsn)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(self._header)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_directory(self.directory)
        self._sizes[path] = len(self._header)
        return _Segment(first_lsn, path)

    # ---- appending -------------------------------------------------------------------------

    def append(
        self, writes: Sequence[tuple[Sequence[Key], np.ndarray, Sequence[Key]]]
    ) -> list[Record]:
        """Write (upsert_keys, vectors, delete_keys) frames as records with the next lsns, with
        one write and one fsync, and return them once durable. Keys must be valid (keys.py);
        vectors (len(upsert_keys), dim). A failed write or fsync raises StorageError and the
        log refuses every later append."""
        with self._lock:
            if self._failed:
                raise StorageError(self._failed)
            first = self.next_lsn
            records = [Record(first + i, *self.check_write(*w)) for i, w in enumerate(writes)]
            blob = b"".join(
                encode_record(r.lsn, r.upsert_keys, r.vectors, r.delete_keys, self.key_type)
                for r in records
            )
            self._write(blob)
            self._next_lsn += len(records)
            self._current_records += len(records)
            self.stats.records += len(records)
            self.stats.groups += 1
            return records

    def check_write(
        self, upsert_keys: Sequence[Key], vectors: np.ndarray, delete_keys: Sequence[Key]
    ) -> tuple[list[Key], np.ndarray, list[Key]]:
        """A frame's writes as a record holds them; ValueError if the vectors' shape is wrong.
        (Keys are the caller's to validate, with keys.key_error, before they reach the log.)"""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(upsert_keys), self.dim):
            raise ValueError(
                f"{counted(len(upsert_keys), 'upsert key')} need vectors of shape "
                f"({len(upsert_keys)}, {self.dim}), got {vectors.shape}"
            )
        return list(upsert_keys), vectors, list(delete_keys)

    def _write(self, blob: bytes) -> None:
        assert self._fd is not None and self._current is not None
        path = self._current.path
        try:
            view = memoryview(blob)
            while view:  # a regular file may take fewer bytes than asked (a full disk)
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise self._fail(f"Writing the WAL segment {path} failed ({exc})") from exc
        self._sizes[path] += len(blob)
        self.stats.bytes_written += len(blob)
        if not self.fsync:
            return
        started = time.perf_counter()
        try:
            fdatasync(self._fd)
        except OSError as exc:
            raise self._fail(
                f"fsync of the WAL segment {path} failed ({exc}); a failed fsync cannot be "
                "retried safely (the kernel may have dropped the unwritten pages)"
            ) from exc
        self.stats.last_fsync_seconds = time.perf_counter() - started
        self.stats.fsyncs += 1

    def _fail(self, what: str) -> StorageError:
        self._failed = (
            f"{what}. The writes in flight were not acknowledged and may or may not survive a "
            "restart; the log refuses every later write. Check the disk (space, errors), then "
            "restart the server."
        )
        return StorageError(self._failed)

    @property
    def failed(self) -> str | None:
        """Why the log refuses appends, or None while it takes them."""
        return self._failed

    # ---- segments --------------------------------------------------------------------------

    def rotate(self) -> int:
        """Close the current segment (its records are fsync'd already) and start a new one at
        next_lsn, which is returned; an empty current segment is kept instead."""
        with self._lock:
            if self._failed:
                raise StorageError(self._failed)
            first = self.next_lsn
            if self._current_records == 0:
                return first
            try:
                segment = self._create_segment(first)
            except OSError as exc:
                raise StorageError(
                    f"Starting a new WAL segment in {self.directory} failed ({exc}); check the "
                    "disk (space, permissions)."
                ) from exc
            assert self._fd is not None
            os.close(self._fd)
            self._current, self._current_records = segment, 0
            self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
            return first

    def retire(self, before_lsn: int) -> int:
        """Delete the segments all of whose records have lsn < before_lsn (those followed by a
        segment starting at or before it); returns how many went. Never the current one."""
        with self._lock:
            segments = self._list_segments()
            doomed = [
                s for i, s in enumerate(segments[:-1]) if segments[i + 1].first_lsn <= before_lsn
            ]
            for segment in doomed:
                segment.path.unlink()
                self._sizes.pop(segment.path, None)
            if doomed:
                fsync_directory(self.directory)
            return len(doomed)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _mapped(path: Path) -> memoryview:
    """A read-only view of a whole file, memory-mapped: recovery reads a large segment without
    holding a copy (its pages stay reclaimable page cache)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return memoryview(b"")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return memoryview(mapped)


def _valid_payload(view: memoryview, offset: int) -> memoryview | None:
    """The payload of the record at `offset` if it is complete and passes its checksum."""
    if offset + RECORD_HEAD.size > len(view):
        return None
    length, crc = RECORD_HEAD.unpack_from(view, offset)
    start = offset + RECORD_HEAD.size
    if length < PAYLOAD_HEAD.size or start + length > len(view):
        return None
    payload = view[start : start + length]
    return payload if crc32c.crc32c(payload) == crc else None


def _next_valid_record(view: memoryview, bad: int, expected: int) -> int | None:
    """The first byte offset after `bad` where a valid record starts, or None. A record after
    the bad one (lsn `expected`) has an lsn from `expected` on, and fewer records than bytes
    follow, so offsets whose lsn field falls outside that range are skipped without a crc."""
    lsn_at = RECORD_HEAD.size  # the lsn field's offset inside a record
    span = len(view) - bad - 1 - lsn_at - 8 + 1  # offsets after `bad` with room for an lsn
    for chunk in range(0, max(span, 0), SCAN_CHUNK):
        count = min(SCAN_CHUNK, span - chunk)
        first = bad + 1 + chunk
        lsns = np.ndarray((count,), dtype="<u8", buffer=view, offset=first + lsn_at, strides=(1,))
        hits = np.flatnonzero((lsns >= expected) & (lsns <= expected + len(view) - bad))
        for hit in hits.tolist():
            if _valid_payload(view, first + hit) is not None:
                return first + hit
    return None


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a created, renamed or deleted file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Pending:
    write: tuple[Sequence[Key], np.ndarray, Sequence[Key]]
    future: Future[int] = field(default_factory=Future)


@dataclass
class _Rotation:
    future: Future[int] = field(default_factory=Future)


_STOP = object()
OnDurable = Callable[[list[Record]], None]


class GroupCommitter:
    """Group commit: `submit` queues a frame's writes; one thread writes everything queued
    with one write and one fsync, calls `on_durable(records)` (lsn order, in this thread:
    the server applies them to the engine there), then resolves each future with its lsn.

    LSNs follow submission order: the queue is FIFO and the thread takes it in order (all of
    it, up to MAX_GROUP_BYTES of vectors a group). A future
    never resolves before its record is fsync'd; a failed write or fsync fails the group's
    futures with StorageError, and every later one (the log refuses appends). If on_durable
    raises, the group's records are durable (a restart replays them) but their futures carry
    that exception: they were not applied, so they must not be acknowledged.
    """

    def __init__(self, wal: WriteAheadLog, on_durable: OnDurable | None = None) -> None:
        wal.next_lsn  # noqa: B018  (raises unless replay ran to its end)
        self.wal = wal
        self.on_durable = on_durable
        self._queue: queue.SimpleQueue[_Pending | _Rotation | object] = queue.SimpleQueue()
        self._closed = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="flasma-wal", daemon=True)
        self._thread.start()

    def submit(
        self, upsert_keys: Sequence[Key], vectors: np.ndarray, delete_keys: Sequence[Key]
    ) -> Future[int]:
        """Queue one frame's writes (valid keys; vectors (len(upsert_keys), dim) float32);
        the future resolves to its lsn once durable and applied. A wrong vectors shape
        raises ValueError here, before anything is queued."""
        pending = _Pending(self.wal.check_write(upsert_keys, vectors, delete_keys))
        self._put(pending)
        return pending.future

    def rotate(self) -> Future[int]:
        """Start a new segment after every write submitted so far; resolves to its first lsn."""
        rotation = _Rotation()
        self._put(rotation)
        return rotation.future

    def _put(self, item: _Pending | _Rotation) -> None:
        with self._submit_lock:
            if self._closed:
                item.future.set_exception(StorageError("The WAL is closed; no more writes."))
                return
            self._queue.put(item)

    def close(self) -> None:
        """Write what is queued, then stop the thread (and leave the WAL open)."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            items = self._take()
            group: list[_Pending] = []
            for item in items:
                if isinstance(item, _Pending):
                    group.append(item)
                    continue
                self._commit(group)
                group = []
                if isinstance(item, _Rotation):
                    _settle(item.future, self.wal.rotate)
                else:
                    stop = True
            self._commit(group)

    def _take(self) -> list[_Pending | _Rotation | object]:
        """Everything queued (waiting for the first item), up to MAX_GROUP_BYTES of vectors:
        a burst of bulk frames is written in several groups, not one copy of them all."""
        items = [self._queue.get()]
        size = _size(items[0])
        while size < MAX_GROUP_BYTES and not self._queue.empty():
            items.append(self._queue.get_nowait())
            size += _size(items[-1])
        return items

    def _commit(self, group: list[_Pending]) -> None:
        if not group:
            return
        try:
            records = self.wal.append([pending.write for pending in group])
        except Exception as exc:  # StorageError, or a bad shape from a caller: fail them all
            for pending in group:
                pending.future.set_exception(exc)
            return
        try:
            if self.on_durable is not None:
                self.on_durable(records)
        except Exception as exc:
            log.exception("Applying WAL records %d..%d failed", records[0].lsn, records[-1].lsn)
            for pending in group:
                pending.future.set_exception(exc)
            return
        for pending, record in zip(group, records):
            pending.future.set_result(record.lsn)


def _size(item: object) -> int:
    return item.write[1].nbytes if isinstance(item, _Pending) else 0


def _settle(future: Future[int], call: Callable[[], int]) -> None:
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
