"""A durable live collection: the live engine, its write-ahead log and snapshots, compaction.

Threads and futures only (no asyncio, no sockets). Three threads touch it:
- the engine thread (the batcher's): searches, and every change to the engine;
- the WAL's committer: it writes and fsyncs a group of records, then applies them to the
  engine *through the engine thread* and waits, so records apply in lsn order, between
  searches, before any of them is acknowledged (read-your-writes: an acknowledged write is
  in every later batch);
- the compactor: it builds a new base and snapshot off the engine thread.

Compaction, and why a crash anywhere in it is safe
--------------------------------------------------
1. Rotate the log: later records go to a new segment starting at lsn R. The rotation is
   queued behind every record already submitted, and each of those is applied before the
   committer moves on, so once R is known the engine holds exactly the records < R.
2. In the engine thread, freeze the live set at lsn R - 1 (`plan_compaction`).
3. Off the engine thread, build the new base and write snapshot R - 1 (write, fsync, rename,
   fsync the directory: snapshot.py).
4. In the engine thread, swap the new base in (records applied since the freeze move over).
5. Retire the segments whose records are all < R, then older snapshots.
A crash before 3 completes leaves the old snapshot and every segment: recovery replays them.
After 3 and before 5, recovery takes snapshot R - 1 and replays only records >= R (replay
skips older ones). After 5 nothing older is needed. No step rewrites a file in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .engine import Engine, unit_queries
from .errors import StorageError
from .keys import Key
from .live_engine import CompactionPlan, LiveEngine
from .settings import CollectionSettings
from .snapshot import Bands, Fill, retire_snapshots, write_snapshot
from .wal import GroupCommitter, Record, WriteAheadLog

log = logging.getLogger("flasma_ws")

T = TypeVar("T")
# The compactor's own CPU work (gathers, copies, checksums, tracing) runs at this nice value,
# so that when both CPUs are busy the searches and the committer's applies go first: at
# nice 0 a compaction's build delayed write acknowledgements by up to 90 ms (docs/benchmarks.md,
# "b on a quiet disk"). Nice 10 still leaves it about a tenth of a busy CPU, so it finishes.
COMPACTOR_NICE = 10
RunInEngine = Callable[[Callable[[], Any]], "Future[Any]"]


@dataclass
class CollectionStats:
    """What /metrics and /info read."""

    compactions: int = 0
    last_compaction_seconds: float = 0.0
    last_compaction_at: float | None = None  # time.time()


class Collection:
    def __init__(
        self,
        engine: LiveEngine,
        directory: Path,
        wal: WriteAheadLog,
        settings: CollectionSettings,
        max_rows: int,
    ) -> None:
        self.engine, self.directory, self.wal = engine, Path(directory), wal
        self.settings, self.max_rows = settings, max_rows
        self.stats = CollectionStats()
        self.imported = False  # whether this start imported --npy or the demo set
        self._run_in_engine: RunInEngine | None = None
        self._results: dict[int, tuple[int, int]] = {}
        self._committer: GroupCommitter | None = None
        self._wake = threading.Event()
        self._closing = False
        self._compactor: threading.Thread | None = None
        self._reserved = 0  # new keys submitted, not yet applied: counted against max_rows

    def start(self, run_in_engine: RunInEngine) -> None:
        """Begin taking writes; `run_in_engine(fn)` runs fn in the engine thread."""
        self._run_in_engine = run_in_engine
        self._committer = GroupCommitter(self.wal, self._apply_durable)
        self._compactor = threading.Thread(target=self._compact_loop, name="flasma-compact")
        self._compactor.daemon = True
        self._compactor.start()

    # -- writes (any thread) -------------------------------------------------------------
    def room(self) -> int:
        return self.max_rows - self.engine.n - self._reserved

    def write(
        self, upsert_keys: list[Key], vectors: np.ndarray, delete_keys: list[Key], new: int = 0
    ) -> Future[tuple[int, int]]:
        """Log, fsync, apply; resolves to (upserted, deleted) once every later search sees it.
        `vectors` are raw rows (finite, non-zero): they are normalized here, once, and the
        log holds what the engine holds."""
        assert self._committer is not None, "start() first"
        rows = unit_queries(vectors) if len(upsert_keys) else vectors.astype(np.float32)
        done: Future[tuple[int, int]] = Future()
        try:
            logged = self._committer.submit(upsert_keys, rows, delete_keys)
        except StorageError as exc:
            done.set_exception(exc)
            return done
        self._reserved += new

        def settle(future: Future[int]) -> None:
            self._reserved -= new
            error = future.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(self._results.pop(future.result()))

        logged.add_done_callback(settle)
        return done

    def get(self, keys: list[Key]) -> Future[list[np.ndarray | None]]:
        return self._engine_call(lambda: self.engine.get(keys))

    def _engine_call(self, fn: Callable[[], T]) -> Future[T]:
        assert self._run_in_engine is not None
        return self._run_in_engine(fn)

    def _apply_durable(self, records: list[Record]) -> None:
        """In the committer thread: apply a durable group in the engine thread, and wait."""

        def apply() -> None:
            for r in records:
                self._results[r.lsn] = self.engine.apply(
                    r.lsn, r.upsert_keys, r.vectors, r.delete_keys
                )

        self._engine_call(apply).result()
        if self._due():
            self._wake.set()

    # -- compaction (its own thread) -----------------------------------------------------
    def _due(self) -> bool:
        e, s = self.engine, self.settings
        changed = max(e.appended, e.base_dead)
        return changed >= s.compact_min_rows and changed >= s.compact_fraction * e.base.n

    def _compact_loop(self) -> None:
        _lower_priority(COMPACTOR_NICE)
        while not self._closing:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            if not self._due():  # woken during the last compaction, which took those rows
                continue
            try:
                self.compact()
            except Exception:  # the collection keeps serving from the old base
                log.exception("Compaction failed; the server keeps serving from the old base.")

    def compact(self) -> None:
        """Steps 1-5 of the module docstring (callable directly, e.g. by tests)."""
        assert self._committer is not None
        if not self.engine.n:
            return  # nothing live to build a base from; deletions stay masked
        phases: dict[str, float] = {}
        started = last = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            phases[name], last = now - last, now

        first_new = self._committer.rotate().result()
        plan = self._engine_call(self.engine.plan_compaction).result()
        lap("freeze")
        base = self.engine.build_base(plan)
        lap("build")
        write_snapshot(
            self.directory,
            plan.lsn,
            self.engine.dim,
            self.engine.key_type,  # type: ignore[arg-type]
            int(plan.positions.size),
            self._snapshot_rows(plan, base),
            plan.keys,
        )
        lap("snapshot")
        self._engine_call(lambda: self.engine.swap(plan, base)).result()
        lap("swap")
        self.wal.retire(min(first_new, plan.lsn + 1))
        retire_snapshots(self.directory, plan.lsn)
        lap("retire")
        seconds = time.perf_counter() - started
        self.stats.compactions += 1
        self.stats.last_compaction_seconds = seconds
        self.stats.last_compaction_at = time.time()
        log.info(
            "Compacted %d live rows into a new base and snapshot %d in %.2f s (%s).",
            plan.positions.size,
            plan.lsn,
            seconds,
            ", ".join(f"{name} {1000 * t:.0f} ms" for name, t in phases.items()),
        )

    def _snapshot_rows(self, plan: CompactionPlan, base: Engine) -> Fill | Bands:
        """The new base's host slabs, written in paced bands; else the old segments, read a
        second time into the snapshot's memory map (a GPU or narrow base)."""
        read = base.host_rows()
        if read is not None:
            return Bands(read)
        rows = self.engine.planned_rows(plan)
        return lambda out: rows.fill_columns(out, 0)

    def close(self) -> None:
        """Stop compacting and committing (queued writes are written first)."""
        self._closing = True
        self._wake.set()
        if self._committer is not None:
            self._committer.close()
        if self._compactor is not None:
            self._compactor.join(timeout=60)
        self.wal.close()

    def describe(self) -> dict[str, object]:
        s = self.stats
        return {
            "data_dir": str(self.directory),
            "key_type": self.engine.key_type,
            "max_rows": self.max_rows,
            "compactions": s.compactions,
            "last_compaction_at": s.last_compaction_at,
            "last_compaction_seconds": s.last_compaction_seconds,
        }


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux keeps a nice value per thread; elsewhere
    this leaves it as it is)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
