"""The write-ahead log on real files with real fsync: round trips, torn tails at every byte,
corruption refused, group commit from many threads, rotation and retirement."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from flasma_ws.errors import StorageError
from flasma_ws.keys import MAX_INT_KEY, MAX_KEY_BYTES, Key, KeyType
from flasma_ws.wal import GroupCommitter, Record, WriteAheadLog

DIM = 4


def opened(directory: Path, key_type: KeyType = "int", after: int = 0) -> WriteAheadLog:
    wal = WriteAheadLog(directory, DIM, key_type)
    list(wal.replay(after))
    return wal


def replayed(directory: Path, key_type: KeyType = "int", after: int = 0) -> list[Record]:
    wal = WriteAheadLog(directory, DIM, key_type)
    records = list(wal.replay(after))
    wal.close()
    return records


def frame(seed: int, upserts: list[Key], deletes: list[Key]) -> tuple:
    rng = np.random.default_rng(seed)
    return upserts, rng.standard_normal((len(upserts), DIM), dtype=np.float32), deletes


def same(record: Record, lsn: int, write: tuple) -> bool:
    keys, vectors, deletes = write
    return (
        record.lsn == lsn
        and record.upsert_keys == list(keys)
        and record.vectors.dtype == np.float32
        and record.vectors.flags.c_contiguous
        and np.array_equal(record.vectors, vectors)
        and record.delete_keys == list(deletes)
    )


FRAMES: dict[KeyType, list[tuple]] = {
    "int": [
        frame(1, [0, 5, MAX_INT_KEY], [7]),
        frame(2, [], [1, 2]),
        frame(3, [9], []),
        frame(4, [], []),
        frame(5, [3, 4], [MAX_INT_KEY]),
    ],
    "str": [
        frame(1, ["a", "é" * (MAX_KEY_BYTES // 2), "x" * MAX_KEY_BYTES], ["zz"]),
        frame(2, [], ["a", "🙂"]),
        frame(3, ["k"], []),
        frame(4, [], []),
        frame(5, ["b", "c"], ["x" * MAX_KEY_BYTES]),
    ],
}


@pytest.mark.parametrize("key_type", ["int", "str"])
def test_records_round_trip(tmp_path: Path, key_type: KeyType) -> None:
    wal = opened(tmp_path, key_type)
    assert wal.next_lsn == 1
    written = wal.append(FRAMES[key_type][:2]) + wal.append(FRAMES[key_type][2:])
    assert [r.lsn for r in written] == [1, 2, 3, 4, 5]
    assert wal.stats.fsyncs == 2 and wal.stats.records == 5
    wal.close()
    records = replayed(tmp_path, key_type)
    assert len(records) == 5
    assert all(same(r, i + 1, w) for i, (r, w) in enumerate(zip(records, FRAMES[key_type])))
    assert [r.lsn for r in replayed(tmp_path, key_type, after=3)] == [4, 5]


def test_a_new_log_starts_at_lsn_1_with_one_segment(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    assert wal.next_lsn == 1 and wal.last_lsn == 0
    assert [p.name for p in wal.segments] == [f"wal-{1:020d}.log"]
    assert wal.size_bytes == 16


def test_a_segment_of_another_collection_is_refused(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    wal.append(FRAMES["int"][:1])
    wal.close()
    with pytest.raises(StorageError, match="another collection"):
        list(WriteAheadLog(tmp_path, DIM + 1, "int").replay(0))
    with pytest.raises(StorageError, match="another collection"):
        list(WriteAheadLog(tmp_path, DIM, "str").replay(0))


def test_appending_before_replay_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="replay"):
        WriteAheadLog(tmp_path, DIM, "int").append(FRAMES["int"][:1])


def test_a_wrong_vector_shape_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        wal.append([([1, 2], np.zeros((1, DIM), np.float32), [])])
    assert wal.next_lsn == 1 and wal.size_bytes == 16


def written_log(directory: Path) -> tuple[Path, list[int]]:
    """A one-segment log of the five int frames; the segment and each record's end offset."""
    wal = opened(directory)
    ends = []
    for write in FRAMES["int"]:
        wal.append([write])
        ends.append(wal.size_bytes)
    wal.close()
    return wal.segments[0], ends


def test_a_torn_tail_is_truncated_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment, ends = written_log(tmp_path / "full")
    data = segment.read_bytes()
    last_start = ends[-2]
    assert len(data) == ends[-1]
    for cut in range(last_start, ends[-1]):  # the 8-byte head, then every byte of the payload
        directory = tmp_path / f"cut-{cut}"
        (directory / "wal").mkdir(parents=True)
        copy = directory / "wal" / segment.name
        copy.write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flasma_ws"):
            wal = WriteAheadLog(directory, DIM, "int")
            records = list(wal.replay(0))
        assert [r.lsn for r in records] == [1, 2, 3, 4]
        assert all(same(r, i + 1, w) for i, (r, w) in enumerate(zip(records, FRAMES["int"])))
        assert copy.stat().st_size == last_start
        dropped = cut - last_start
        if dropped:
            assert f"dropped {dropped:,} byte" in caplog.text
        else:
            assert caplog.text == ""  # a cut between records is no tear
        assert [r.lsn for r in wal.append([FRAMES["int"][0]])] == [5]
        wal.close()
        again = replayed(directory)
        assert [r.lsn for r in again] == [1, 2, 3, 4, 5]
        assert same(again[-1], 5, FRAMES["int"][0])


def test_a_checksum_failure_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    segment, ends = written_log(tmp_path)
    data = bytearray(segment.read_bytes())
    data[ends[-1] - 3] ^= 0x40
    segment.write_bytes(bytes(data))
    assert [r.lsn for r in replayed(tmp_path)] == [1, 2, 3, 4]
    assert segment.stat().st_size == ends[-2]


def test_two_bad_final_records_and_zero_fill_are_one_torn_tail(tmp_path: Path) -> None:
    segment, ends = written_log(tmp_path)
    data = bytearray(segment.read_bytes())
    data[ends[-2] - 2] ^= 0x01  # record 4's payload
    data[ends[-1] - 2] ^= 0x01  # record 5's payload
    segment.write_bytes(bytes(data) + bytes(4096))  # and zeros a file system may leave
    assert [r.lsn for r in replayed(tmp_path)] == [1, 2, 3]
    assert segment.stat().st_size == ends[-3]


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / f"wal-{1:020d}.log").write_bytes(b"not a wal segment at all")
    with pytest.raises(StorageError, match="not a flasma-ws WAL segment"):
        list(WriteAheadLog(tmp_path, DIM, "int").replay(0))


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_bad_record_with_valid_records_after_it_is_corruption(tmp_path: Path, where: str) -> None:
    segment, ends = written_log(tmp_path)
    data = bytearray(segment.read_bytes())
    # Record 2 (lsn 2) lies in ends[0]..ends[1]; flip a byte of its payload, or of its
    # length field, which must not hide the records after it.
    at = (ends[0] + ends[1]) // 2 if where == "payload" else ends[0] + 1
    data[at] ^= 0x01
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=f"corrupt at byte {ends[0]:,}.*not its tail"):
        list(WriteAheadLog(tmp_path, DIM, "int").replay(0))
    assert segment.read_bytes() == bytes(data)  # nothing truncated


def test_any_bad_record_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    wal.append(FRAMES["int"][:2])
    wal.rotate()
    wal.append(FRAMES["int"][2:])
    wal.close()
    first = wal.segments[0]
    first.write_bytes(first.read_bytes()[:-1])  # the older segment's last record torn
    with pytest.raises(StorageError, match="older than the newest"):
        list(WriteAheadLog(tmp_path, DIM, "int").replay(0))


def test_a_gap_before_the_first_needed_segment_is_refused(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    wal.append(FRAMES["int"][:2])
    wal.rotate()
    wal.append(FRAMES["int"][2:])
    wal.close()
    wal.segments[0].unlink()
    with pytest.raises(StorageError, match="records between are missing"):
        list(WriteAheadLog(tmp_path, DIM, "int").replay(0))
    assert [r.lsn for r in replayed(tmp_path, after=2)] == [3, 4, 5]


def test_group_commit_from_8_threads(tmp_path: Path) -> None:
    applied: list[int] = []
    wal = opened(tmp_path)
    committer = GroupCommitter(
        wal, on_durable=lambda records: applied.extend(r.lsn for r in records)
    )
    futures: dict[tuple[int, int], object] = {}
    start = threading.Barrier(8)

    def writer(thread: int) -> None:
        start.wait()
        for i in range(200):
            futures[thread, i] = committer.submit(
                *frame(thread * 1000 + i, [thread * 1000 + i], [])
            )

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lsns = {key: future.result(timeout=60) for key, future in futures.items()}  # type: ignore[attr-defined]
    committer.close()
    wal.close()
    assert sorted(lsns.values()) == list(range(1, 1601))
    assert applied == list(range(1, 1601))  # on_durable ran in lsn order, each record once
    assert wal.stats.records == 1600 and wal.stats.fsyncs < 1600
    by_lsn = {lsn: key for key, lsn in lsns.items()}
    records = replayed(tmp_path)
    assert [r.lsn for r in records] == list(range(1, 1601))
    for record in records:
        thread, i = by_lsn[record.lsn]
        assert same(record, record.lsn, frame(thread * 1000 + i, [thread * 1000 + i], []))
    # Each thread's own writes got increasing lsns: submission order is lsn order.
    for thread in range(8):
        own = [lsns[thread, i] for i in range(200)]
        assert own == sorted(own)


def test_a_failed_write_fails_its_futures_and_every_later_one(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    committer = GroupCommitter(wal)
    assert committer.submit(*FRAMES["int"][0]).result(timeout=30) == 1
    assert wal._fd is not None
    fd, wal._fd = wal._fd, 10**6  # a descriptor that is not open: the write fails with EBADF
    with pytest.raises(StorageError, match="refuses every later write"):
        committer.submit(*FRAMES["int"][1]).result(timeout=30)
    wal._fd = fd
    with pytest.raises(StorageError, match="refuses every later write"):
        committer.submit(*FRAMES["int"][2]).result(timeout=30)
    committer.close()
    wal.close()
    assert [r.lsn for r in replayed(tmp_path)] == [1]


def test_on_durable_failure_fails_the_futures_but_the_records_are_durable(tmp_path: Path) -> None:
    wal = opened(tmp_path)

    def explode(records: list[Record]) -> None:
        raise RuntimeError("engine down")

    committer = GroupCommitter(wal, on_durable=explode)
    with pytest.raises(RuntimeError, match="engine down"):
        committer.submit(*FRAMES["int"][0]).result(timeout=30)
    committer.close()
    wal.close()
    assert [r.lsn for r in replayed(tmp_path)] == [1]


def test_submit_after_close_fails(tmp_path: Path) -> None:
    committer = GroupCommitter(opened(tmp_path))
    committer.close()
    with pytest.raises(StorageError, match="closed"):
        committer.submit(*FRAMES["int"][0]).result(timeout=5)


def test_records_survive_rotation_and_retire_deletes_only_covered_segments(
    tmp_path: Path,
) -> None:
    wal = opened(tmp_path)
    committer = GroupCommitter(wal)
    for write in FRAMES["int"][:2]:
        committer.submit(*write)
    assert committer.rotate().result(timeout=30) == 3  # after the two submitted before it
    assert wal.rotate() == 3  # an empty current segment is kept, not doubled
    committer.submit(*FRAMES["int"][2]).result(timeout=30)
    assert wal.rotate() == 4
    for write in FRAMES["int"][3:]:
        committer.submit(*write).result(timeout=30)
    committer.close()
    names = [p.name for p in wal.segments]
    assert names == [f"wal-{lsn:020d}.log" for lsn in (1, 3, 4)]
    assert wal.retire(3) == 1  # segment 1 holds lsns 1-2 < 3; segment 3 holds lsn 3
    assert wal.retire(4) == 1
    assert wal.retire(100) == 0  # never the current segment
    assert [p.name for p in wal.segments] == [f"wal-{4:020d}.log"]
    assert wal.size_bytes == wal.segments[0].stat().st_size
    wal.close()
    records = replayed(tmp_path, after=3)
    assert [r.lsn for r in records] == [4, 5]
    assert same(records[0], 4, FRAMES["int"][3]) and same(records[1], 5, FRAMES["int"][4])


def test_replay_skips_segments_a_snapshot_covers(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    wal.append(FRAMES["int"][:2])
    wal.rotate()
    wal.append(FRAMES["int"][2:])
    wal.close()
    first = wal.segments[0]
    first.write_bytes(b"garbage")  # never read: the snapshot covers it
    assert [r.lsn for r in replayed(tmp_path, after=2)] == [3, 4, 5]


def test_a_log_that_ends_before_the_snapshot_continues_after_it(tmp_path: Path) -> None:
    wal = opened(tmp_path)
    wal.append(FRAMES["int"][:2])
    wal.close()
    wal = opened(tmp_path, after=10)  # the log was cut back (moved away) behind a snapshot
    assert wal.next_lsn == 11
    assert [r.lsn for r in wal.append(FRAMES["int"][:1])] == [11]
    wal.close()
    assert [r.lsn for r in replayed(tmp_path, after=10)] == [11]


def test_a_tmp_segment_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    (tmp_path / "wal").mkdir()
    leftover = tmp_path / "wal" / f"wal-{1:020d}.log.tmp"
    leftover.write_bytes(b"FLW")
    wal = opened(tmp_path)
    assert not leftover.exists() and wal.next_lsn == 1


def test_copy_keeps_the_log_readable(tmp_path: Path) -> None:
    """A copied data directory (a backup) replays the same records."""
    written_log(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert [r.lsn for r in replayed(tmp_path / "b")] == [1, 2, 3, 4, 5]
