"""The global dynamic batcher: the only bridge between the event loop and the engine thread.

Every connection (and POST /cos) submits here. One engine thread computes one batch at a
time; while it does, new requests gather, and the moment it finishes the next batch (up to
max_batch query rows) is handed over before the previous answers are sent. An idle server
runs a lone request at once; `max_wait_ms` trades latency for fuller batches.
A sharded engine (shards.py) takes `in_flight` batches at once, each in its own engine
thread, so that the shards compute one batch while the front end merges and answers another.
A request whose rows span several batches is answered once, when its last rows come back.

Fair to every client: each submitter (`Owner`, one connection) is a flow of the
`FairQueue`, batches are formed by round-robin over the flows that have work, oldest first
within each, and a full queue refuses the flow that holds the most rows, never a flow
within its fair share (fair_queue.py proves both).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from . import protocol
from .errors import EngineError, Overloaded, ShardsUnavailable
from .fair_queue import FairQueue, Slice
from .metrics import Metrics
from .settings import BatcherSettings
from .text import counted

__all__ = ["Answer", "Batcher", "Failure", "Overloaded", "Owner", "SearchEngine"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class SearchEngine(Protocol):
    max_k: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class Owner(Protocol):
    """Whoever submitted a request, hashable: its flow in the fair queue. Requests of an
    owner that is gone are skipped."""

    @property
    def alive(self) -> bool: ...

    def __hash__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str


Answer = Callable[["tuple[np.ndarray, np.ndarray] | Failure"], None]


@dataclass(slots=True, eq=False)
class Pending:
    """One submitted request of `count` query rows, answered once all rows are computed."""

    vectors: np.ndarray
    k: int
    deadline: float
    answer: Answer
    owner: Owner | None
    count: int = field(init=False)  # query rows, from vectors
    queued_at: float = field(init=False)  # time.monotonic() when submitted
    started: int = 0  # rows already handed to the engine
    finished: int = 0
    rows: np.ndarray | None = None
    scores: np.ndarray | None = None
    failed: Failure | None = None

    def __post_init__(self) -> None:
        self.count = int(self.vectors.shape[0])
        self.queued_at = time.monotonic()

    def allocate(self, dtype: Any = np.int64) -> None:
        """The answer's arrays (int64 row numbers or keys, or str keys: object). With several
        batches in flight they are made on the event loop before any batch holding the
        request's rows runs: the batches then only write their own rows of them."""
        if self.rows is None:
            self.rows = np.empty((self.count, self.k), dtype)
            self.scores = np.empty((self.count, self.k), np.float32)

    def store(self, start: int, rows: np.ndarray, scores: np.ndarray) -> None:
        self.allocate(rows.dtype)
        assert self.rows is not None and self.scores is not None
        self.rows[start : start + rows.shape[0]] = rows[:, : self.k]
        self.scores[start : start + rows.shape[0]] = scores[:, : self.k]


@dataclass
class Batch:
    slices: list[Slice[Pending]] = field(default_factory=list)  # rows start..stop of requests
    rows: int = 0


Running = tuple[Batch, "asyncio.Future[list[Failure | None]]"]  # a batch in the engine thread
INTERNAL_MESSAGE = "The server failed on this request."
EVICTED_MESSAGE = (
    "The server is at capacity and this connection holds the most queued queries; retry shortly."
)


class Batcher:
    def __init__(
        self,
        engine: SearchEngine,
        metrics: Metrics,
        settings: BatcherSettings,
        max_batch: int,
        in_flight: int = 1,
    ) -> None:
        """`max_batch` is the engine's (settings.engine.max_batch): the rows it was sized for;
        `in_flight` the batches the engine may compute at once (1 but for a sharded engine)."""
        self.engine = engine
        self.in_flight = in_flight
        # A sharded engine waits for its shards until the batch's deadline (shards.py).
        self._takes_deadline = bool(getattr(engine, "takes_deadline", False))
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = settings.max_wait_ms / 1000
        self._queue: FairQueue[Pending] = FairQueue(settings.queue_size)
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(in_flight, thread_name_prefix="flasma-engine")
        self._task: asyncio.Task[None] | None = None

    # -- submitting (event loop) --------------------------------------------------------
    def submit(
        self,
        vectors: np.ndarray,
        k: int,
        deadline: float,
        answer: Answer,
        owner: Owner | None = None,
    ) -> None:
        """Queue a request; raises Overloaded when the queue cannot take all its rows and
        its owner is over its fair share (else the heaviest flow's newest requests make room,
        answered `overloaded`)."""
        count = vectors.shape[0]
        self._make_room(owner, count)
        self._queue.push(owner, Pending(vectors, k, deadline, answer, owner))
        self._set_depth()
        self._idle.clear()
        self._work.set()

    def _make_room(self, owner: Owner | None, count: int) -> None:
        evicted = self._queue.make_room(owner, count)
        if evicted is None:
            raise Overloaded(
                f"The server is at capacity ({counted(self._queue.rows, 'query', 'queries')} "
                f"queued, limit {self._queue.capacity}) and this connection holds more than its "
                "share; retry shortly."
            )
        for pending in evicted:
            pending.answer(Failure(protocol.OVERLOADED, EVICTED_MESSAGE))

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(self._queue.rows)
        self.metrics.active_flows.set(self._queue.active_flows)

    def run_in_engine_thread(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` in the engine thread, between batches (any thread may call this): how
        writes reach the engine, so that a batch sees each write entirely or not at all."""
        return self._executor.submit(fn)

    @property
    def queued(self) -> int:
        return self._queue.rows

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flasma-batcher")

    async def drain(self) -> None:
        """Wait until every queued request has been answered."""
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # -- the loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        running: list[Running] = []
        while True:
            if not running:
                await self._work.wait()
                if self.max_wait_s and self._queue.rows < self.max_batch:
                    await self._gather_more()
                self._fill(running)
            else:
                finished = await self._next_finished(running)
                # Hand the engine its next batch before spending loop time on answers.
                self._fill(running)
                for batch, future in finished:
                    self._deliver(batch, self._failures(batch, future))
            if not running and not self._queue.rows:
                self._idle.set()

    async def _next_finished(self, running: list[Running]) -> list[Running]:
        """Wait until a running batch finishes (or, with a free slot, until work comes);
        take the finished ones out of `running`."""
        waits: set[asyncio.Future[Any]] = {future for _, future in running}
        work: asyncio.Future[Any] | None = None
        if len(running) < self.in_flight:
            work = asyncio.ensure_future(self._work.wait())
            waits.add(work)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if work is not None and not work.done():
            work.cancel()
        finished = [item for item in running if item[1].done()]
        running[:] = [item for item in running if not item[1].done()]
        return finished

    def _failures(self, batch: Batch, future: asyncio.Future[list[Failure | None]]) -> list:
        try:
            return future.result()
        except Exception:  # _compute answers its own failures; this is a bug guard
            log.exception("The engine thread raised unexpectedly.")
            return [Failure(protocol.INTERNAL, INTERNAL_MESSAGE)] * len(batch.slices)

    def _fill(self, running: list[Running]) -> None:
        """Start batches while the engine has room for them and requests wait."""
        while len(running) < self.in_flight:
            launched = self._launch(self._take())
            if launched is None:
                return
            running.append(launched)

    def _launch(self, batch: Batch | None) -> Running | None:
        """Start computing `batch` in an engine thread (None: nothing to start)."""
        if batch is None:
            return None
        if self.in_flight > 1:  # a sharded engine's rows: int64
            for s in batch.slices:
                s.request.allocate()
        loop = asyncio.get_running_loop()
        return batch, loop.run_in_executor(self._executor, self._compute, batch)

    async def _gather_more(self) -> None:
        deadline = time.monotonic() + self.max_wait_s
        while self._queue.rows < self.max_batch and (left := deadline - time.monotonic()) > 0:
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), left)
            except asyncio.TimeoutError:
                break

    def _take(self) -> Batch | None:
        """Up to max_batch rows, fairly over the flows; skips requests of gone owners and
        expired ones."""
        now = time.monotonic()
        slices = self._queue.take(self.max_batch, lambda pending: self._still_due(pending, now))
        batch = Batch(slices, sum(s.stop - s.start for s in slices))
        for s in slices:
            if s.start == 0:  # a request's first rows: how long it waited for the engine
                self.metrics.queue_wait_seconds.observe(now - s.request.queued_at)
        self._set_depth()
        if not self._queue.rows:
            self._work.clear()
        return batch if batch.slices else None

    def _still_due(self, pending: Pending, now: float) -> bool:
        """False (and answered or counted) for a request whose owner left or whose deadline
        passed before it ran."""
        if pending.owner is not None and not pending.owner.alive:
            self.metrics.skipped.inc(pending.count)
        elif now > pending.deadline:
            pending.answer(Failure(protocol.TIMEOUT, "The deadline passed before the query ran."))
        else:
            return True
        return False

    # -- the engine thread -------------------------------------------------------------
    def _compute(self, batch: Batch) -> list[Failure | None]:
        """Runs in the engine thread: one search for the whole batch, split on failure."""
        vectors = np.concatenate([s.request.vectors[s.start : s.stop] for s in batch.slices])
        k = max(s.request.k for s in batch.slices)
        started = time.perf_counter()
        try:
            rows, scores, ok = self._search_split(vectors, k, self._deadline(batch))
        except ShardsUnavailable as exc:
            return self._unavailable(batch, exc)
        self.metrics.engine_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(batch.rows)
        failures: list[Failure | None] = []
        offset = 0
        for s in batch.slices:
            width = s.stop - s.start
            if ok[offset : offset + width].all():
                s.request.store(
                    s.start, rows[offset : offset + width], scores[offset : offset + width]
                )
                failures.append(None)
            else:
                failures.append(Failure(protocol.INTERNAL, "The engine failed on this query."))
            offset += width
        return failures

    def _deadline(self, batch: Batch) -> float | None:
        """The latest deadline among the batch's requests: shards are waited for while any
        of them can still use the answer."""
        if not self._takes_deadline:
            return None
        return max(s.request.deadline for s in batch.slices)

    def _unavailable(self, batch: Batch, exc: ShardsUnavailable) -> list[Failure | None]:
        """A shard did not answer: every request of the batch fails whole, `timeout` where its
        deadline passed, else the engine's code (no split: the other half would wait too)."""
        log.warning("A batch of %d queries failed: %s", batch.rows, exc)
        now = time.monotonic()
        return [
            Failure(protocol.TIMEOUT, "The deadline passed before the shards answered.")
            if now > s.request.deadline
            else Failure(exc.code, str(exc))
            for s in batch.slices
        ]

    def _search_split(
        self, vectors: np.ndarray, k: int, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Search; if the engine fails (out of memory, say), retry each half on its own."""
        try:
            if deadline is None:
                rows, scores = self.engine.search(vectors, k)
            else:
                rows, scores = self.engine.search(vectors, k, deadline=deadline)  # type: ignore[call-arg]
            return rows, scores, np.ones(len(vectors), bool)
        except ShardsUnavailable:
            raise
        except EngineError as exc:
            log.warning("The engine failed on %d queries: %s", len(vectors), exc)
        except Exception:
            log.exception("Unexpected engine failure on %d queries.", len(vectors))
        if len(vectors) == 1:  # nothing left to split: this query fails alone
            return np.zeros((1, k), np.int64), np.zeros((1, k), np.float32), np.zeros(1, bool)
        half = len(vectors) // 2
        first = self._search_split(vectors[:half], k, deadline)
        second = self._search_split(vectors[half:], k, deadline)
        return tuple(np.concatenate(pair) for pair in zip(first, second))  # type: ignore[return-value]

    # -- answering (event loop) --------------------------------------------------------
    def _deliver(self, batch: Batch, failures: list[Failure | None]) -> None:
        for s, failure in zip(batch.slices, failures):
            pending = s.request
            pending.finished += s.stop - s.start
            if failure is not None and pending.failed is None:
                pending.failed = failure
            if pending.finished < pending.count:
                continue
            if pending.owner is not None and not pending.owner.alive:
                continue  # its connection is gone: nobody to answer
            try:
                if pending.failed is not None:
                    pending.answer(pending.failed)
                else:
                    assert pending.rows is not None and pending.scores is not None
                    pending.answer((pending.rows, pending.scores))
            except Exception:
                log.exception("Answering a request failed.")
