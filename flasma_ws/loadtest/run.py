"""One load run: the loops that send, the recorder that counts, and the phases (warm-up,
measurement, drain) with their time limits.

Closed loop: each connection keeps `inflight` requests outstanding (one coroutine per slot; no
task per request). Open loop: each connection sends at rate/connections, constant or Poisson;
latency is then measured from the request's scheduled time, so a slow server cannot hide its
delay by slowing the sender (no coordinated omission). With --write-ratio, a share of the
requests are upserts (writes.py), sent and timed the same way.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..client import ConnectionLost, TopK
from ..errors import ServerError
from .config import Arrival, LoadConfig
from .remote import ServerCounters, scrape
from .transport import CONNECTION_ERROR, Transport, exchange, outcome
from .workload import Workload
from .writes import Upsert, Writer, upsert_outcome

PROGRESS_EVERY_S = 0.5
DRAIN_GRACE_S = 10.0  # after the last send, how long answers still in flight may take
WRITE = -1  # next_frame's answer when the next request is a write


@dataclass(frozen=True, slots=True)
class TimedAnswer:
    """A search answer kept for --verify under writes: its frame, when it was sent (or in an
    open loop scheduled, which is earlier) and when its answer had arrived."""

    frame: int
    sent: float
    answered: float
    result: TopK


@dataclass(frozen=True)
class LiveStatus:
    """What a run is doing now, every PROGRESS_EVERY_S, for a live status line."""

    elapsed_s: float
    qps: float
    in_flight: int
    errors: int
    phase: str  # "warmup", "measure" or "drain"


@dataclass
class Recorder:
    """Counts and latencies; only requests sent during the measured phase are recorded."""

    multi: int
    latencies: list[float] = field(default_factory=list)  # seconds per request (frame)
    errors: Counter[str] = field(default_factory=Counter)  # queries by error code
    sent: int = 0  # queries sent while measuring
    answered: int = 0  # queries answered with a result while measuring
    in_flight: int = 0  # requests (frames), any phase
    done_total: int = 0  # queries answered or failed, any phase (for the live rate)
    errors_total: int = 0
    last_done: float = 0.0
    closed: bool = False  # after shutdown, failures are ours, not the server's

    def started(self, measured: bool) -> None:
        self.in_flight += 1
        if measured:
            self.sent += self.multi

    def ok(self, measured: bool, latency_s: float, now: float) -> None:
        self.in_flight -= 1
        self.done_total += self.multi
        if measured:
            self.answered += self.multi
            self.latencies.append(latency_s)
            self.last_done = now

    def failed(self, measured: bool, code: str, now: float) -> None:
        self.in_flight -= 1
        if self.closed:
            return
        self.done_total += self.multi
        self.errors_total += self.multi
        if measured:
            self.errors[code] += self.multi
            self.last_done = now


class Run:
    """Shared state of one run: phase, the frame counter, and answers kept for --verify."""

    def __init__(
        self,
        config: LoadConfig,
        workload: Workload,
        on_progress: Callable[[LiveStatus], None] | None = None,
        writer: Writer | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.on_progress = on_progress
        self.workload = workload
        self.recorder = Recorder(workload.multi)
        self.measuring = False
        self.stopped = False
        self.started_at = time.perf_counter()
        self.measure_start = 0.0
        self.deadline = self.started_at + config.time_limit_s
        self._next = 0
        self._budget = math.ceil(config.count / workload.multi) if config.count else None
        self.captured: dict[int, TopK] = {}
        # With writes, --verify checks a uniform sample of all answers (reservoir sampling),
        # each with its times: the rows live when it ran depend on when that was.
        self.timed: list[TimedAnswer] = []
        self._answers_seen = 0
        self._sample = random.Random(config.seed)

    def next_frame(self) -> int | None:
        """The index of the next frame to send, or None once the run stops sending."""
        if self.stopped:
            return None
        if self.measuring and self._budget is not None:
            if self._budget == 0:
                self.stopped = True
                return None
            self._budget -= 1
        if self.writer is not None and self.writer.due():
            return WRITE
        index = self._next
        self._next += 1
        return index % len(self.workload.frames)

    def capture(self, frame: int, result: TopK, sent: float) -> None:
        if self.writer is not None:
            self._keep_timed(TimedAnswer(frame, sent, time.perf_counter(), result))
        elif frame < self.workload.verify_frames and frame not in self.captured:
            self.captured[frame] = result

    def _keep_timed(self, answer: TimedAnswer) -> None:
        """Algorithm R: after n answers, each is in the sample with probability size/n."""
        size = self.workload.verify_frames
        self._answers_seen += 1
        if len(self.timed) < size:
            self.timed.append(answer)
        elif size:
            slot = self._sample.randrange(self._answers_seen)
            if slot < size:
                self.timed[slot] = answer

    def finish(
        self, frame: int, measured: bool, since: float, code: str, result: TopK | None
    ) -> None:
        """Record one answer, a result or an error code; latency counts from `since` (the
        send, or in an open loop the scheduled time)."""
        now = time.perf_counter()
        if result is None:
            self.recorder.failed(measured, code, now)
        else:
            self.recorder.ok(measured, now - since, now)
            self.capture(frame, result, since)

    def finish_write(self, upsert: Upsert, future: asyncio.Future[dict[str, Any]]) -> None:
        """Record a write's answer (or failure); after shutdown a failure is not counted."""
        assert self.writer is not None
        code = write_outcome(future)
        self.writer.settle(upsert, code, counted=code == "ok" or not self.recorder.closed)


def write_outcome(future: asyncio.Future[dict[str, Any]]) -> str:
    """ "ok", or the error code of a finished write."""
    if future.cancelled():
        return CONNECTION_ERROR
    exc = future.exception()
    if exc is None:
        return upsert_outcome(future.result())
    return exc.code if isinstance(exc, ServerError) else CONNECTION_ERROR


async def send_upsert(
    run: Run, transport: Transport, measured: bool, due: float | None = None
) -> asyncio.Future[dict[str, Any]] | None:
    """Send the next upsert; its answer is recorded when it arrives. None: not sent."""
    assert run.writer is not None
    upsert = run.writer.begin(measured, due)
    try:
        future = await transport.send_write("upsert", [upsert.key], upsert.vector[None])
    except ConnectionLost:
        run.writer.settle(upsert, CONNECTION_ERROR, counted=not run.recorder.closed)
        return None
    future.add_done_callback(lambda f: run.finish_write(upsert, f))
    return future


async def _closed(run: Run, transport: Transport) -> None:
    """One in-flight slot of a connection: send, wait for the answer, repeat."""
    while (frame := run.next_frame()) is not None:
        measured = run.measuring
        if frame == WRITE:
            future = await send_upsert(run, transport, measured)
            if future is not None:
                await asyncio.wait([future])
            continue
        run.recorder.started(measured)
        sent = time.perf_counter()
        code, result = await exchange(transport, frame)
        run.finish(frame, measured, sent, code, result)


def _intervals(rate: float, arrival: Arrival, seed: int) -> Callable[[], float]:
    if arrival == "constant":
        return lambda: 1.0 / rate
    rng = random.Random(seed)
    return lambda: rng.expovariate(rate)


async def _open_sender(
    run: Run,
    send: Callable[[int, bool, float], Awaitable[None]],
    rate: float,
    offset: float,
    seed: int,
) -> None:
    """Send frames on schedule: everything due goes out at once, then sleep to the next one."""
    interval = _intervals(rate, run.config.arrival, seed)
    clock = time.perf_counter
    due = clock() + offset
    while True:
        wait = due - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        while due <= clock():
            frame = run.next_frame()
            if frame is None:
                return
            await send(frame, run.measuring, due)
            due += interval()


def _open_send(run: Run, transport: Transport) -> Callable[[int, bool, float], Awaitable[None]]:
    """Send one frame without waiting; its answer is recorded when it arrives."""
    recorder = run.recorder

    async def send(frame: int, measured: bool, due: float) -> None:
        if frame == WRITE:
            await send_upsert(run, transport, measured, due)  # timed from `due` too
            return
        recorder.started(measured)
        try:
            future = await transport.send(frame)
        except ConnectionLost:
            recorder.failed(measured, CONNECTION_ERROR, time.perf_counter())
            return
        # Latency from the scheduled time, not the send: a late sender shows the delay.
        future.add_done_callback(lambda f: run.finish(frame, measured, due, *outcome(f)))

    return send


def workers(run: Run, connections: list[Transport]) -> list[asyncio.Task[None]]:
    """Closed loop: `inflight` slots per connection; open loop: one scheduled sender each."""
    config, loop = run.config, asyncio.get_running_loop()
    if config.rate is None:
        return [
            loop.create_task(_closed(run, t)) for t in connections for _ in range(config.inflight)
        ]
    rate = config.rate / config.multi / config.connections  # frames/s per connection
    return [
        # Staggered starts spread constant-rate senders evenly over each interval.
        loop.create_task(
            _open_sender(
                run, _open_send(run, t), rate, i / (rate * config.connections), config.seed + i
            )
        )
        for i, t in enumerate(connections)
    ]


async def _live_status(run: Run, on_progress: Callable[[LiveStatus], None]) -> None:
    recorder, last_done, last_time = run.recorder, 0, time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.perf_counter()
        rate = (recorder.done_total - last_done) / max(now - last_time, 1e-9)
        last_done, last_time = recorder.done_total, now
        phase = "drain" if run.stopped else ("measure" if run.measuring else "warmup")
        on_progress(
            LiveStatus(now - run.started_at, rate, recorder.in_flight, recorder.errors_total, phase)
        )


@dataclass
class Measured:
    wall_s: float  # from the start of measurement to the last answer
    cpu_share: float  # client process CPU time over wall time (1.0 = one core busy)
    counters: ServerCounters | None
    timed_out: bool


async def _control(
    run: Run, tasks: list[asyncio.Task[None]], http: httpx.AsyncClient, base: str
) -> Measured:
    """Run the workers through `_measure` with live status; stop them all whatever happens."""
    status = None
    if run.on_progress is not None:
        status = asyncio.get_running_loop().create_task(_live_status(run, run.on_progress))
    try:
        return await _measure(run, tasks, http, base)
    finally:
        run.stopped = True
        for task in [*tasks, *filter(None, [status])]:
            task.cancel()
        await asyncio.gather(*tasks, *filter(None, [status]), return_exceptions=True)


async def _measure(
    run: Run, tasks: list[asyncio.Task[None]], http: httpx.AsyncClient, base: str
) -> Measured:
    """Warm up, measure (time- or count-bound), drain.

    Sending stops at the run's time limit at the latest; answers still in flight then get
    DRAIN_GRACE_S more, so a run never takes longer than time_limit_s + DRAIN_GRACE_S.
    """
    if run.config.warmup_s:
        await _wait(tasks, min(run.config.warmup_s, run.deadline - time.perf_counter()))
    before = await scrape(http, base)
    run.measuring = True
    run.measure_start, cpu_start = time.perf_counter(), time.process_time()
    hit_limit = await _send_until_stopped(run, tasks)
    sending_ended = time.perf_counter()
    drained = await _drain(run, tasks, sending_ended + DRAIN_GRACE_S)
    cpu_s, cpu_wall_s = time.process_time() - cpu_start, time.perf_counter() - run.measure_start
    end = max(run.recorder.last_done, _last_write(run)) or sending_ended
    after = await scrape(http, base)
    counters = after - before if before is not None and after is not None else None
    wall_s = max(end - run.measure_start, 1e-9)
    return Measured(wall_s, cpu_s / cpu_wall_s, counters, hit_limit or not drained)


async def _send_until_stopped(run: Run, tasks: list[asyncio.Task[None]]) -> bool:
    """The measured phase, until its duration, its count or the time limit; then stop
    sending. True if the time limit cut it short."""
    measured_s = run.config.measured_s
    stop_at = (
        run.deadline if measured_s is None else min(run.measure_start + measured_s, run.deadline)
    )
    await _wait(tasks, stop_at - time.perf_counter())
    hit_limit = stop_at == run.deadline and not all(t.done() for t in tasks)
    run.stopped = True
    return hit_limit


async def _drain(run: Run, tasks: list[asyncio.Task[None]], until: float) -> bool:
    """Wait until `until` at most for the senders to end and the answers in flight (an open
    loop's) to arrive; True if everything did."""
    await _wait(tasks, until - time.perf_counter())
    while _in_flight(run) > 0 and time.perf_counter() < until:
        await asyncio.sleep(0.005)
    return all(t.done() for t in tasks) and _in_flight(run) == 0


def _in_flight(run: Run) -> int:
    """Requests sent and not answered: searches and writes."""
    writes = run.writer.recorder.in_flight if run.writer is not None else 0
    return run.recorder.in_flight + writes


def _last_write(run: Run) -> float:
    return run.writer.recorder.last_done if run.writer is not None else 0.0


async def _wait(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    if tasks and timeout > 0:
        await asyncio.wait(tasks, timeout=timeout)
    elif timeout > 0:
        await asyncio.sleep(timeout)


@asynccontextmanager
async def connected(run: Run, connections: list[Transport]) -> AsyncIterator[list[Transport]]:
    """Every connection open for the run; closed after it, whatever happens."""
    try:
        await asyncio.gather(*(t.open() for t in connections))
        yield connections
    finally:
        run.recorder.closed = True  # failures of requests we abandon are not the server's
        await asyncio.gather(*(t.close() for t in connections), return_exceptions=True)


async def drive(
    run: Run, connections: list[Transport], http: httpx.AsyncClient, base: str
) -> Measured:
    """The run's load over open connections: its measurement."""
    return await _control(run, workers(run, connections), http, base)


async def fill_unsent(run: Run, transport: Transport) -> None:
    """Ask for the frames to verify that the load never sent (a short run, a tiny --count)."""
    for frame in range(run.workload.verify_frames):
        if frame not in run.captured:
            run.captured[frame] = await (await transport.send(frame))


async def fill_timed(run: Run, transport: Transport) -> None:
    """With writes: searches after the load until the sample to verify is full."""
    frame = 0
    while len(run.timed) < run.workload.verify_frames:
        sent = time.perf_counter()
        result = await (await transport.send(frame))
        run.timed.append(TimedAnswer(frame, sent, time.perf_counter(), result))
        frame = (frame + 1) % len(run.workload.frames)
