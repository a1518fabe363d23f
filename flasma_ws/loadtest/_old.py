"""The load generator behind `flasma-ws loadtest`, built on the Python client (flasma_ws.client).

Closed loop: each connection keeps `inflight` requests outstanding (one coroutine per slot; no
task per request). Open loop: each connection sends at rate/connections, constant or Poisson;
latency is then measured from the request's scheduled time, so a slow server cannot hide its
delay by slowing the sender (no coordinated omission).

Frames are encoded once before the run (`client.prepare`); each send only prepends the id.
`--verify` compares sampled answers with a float64 brute force over the server's matrix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from .client import Client, ConnectionLost, Prepared, TopK, http_url, prepare
from .errors import ConfigError, FlasmaError, ServerError
from .reference import check_answer, unit_rows
from .text import counted

Arrival = Literal["constant", "poisson"]
SWEEP_PARAMS = ("connections", "inflight", "rate")
PERCENTILES = (50, 90, 95, 99)
MIN_POOL = 1024  # distinct random queries cycled through during a run
CONNECTION_ERROR = "connection"  # errors-by-code key for a lost or refused connection
PROGRESS_EVERY_S = 0.5
DRAIN_GRACE_S = 10.0  # after the last send, how long answers still in flight may take


@dataclass(frozen=True)
class LoadConfig:
    url: str
    connections: int = 1
    inflight: int = 1
    rate: float | None = None  # total queries/s: open loop; None: closed loop
    arrival: Arrival = "constant"
    duration_s: float | None = None  # measured time; with neither this nor count: 10 s
    count: int | None = None  # measured queries
    warmup_s: float = 0.0
    k: int | None = None
    binary: bool = False
    multi: int = 1  # queries per frame; 1 = single-query frames
    queries: Path | None = None
    http: bool = False
    verify: int = 0
    npy: Path | None = None
    seed: int = 0
    token: str | None = None  # Bearer token of a server started with --token
    time_limit_s: float = 300.0  # cap on the sending time of one run, warm-up included

    def __post_init__(self) -> None:
        checks = [
            (self.connections >= 1, "--connections must be at least 1."),
            (self.inflight >= 1, "--inflight must be at least 1."),
            (self.rate is None or self.rate > 0, "--rate must be positive."),
            (self.arrival in ("constant", "poisson"), "--arrival is constant or poisson."),
            (self.duration_s is None or self.duration_s > 0, "--duration must be positive."),
            (self.count is None or self.count >= 1, "--count must be at least 1."),
            (self.warmup_s >= 0, "--warmup must not be negative."),
            (self.k is None or self.k >= 1, "--k must be at least 1."),
            (not self.binary or (self.k or 0) <= 65_535, "--k is at most 65535 with --binary."),
            (1 <= self.multi <= 65_535, "--multi must be from 1 to 65535."),
            (self.verify >= 0, "--verify must not be negative."),
            (self.time_limit_s > 0, "--time-limit must be positive."),
            (not (self.http and self.binary), "--binary frames are WebSocket only; drop --http."),
            (not (self.http and self.multi > 1), "--multi frames are WebSocket only; drop --http."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def measured_s(self) -> float | None:
        """The measured duration; None when only --count bounds the run."""
        if self.duration_s is None and self.count is None:
            return 10.0
        return self.duration_s

    @property
    def mode(self) -> str:
        return "http" if self.http else ("ws-binary" if self.binary else "ws-json")

    def replace(self, **changes: Any) -> LoadConfig:
        return dataclasses.replace(self, **changes)


# -- the server --------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    ws_url: str
    http_url: str
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])


def http_base(ws_url: str) -> str:
    """The server's HTTP base URL (for /info, /metrics, /cos) from --url."""
    try:
        return http_url(ws_url)
    except ValueError as exc:
        raise ConfigError(f"--url must look like ws://HOST:PORT/ws; got {ws_url!r}.") from exc


def http_client(token: str | None = None) -> httpx.AsyncClient:
    """One keep-alive connection; trust_env=False: no proxies, contact the given URL only."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False, headers=headers)


async def probe(url: str, token: str | None = None) -> Target:
    """GET /info of the server behind `url`; a one-line FlasmaError when it cannot be used."""
    base = http_base(url)
    async with http_client(token) as http:
        try:
            response = await http.get(f"{base}/info", timeout=5.0)
        except httpx.HTTPError as exc:
            raise FlasmaError(f"Cannot reach {base}/info: {exc or type(exc).__name__}.") from exc
    if response.status_code == 401:
        raise FlasmaError(f"{base}/info answered HTTP 401: pass the server's --token.")
    if response.status_code != 200:
        raise FlasmaError(f"{base}/info answered HTTP {response.status_code}; is it flasma-ws?")
    info = response.json()
    if info.get("state") != "ready" or "dim" not in info:
        raise FlasmaError(f"The server at {base} is {info.get('state', 'not ready')}; retry later.")
    return Target(url, base, info)


@dataclass(frozen=True)
class ServerCounters:
    batch_sum: float = 0.0
    batch_count: float = 0.0
    engine_sum: float = 0.0
    engine_count: float = 0.0

    def __sub__(self, before: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a - b for a, b in zip(_values(self), _values(before))))


def _values(counters: ServerCounters) -> tuple[float, ...]:
    return dataclasses.astuple(counters)


async def scrape(http: httpx.AsyncClient, base: str) -> ServerCounters | None:
    """Batch-size and engine-time sums from /metrics; None when they cannot be read."""
    try:
        response = await http.get(f"{base}/metrics", timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.labels
    }
    return ServerCounters(
        samples.get("flasma_batch_size_sum", 0.0),
        samples.get("flasma_batch_size_count", 0.0),
        samples.get("flasma_engine_seconds_sum", 0.0),
        samples.get("flasma_engine_seconds_count", 0.0),
    )


# -- queries -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The query pool (rows × dim) and its frames: frame j holds rows [j*multi, (j+1)*multi)."""

    queries: np.ndarray
    frames: list[Prepared] | list[bytes]  # bytes: POST /cos bodies
    multi: int
    verify_frames: int  # frames 0..verify_frames-1 hold the rows to verify


def load_queries(path: Path, dim: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--queries {path} is not a readable .npy file: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim:
        shape = getattr(array, "shape", "?")
        raise ConfigError(f"--queries {path} has shape {shape}; the server needs (Q, {dim}).")
    if array.shape[0] == 0:
        raise ConfigError(f"--queries {path} holds no rows.")
    return np.ascontiguousarray(array, dtype=np.float32)


def build_workload(config: LoadConfig, dim: int) -> Workload:
    if config.queries is not None:
        queries = load_queries(config.queries, dim)
    else:
        rows = max(MIN_POOL, config.verify, 8 * config.multi)
        rng = np.random.default_rng(config.seed)
        queries = rng.standard_normal((rows, dim), dtype=np.float32)
    multi = config.multi
    padded = math.ceil(len(queries) / multi) * multi
    if padded != len(queries):  # wrap around so every frame is full
        queries = queries[np.arange(padded) % len(queries)]
    frames: list[Prepared] | list[bytes]
    if config.http:
        frames = [_cos_body(q, config.k) for q in queries]
    elif multi == 1:
        frames = [prepare(q, config.k, binary=config.binary) for q in queries]
    else:
        frames = [
            prepare(queries[i : i + multi], config.k, multi=True, binary=config.binary)
            for i in range(0, padded, multi)
        ]
    verify_rows = min(config.verify, len(queries))
    return Workload(queries, frames, multi, math.ceil(verify_rows / multi))


def _cos_body(query: np.ndarray, k: int | None) -> bytes:
    body: dict[str, Any] = {"embedding": query}
    if k is not None:
        body["k"] = k
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


# -- one run -----------------------------------------------------------------------------
@dataclass
class Progress:
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
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.config = config
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

    def next_frame(self) -> int | None:
        """The index of the next frame to send, or None once the run stops sending."""
        if self.stopped:
            return None
        if self.measuring and self._budget is not None:
            if self._budget == 0:
                self.stopped = True
                return None
            self._budget -= 1
        index = self._next
        self._next += 1
        return index % len(self.workload.frames)

    def capture(self, frame: int, result: TopK) -> None:
        if frame < self.workload.verify_frames and frame not in self.captured:
            self.captured[frame] = result

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
            self.capture(frame, result)


Exchange = Callable[[Any], Awaitable[tuple[str, TopK | None]]]  # a frame -> (code, result)


async def _closed(run: Run, exchange: Exchange) -> None:
    """One in-flight slot of a connection: send, wait for the answer, repeat."""
    frames = run.workload.frames
    while (frame := run.next_frame()) is not None:
        measured = run.measuring
        run.recorder.started(measured)
        sent = time.perf_counter()
        code, result = await exchange(frames[frame])
        run.finish(frame, measured, sent, code, result)


def _ws_exchange(client: Client) -> Exchange:
    async def exchange(prepared: Prepared) -> tuple[str, TopK | None]:
        try:
            return "ok", await client.submit(prepared)
        except ServerError as exc:
            return exc.code, None
        except ConnectionLost:
            return CONNECTION_ERROR, None

    return exchange


class HttpConnection:
    """One keep-alive HTTP/1.1 connection for POST /cos.

    Requests wait their turn on a FIFO lock rather than in httpx's pool, whose waiting list
    gets slow with hundreds of waiters (an open loop beyond capacity collapsed to 25 q/s).
    """

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.client = http_client(token)
        self.lock = asyncio.Lock()

    async def post(self, body: bytes) -> tuple[str, TopK | None]:
        """("ok", result) or (error code, None)."""
        async with self.lock:
            try:
                response = await self.client.post(self.url, content=body, headers=_JSON)
            except httpx.HTTPError:
                return CONNECTION_ERROR, None
        answer = orjson.loads(response.content)
        if response.status_code == 200:
            return "ok", TopK.from_pairs(answer["result"])
        error = answer.get("error") if isinstance(answer, dict) else None
        return (error or {}).get("code", f"http_{response.status_code}"), None

    async def aclose(self) -> None:
        await self.client.aclose()


_JSON = {"content-type": "application/json"}


def _intervals(rate: float, arrival: Arrival, seed: int) -> Callable[[], float]:
    if arrival == "constant":
        return lambda: 1.0 / rate
    rng = random.Random(seed)
    return lambda: rng.expovariate(rate)


async def _open_sender(
    run: Run, send: Callable[[int, bool, float], Any], rate: float, offset: float, seed: int
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


def _ws_open_send(run: Run, client: Client) -> Callable[[int, bool, float], Any]:
    recorder = run.recorder
    clock = time.perf_counter

    async def send(frame: int, measured: bool, due: float) -> None:
        recorder.started(measured)
        try:
            future = await client.send(run.workload.frames[frame])  # type: ignore[arg-type]
        except ConnectionLost:
            recorder.failed(measured, CONNECTION_ERROR, clock())
            return
        future.add_done_callback(lambda f: _open_done(run, f, frame, measured, due))

    return send


def _open_done(
    run: Run, future: asyncio.Future[TopK], frame: int, measured: bool, due: float
) -> None:
    if future.cancelled():
        run.finish(frame, measured, due, CONNECTION_ERROR, None)
        return
    exc = future.exception()
    if exc is None:
        run.finish(frame, measured, due, "ok", future.result())  # from the scheduled time
    else:
        code = exc.code if isinstance(exc, ServerError) else CONNECTION_ERROR
        run.finish(frame, measured, due, code, None)


def _http_open_send(
    run: Run, connection: HttpConnection, tasks: set[asyncio.Task[None]]
) -> Callable[[int, bool, float], Any]:
    recorder = run.recorder

    async def one(frame: int, measured: bool, due: float) -> None:
        code, result = await connection.post(run.workload.frames[frame])  # type: ignore[arg-type]
        run.finish(frame, measured, due, code, result)

    async def send(frame: int, measured: bool, due: float) -> None:
        recorder.started(measured)
        # httpx has no send-without-waiting; an open loop needs a task per request here.
        task = asyncio.get_running_loop().create_task(one(frame, measured, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return send


async def _progress(run: Run, on_progress: Callable[[Progress], None]) -> None:
    recorder, last_done, last_time = run.recorder, 0, time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.perf_counter()
        rate = (recorder.done_total - last_done) / max(now - last_time, 1e-9)
        last_done, last_time = recorder.done_total, now
        phase = "drain" if run.stopped else ("measure" if run.measuring else "warmup")
        on_progress(
            Progress(now - run.started_at, rate, recorder.in_flight, recorder.errors_total, phase)
        )


@dataclass
class Measured:
    wall_s: float  # from the start of measurement to the last answer
    cpu_share: float  # client process CPU time over wall time (1.0 = one core busy)
    counters: ServerCounters | None
    timed_out: bool


async def _control(
    run: Run,
    workers: list[asyncio.Task[Any]],
    extra: set[asyncio.Task[None]],
    http: httpx.AsyncClient,
    base: str,
) -> Measured:
    """Run the workers through `_measure` with live progress; stop them all whatever happens."""
    progress = None
    if run.on_progress is not None:
        progress = asyncio.get_running_loop().create_task(_progress(run, run.on_progress))
    try:
        return await _measure(run, workers, extra, http, base)
    finally:
        run.stopped = True
        if progress is not None:
            progress.cancel()
        for task in [*workers, *extra]:
            task.cancel()
        await asyncio.gather(*workers, *extra, *filter(None, [progress]), return_exceptions=True)


async def _measure(
    run: Run,
    workers: list[asyncio.Task[Any]],
    extra: set[asyncio.Task[None]],
    http: httpx.AsyncClient,
    base: str,
) -> Measured:
    """Warm up, measure (time- or count-bound), drain.

    Sending stops at the run's time limit at the latest; answers still in flight then get
    DRAIN_GRACE_S more, so a run never takes longer than time_limit_s + DRAIN_GRACE_S.
    """
    config = run.config
    if config.warmup_s:
        await _wait(workers, min(config.warmup_s, run.deadline - time.perf_counter()))
    before = await scrape(http, base)
    run.measuring = True
    run.measure_start, cpu_start = time.perf_counter(), time.process_time()
    measured_s = config.measured_s
    stop_at = (
        run.deadline if measured_s is None else min(run.measure_start + measured_s, run.deadline)
    )
    await _wait(workers, stop_at - time.perf_counter())
    hit_limit = stop_at == run.deadline and not all(w.done() for w in workers)
    run.stopped = True
    sending_ended = time.perf_counter()
    drain_until = sending_ended + DRAIN_GRACE_S  # answers in flight get a bounded grace
    await _wait(workers, drain_until - sending_ended)
    while extra and time.perf_counter() < drain_until:  # open-loop HTTP requests
        await _wait(list(extra), drain_until - time.perf_counter())
    while run.recorder.in_flight > 0 and time.perf_counter() < drain_until:  # open-loop WS
        await asyncio.sleep(0.005)
    timed_out = hit_limit or not all(w.done() for w in workers) or run.recorder.in_flight > 0
    cpu_s, cpu_wall_s = time.process_time() - cpu_start, time.perf_counter() - run.measure_start
    end = run.recorder.last_done or sending_ended
    after = await scrape(http, base)
    counters = after - before if before is not None and after is not None else None
    return Measured(max(end - run.measure_start, 1e-9), cpu_s / cpu_wall_s, counters, timed_out)


async def _wait(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    if tasks and timeout > 0:
        await asyncio.wait(tasks, timeout=timeout)
    elif timeout > 0:
        await asyncio.sleep(timeout)


# -- drivers: who sends ------------------------------------------------------------------
class WsDriver:
    """`connections` WebSocket clients; closed-loop slots or open-loop senders on each."""

    def __init__(self, run: Run, target: Target) -> None:
        self.run = run
        self.extra: set[asyncio.Task[None]] = set()
        config = run.config
        self.clients = [
            Client(target.ws_url, binary=config.binary, connect_attempts=2, token=config.token)
            for _ in range(config.connections)
        ]

    async def __aenter__(self) -> WsDriver:
        try:
            await asyncio.gather(*(c.connect() for c in self.clients))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.run.recorder.closed = True  # failures of requests we abandon are not the server's
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    def workers(self) -> list[asyncio.Task[None]]:
        run, config, loop = self.run, self.run.config, asyncio.get_running_loop()
        if config.rate is None:
            return [
                loop.create_task(_closed(run, _ws_exchange(c)))
                for c in self.clients
                for _ in range(config.inflight)
            ]
        rate = config.rate / config.multi / config.connections  # frames/s per connection
        return [
            # Staggered starts spread constant-rate senders evenly over each interval.
            loop.create_task(
                _open_sender(
                    run,
                    _ws_open_send(run, c),
                    rate,
                    i / (rate * config.connections),
                    config.seed + i,
                )
            )
            for i, c in enumerate(self.clients)
        ]

    async def request(self, frame: int) -> TopK:
        return await self.clients[0].submit(self.run.workload.frames[frame])  # type: ignore[arg-type]


class HttpDriver:
    """POST /cos over `connections` keep-alive HTTP connections, one httpx client each."""

    def __init__(self, run: Run, target: Target) -> None:
        self.run = run
        url = f"{target.http_url}/cos"
        self.connections = [
            HttpConnection(url, run.config.token) for _ in range(run.config.connections)
        ]
        self.extra: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HttpDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.run.recorder.closed = True
        await asyncio.gather(*(c.aclose() for c in self.connections), return_exceptions=True)

    def workers(self) -> list[asyncio.Task[None]]:
        run, config, loop = self.run, self.run.config, asyncio.get_running_loop()
        if config.rate is None:  # `inflight` slots take turns on each connection
            return [
                loop.create_task(_closed(run, c.post))
                for c in self.connections
                for _ in range(config.inflight)
            ]
        rate = config.rate / config.connections
        return [
            loop.create_task(
                _open_sender(
                    run, _http_open_send(run, c, self.extra), rate, i / config.rate, config.seed + i
                )
            )
            for i, c in enumerate(self.connections)
        ]

    async def request(self, frame: int) -> TopK:
        code, result = await self.connections[0].post(self.run.workload.frames[frame])  # type: ignore[arg-type]
        if result is None:
            raise ServerError(code, "a --verify query failed")
        return result


async def run_once(
    config: LoadConfig,
    target: Target,
    reference: Reference | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """One load run against a probed server; returns its report (see `build_report`)."""
    run = Run(config, build_workload(config, target.dim), on_progress)
    async with http_client() as http:  # for /metrics
        driver = HttpDriver(run, target) if config.http else WsDriver(run, target)
        async with driver:
            measured = await _control(run, driver.workers(), driver.extra, http, target.http_url)
            verification = None
            if reference is not None:
                for frame in range(run.workload.verify_frames):  # those the load never sent
                    if frame not in run.captured:
                        run.captured[frame] = await driver.request(frame)
                verification = reference.check(run, config.k or int(target.info["top_k"]))
    return build_report(config, run.recorder, measured, verification)


# -- verification ------------------------------------------------------------------------
class Reference:
    """The server's matrix in float64 on this host, to check answers exactly."""

    def __init__(self, targets: Any) -> None:
        from .vectors import load_matrix

        self.matrix = load_matrix(targets).astype(np.float64)
        self.rows = targets.source.n  # row numbers in answers are those of the file
        self.keep: np.ndarray | None = targets.keep

    @classmethod
    def for_server(cls, info: dict[str, Any], npy: Path | None) -> Reference:
        """The demo set /info describes, or `npy` (legacy files need /info's dim)."""
        from .vectors import open_npy, open_targets, prepare

        demo = info.get("demo")
        drop_zero = bool(info.get("drop_zero", False))
        if npy is None:
            if not demo:
                raise ConfigError(
                    f"--verify needs --npy FILE: the server serves {info.get('source')}, "
                    "not a demo set."
                )
            targets = open_targets(None, demo["dim"], demo["size"], demo["seed"], drop_zero)
        else:
            # /info's dim reads a legacy file; an (N, dim) file keeps its own, compared below.
            source = open_npy(npy, int(info["dim"]), dim_for_legacy_only=True)
            targets = prepare(source, drop_zero)
        if (targets.n, targets.dim) != (info["n"], info["dim"]):
            raise ConfigError(
                f"The reference has {targets.n} vectors of dim {targets.dim}, but the server "
                f"serves {info['n']} of dim {info['dim']}; pass the server's own file to --npy."
            )
        return cls(targets)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Float64 cosine scores (B, rows); rows the server skipped score -inf."""
        q = unit_rows(queries)
        kept = q @ self.matrix.T
        if self.keep is None:
            return kept
        full = np.full((len(q), self.rows), -np.inf)
        full[:, self.keep] = kept
        return full

    def check(self, run: Run, k: int) -> dict[str, Any]:
        workload = run.workload
        count = min(run.config.verify, len(workload.queries))
        ids, scores = _gather_answers(run.captured, workload.verify_frames, workload.multi)
        ids, scores = ids[:count], scores[:count]
        k = min(k, len(self.matrix))
        problems: list[str] = []
        recalls = []
        for start in range(0, count, 256):  # bounded memory: 256 x N float64 at a time
            ref = self.scores(workload.queries[start : min(start + 256, count)])
            for b in range(len(ref)):
                row = start + b
                recall, problem = check_answer(ref[b], ids[row], scores[row], k)
                recalls.append(recall)
                if problem:
                    problems.append(f"query {row}: {problem}")
        return {
            "verified": count,
            "recall": float(np.mean(recalls)) if recalls else None,
            "exact": not problems,
            "inexact": len(problems),
            "examples": problems[:5],
        }


def _gather_answers(
    captured: dict[int, TopK], frames: int, multi: int
) -> tuple[np.ndarray, np.ndarray]:
    if multi == 1:
        return (
            np.stack([captured[f].ids for f in range(frames)]),
            np.stack([captured[f].scores for f in range(frames)]),
        )
    return (
        np.concatenate([captured[f].ids for f in range(frames)]),
        np.concatenate([captured[f].scores for f in range(frames)]),
    )


# -- reports -----------------------------------------------------------------------------
def build_report(
    config: LoadConfig, recorder: Recorder, measured: Measured, verification: dict[str, Any] | None
) -> dict[str, Any]:
    latencies = np.array(recorder.latencies) * 1000.0
    latency = {f"p{p}": _percentile(latencies, p) for p in PERCENTILES}
    latency["max"] = float(latencies.max()) if latencies.size else None
    latency["mean"] = float(latencies.mean()) if latencies.size else None
    counters = measured.counters
    errors = dict(sorted(recorder.errors.items()))
    result: dict[str, Any] = {
        "url": config.url,
        "mode": config.mode,
        "loop": "closed" if config.rate is None else "open",
        "connections": config.connections,
        "inflight": config.inflight if config.rate is None else None,
        "rate": config.rate,
        "arrival": config.arrival if config.rate is not None else None,
        "multi": config.multi,
        "k": config.k,
        "duration_s": round(measured.wall_s, 4),
        "sent": recorder.sent,
        "answered": recorder.answered,
        "unanswered": recorder.sent - recorder.answered - sum(errors.values()),
        "throughput_qps": recorder.answered / measured.wall_s,
        "latency_ms": latency,
        "errors": errors,
        "mean_batch_size": _ratio(counters, "batch_sum", "batch_count"),
        "mean_engine_ms": _scaled(_ratio(counters, "engine_sum", "engine_count"), 1000.0),
        "client_cpu_percent": 100.0 * measured.cpu_share,
        "timed_out": measured.timed_out,
    }
    if verification is not None:
        result.update(verification)
    return result


def _percentile(values: np.ndarray, p: float) -> float | None:
    return float(np.percentile(values, p)) if values.size else None


def _ratio(counters: ServerCounters | None, total: str, count: str) -> float | None:
    if counters is None or not getattr(counters, count):
        return None
    return getattr(counters, total) / getattr(counters, count)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def nothing_answered(result: dict[str, Any]) -> bool:
    """True if some run sent queries and got not a single result back."""
    points = result.get("points", [result])
    return any(point["sent"] and not point["answered"] for point in points)


def is_exact(result: dict[str, Any]) -> bool:
    """False if any verified answer (of any sweep point) was not exact."""
    points = result.get("points", [result])
    return all(point.get("exact", True) for point in points)


# -- entry points ------------------------------------------------------------------------
def parse_sweep(text: str) -> tuple[str, list[float]]:
    """ "connections=1,4,16,64" -> ("connections", [1, 4, 16, 64])."""
    name, _, values = text.partition("=")
    name = name.strip()
    if name not in SWEEP_PARAMS or not values:
        raise ConfigError(
            f"--sweep must look like connections=1,4,16 (one of {', '.join(SWEEP_PARAMS)}); "
            f"got {text!r}."
        )
    try:
        parsed = [float(v) if name == "rate" else int(v) for v in values.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--sweep {name} values must be numbers; got {values!r}.") from exc
    return name, parsed


async def run_load(
    config: LoadConfig,
    sweep: tuple[str, list[float]] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Probe the server, then one run (its report) or a sweep ({"sweep", "values", "points"})."""
    target = await probe(config.url, config.token)
    reference = Reference.for_server(target.info, config.npy) if config.verify else None
    server = {key: target.info.get(key) for key in ("n", "dim", "dtype", "device", "max_batch")}
    if sweep is None:
        result = await run_once(config, target, reference, on_progress)
        return {**result, "server": server}
    name, values = sweep
    points = []
    for value in values:
        point = await run_once(config.replace(**{name: value}), target, reference, on_progress)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return {"sweep": name, "values": values, "server": server, "points": points}


# -- presentation ------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in errors.items()) or "0"


def report_table(result: dict[str, Any]) -> Any:
    """A rich Table: one row per run (a sweep has one per point); latencies in ms."""
    from rich.table import Table

    points = result.get("points", [result])
    verifying = any("recall" in p for p in points)
    table = Table(title=_title(result), title_justify="left")
    table.add_column("run")
    for name in ("q/s", "p50", "p90", "p95", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column("errors")
    for name in ("batch", "engine", "cpu %", *(["recall"] if verifying else [])):
        table.add_column(name, justify="right")
    for p in points:
        lat = p["latency_ms"]
        row = [
            _run_label(p),
            f"{p['throughput_qps']:,.0f}",
            *(_ms(lat[key]) for key in ("p50", "p90", "p95", "p99", "max")),
            _errors_text(p["errors"]),
            _ms(p["mean_batch_size"]),
            _ms(p["mean_engine_ms"]),
            f"{p['client_cpu_percent']:.0f}",
        ]
        if verifying:
            recall = p.get("recall")
            mark = "" if p.get("exact", True) else " NOT EXACT"
            row.append(("-" if recall is None else f"{recall:.4f}") + mark)
        table.add_row(*row)
    return table


def _run_label(point: dict[str, Any]) -> str:
    """E.g. "ws-json c=16 w=4 q=8": mode, connections, in flight (or rate), queries per frame."""
    rate = point["rate"]
    load = f"{rate:g}/s {point['arrival']}" if rate else f"w={point['inflight']}"
    multi = f" q={point['multi']}" if point["multi"] > 1 else ""
    return f"{point['mode']} c={point['connections']} {load}{multi}"


def _title(result: dict[str, Any]) -> str:
    server = result.get("server") or {}
    points = result.get("points", [result])
    sent = sum(p["sent"] for p in points)
    unanswered = sum(p["unanswered"] for p in points)
    title = (
        f"{points[0]['url']}: {server.get('n')} x {server.get('dim')} on "
        f"{server.get('device')}; {counted(sent, 'query', 'queries')} sent; "
        "latency, engine time in ms"
    )
    if unanswered:
        title += f", {unanswered:,} unanswered"
    if any(p["timed_out"] for p in points):
        title += " (time limit reached)"
    return title


def progress_text(progress: Progress) -> str:
    return (
        f"{progress.phase:<8} {progress.elapsed_s:6.1f} s  {progress.qps:9,.0f} q/s  "
        f"{progress.in_flight:6d} in flight  {counted(progress.errors, 'error')}"
    )


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'flasma-ws[plot]' (or drop --plot)."
        ) from exc


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput (x) against p99 latency (y), one labelled point per run."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    points = [p for p in result.get("points", [result]) if p["latency_ms"]["p99"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    x = [p["throughput_qps"] for p in points]
    y = [p["latency_ms"]["p99"] for p in points]
    axes.plot(x, y, marker="o")
    name = result.get("sweep")
    for p, xi, yi in zip(points, x, y):
        label = f"{name}={p[name]:g}" if name else p["mode"]
        axes.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("throughput (queries/s)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_title(f"flasma-ws loadtest ({points[0]['mode'] if points else ''})")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
