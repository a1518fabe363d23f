"""The sharded engine: the matrix split over Ray actors, with the one engine's `search` contract.

The front end (this process: sockets, the batcher, fairness, drain) stays as it is; behind the
batcher, `ShardedEngine.search` sends each batch to every shard at once and merges their
answers exactly (shard_merge.py proves the merge): the same rows, in the same order, as one
engine over the whole matrix. A small batch (under 100 KiB) goes over each shard's direct lane
(shard_direct.py: a socket beside Ray, which skips Ray's ~1 ms round trip), or by value in
Ray calls where a lane is missing or breaks; a larger one is put into Ray's object store once.
Shards are actors of shard_actor.py that load their own contiguous rows from the same file
path or demo seed.

Faults. Actors are created with `max_restarts` (--shard-restarts) and unlimited task retries:
when a shard's process dies, Ray starts it again (it reloads its rows) and re-runs the calls
that were in flight, so a caller sees a delay, not an error. This engine adds the deadline:
`search` waits for the shards until the batch's deadline (the latest of its requests') and
then raises `ShardsUnavailable` with `timeout`; a shard that is gone for good (its restarts
spent) or that Ray cannot reach is retried while the deadline allows, then `unavailable`.
A batch is answered whole or not at all: never a partial or a wrong answer.
A monitor thread probes every shard (a concurrency group of its own, so probes pass a running
search): a shard whose probe goes unanswered is `reloading` and the service is `degraded`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import protocol
from .errors import ConfigError, EngineError, ShardsUnavailable
from .settings import Settings
from .shard_direct import Lane, LaneBroken
from .shard_direct import connect as connect_lane
from .shard_merge import merge_top_k

log = logging.getLogger("flasma_ws")

RAY_MISSING = "--shards needs Ray, which is not installed: pip install 'flasma-ws[ray]'."
# Without it Ray advertises (and binds to) this machine's outside address even for a local
# Ray; with it a local Ray listens on 127.0.0.1 only. Read by Ray when it is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PROBE_INTERVAL_S = 0.25
PROBE_GRACE_S = 1.0  # a probe unanswered for longer: the shard is reloading (or gone)
RETRY_PAUSE_S = 0.05
RAY_INLINE_BYTES = 100 * 1024  # Ray's own limit (max_direct_call_object_size)
INLINE_BYTES = 1024 * 1024  # the copies of all calls together, up to which they go by value
NAMESPACE = "flasma-ws"


def import_ray(loopback: bool = False) -> Any:
    """Ray, or a ConfigError saying how to install it. `loopback`: a local Ray to be started
    here listens on 127.0.0.1 only (effective when Ray is first imported)."""
    if loopback:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def start_local_ray(num_cpus: int | None = None, object_store_mib: int | None = None) -> None:
    """A Ray on this machine only, without its dashboard (also what the tests start)."""
    ray = import_ray(loopback=True)
    ray.init(
        address="local",  # a new Ray of our own, even where another runs on this machine
        num_cpus=num_cpus,
        object_store_memory=object_store_mib and object_store_mib * 1024 * 1024,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,  # shard processes log TensorFlow's start-up: keep it in Ray's logs
        configure_logging=False,
    )
    address = ray.get_runtime_context().gcs_address
    if not address.startswith("127.0.0.1:"):
        log.warning("The local Ray listens on %s, not on 127.0.0.1 only.", address)


def row_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal row ranges, in order."""
    if not 1 <= shards <= n:
        raise ConfigError(f"--shards must be from 1 to the {n} rows served, got {shards}.")
    return [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]


def shard_threads(cpus: float) -> int:
    """A shard's BLAS and TensorFlow threads for `cpus` reserved CPUs: as Ray's own rule for
    OMP_NUM_THREADS, the whole CPUs, at least one. Measured (docs/scale-out.md): one shard
    over 200,000 x 100 on a 2-core VM, batch 1, cost +3.65 ms over one engine with 2 BLAS
    threads against +4.86 ms with 1; batch 128 with TensorFlow's pool sized so, +4.40
    against +7.46 ms."""
    return max(math.floor(cpus), 1)


def file_rows(settings: Settings) -> int:
    """Rows of the file (its header only) or of the demo set: what the ranges split."""
    if settings.npy is None:
        return int(settings.demo_size)
    from .vectors import open_npy

    return open_npy(settings.npy, settings.dim).n


@dataclass
class Shard:
    """The front end's view of one shard actor."""

    index: int
    start: int
    stop: int
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)  # its last `describe`
    status: str = "loading"  # loading, ready, reloading, dead
    restarts: int = 0
    probe: Any = None  # the ObjectRef of the probe in flight
    probe_sent: float = 0.0

    def public(self) -> dict[str, Any]:
        """Its entry in /info."""
        keys = ("n", "device", "node", "host", "pid", "load_seconds", "zero_rows", "threads")
        return {
            "shard": self.index,
            "rows": [self.start, self.stop],
            "status": self.status,
            "restarts": self.restarts,
            **{key: self.info.get(key) for key in keys},
        }


@dataclass(frozen=True)
class ShardedTargets:
    """What the rest of the service reads of `engine.targets`."""

    n: int
    dim: int
    zero_rows: int


class ShardMetrics:
    """Per-shard series, registered in the service's registry once the engine is assembled."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from .metrics import LATENCY_BUCKETS_S

        self.call_seconds = Histogram(
            "flasma_shard_call_seconds",
            "A shard's own search time per batch, by shard.",
            ["shard"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.fanout_seconds = Histogram(
            "flasma_shard_fanout_seconds",
            "Per batch, from the queries sent to every shard's answer merged.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.restarts = Counter(
            "flasma_shard_restarts",
            "Times a shard's actor came back.",
            ["shard"],
            registry=registry,
        )
        self.up = Gauge(
            "flasma_shard_up", "1 while a shard answers probes.", ["shard"], registry=registry
        )
        self.batches = Counter(
            "flasma_shard_batches",
            "Batches sent to the shards, by the way they went: lane (a socket to each shard) "
            "or ray (actor calls).",
            ["way"],
            registry=registry,
        )


class ShardedEngine:
    """The matrix over `settings.shards` Ray actors; `search` as Engine's, plus a deadline."""

    takes_deadline = True  # the batcher passes each batch's deadline to `search`
    key_type = "int"  # answers are the file's row numbers (--keys is refused with --shards)

    def __init__(self, settings: Settings, progress: Any = None) -> None:
        self.settings = settings
        self.in_flight = settings.shard_inflight
        self.timeout_s = settings.timeout_ms / 1000  # for calls that give no deadline
        self._owns_ray = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._metrics: ShardMetrics | None = None
        self.shards: list[Shard] = []
        self._lane_key = secrets.token_bytes(32)  # only this front end talks to its shards
        self._lanes: dict[int, Lane | None] = {}
        self._laneless: dict[int, str] = {}  # shard -> the incarnation no lane reached
        self._ray = import_ray(loopback=settings.ray_address is None)
        try:
            self._connect()
            self._start_shards()
            self._wait_loaded(progress)
        except BaseException:
            self.close()
            raise
        first = self.shards[0].info
        self.n = sum(s.info["n"] for s in self.shards)
        self.dim = int(first["dim"])
        self.max_k = min(settings.max_k, self.n)
        self.targets = ShardedTargets(
            self.n, self.dim, sum(s.info["zero_rows"] for s in self.shards)
        )
        self.device = f"{len(self.shards)} Ray shards ({first['device']})"
        self._monitor = threading.Thread(target=self._watch, name="flasma-shards", daemon=True)
        self._monitor.start()

    # -- start-up ----------------------------------------------------------------------
    def _connect(self) -> None:
        ray, s = self._ray, self.settings
        if ray.is_initialized():  # a Ray this process already runs (tests, embedding)
            return
        self._owns_ray = True
        if s.ray_address is None:
            wanted = math.ceil(s.shards * s.shard_cpus)
            start_local_ray(s.ray_cpus or max(os.cpu_count() or 1, wanted), s.ray_object_store_mib)
            log.info("Started a local Ray on 127.0.0.1 for %d shards.", s.shards)
        else:
            ray.init(address=s.ray_address, namespace=NAMESPACE, log_to_driver=False)
            log.info("Connected to the Ray cluster at %s.", s.ray_address)

    def _start_shards(self) -> None:
        from .shard_actor import CONCURRENCY_GROUPS, ShardServer, ShardSpec

        ray, s = self._ray, self.settings
        gpus = s.shard_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(
            num_cpus=s.shard_cpus,
            num_gpus=gpus,
            max_restarts=s.shard_restarts,
            max_task_retries=-1 if s.shard_restarts else 0,
            concurrency_groups=CONCURRENCY_GROUPS,
        )(ShardServer)
        for index, (start, stop) in enumerate(row_ranges(file_rows(s), s.shards)):
            spec = ShardSpec(
                index=index,
                start=start,
                stop=stop,
                npy=None if s.npy is None else str(s.npy),
                dim=s.dim,
                demo_size=s.demo_size,
                demo_seed=s.demo_seed,
                drop_zero=s.drop_zero,
                engine=s.engine,
                tf_interop_threads=s.tf_interop_threads,
                threads=shard_threads(s.shard_cpus),
                lane_key=self._lane_key,
            )
            self.shards.append(Shard(index, start, stop, remote.remote(spec)))

    def _wait_loaded(self, progress: Any) -> None:
        """Every shard's first `describe`, checking `progress` (which raises to stop)."""
        ray = self._ray
        probes = {s.actor.describe.remote(): s for s in self.shards}
        while probes:
            ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0.5)
            for ref in ready:
                shard = probes.pop(ref)
                try:
                    shard.info = ray.get(ref)
                except self._ray.exceptions.RayError as exc:
                    raise EngineError(
                        f"Shard {shard.index} (rows {shard.start}..{shard.stop}) failed to "
                        f"load: {_cause(exc)}"
                    ) from None
                shard.status = "ready"
                self._renew_lane(shard)
                log.info(
                    "Shard %d: rows %d..%d on %s (%s), loaded in %.2f s.",
                    shard.index,
                    shard.start,
                    shard.stop,
                    shard.info["node"],
                    shard.info["device"],
                    shard.info["load_seconds"],
                )
            if progress is not None:
                progress(0)
        dims = {s.info["dim"] for s in self.shards}
        if len(dims) != 1:
            raise EngineError(f"The shards disagree on the dimension ({sorted(dims)}).")

    def attach_metrics(self, registry: Any) -> None:
        metrics = ShardMetrics(registry)
        for shard in self.shards:
            metrics.up.labels(str(shard.index)).set(shard.status == "ready")
            metrics.restarts.labels(str(shard.index))
        self._metrics = metrics

    def warmup(self, progress: Any = None) -> float:
        """One search through every shard (each shard warmed its own engine)."""
        started = time.perf_counter()
        self.search(np.ones((1, self.dim), np.float32), min(self.settings.top_k, self.max_k))
        return time.perf_counter() - started

    # -- search ------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) rows and scores, as Engine.search; `deadline` is a time.monotonic() by
        which to answer (default: now + --timeout-ms), else ShardsUnavailable."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EngineError(f"Queries must have shape (B, {self.dim}), got {queries.shape}.")
        if not 1 <= k <= self.max_k:
            raise EngineError(f"k must be between 1 and {self.max_k}, got {k}.")
        started = time.perf_counter()
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout_s
        queries = np.ascontiguousarray(queries, np.float32)
        answers = self._through_lanes(queries, k, deadline) if self._small(queries) else None
        way = "lane" if answers is not None else "ray"
        if answers is None:
            answers = self._gather(self._shipped(queries), k, deadline)
        rows, scores = merge_top_k([a.rows for a in answers], [a.scores for a in answers], k)
        if self._metrics is not None:
            self._metrics.batches.labels(way).inc()
            self._metrics.fanout_seconds.observe(time.perf_counter() - started)
            for shard, answer in zip(self.shards, answers):
                self._metrics.call_seconds.labels(str(shard.index)).observe(answer.seconds)
        return rows, scores

    def _small(self, queries: np.ndarray) -> bool:
        """Whether the batch goes by value: under Ray's inline limit (100 KiB), and all its
        copies together small."""
        size = queries.nbytes
        return size <= RAY_INLINE_BYTES and size * len(self.shards) <= INLINE_BYTES

    def _shipped(self, queries: np.ndarray) -> Any:
        """The queries as the shard calls take them: put into the object store once, or by
        value in each call where they are small (`_small`). On this 2-core VM a put and the
        shards' reads of it cost more than the copies: batch 128 x 100 to 2 shards took 4.8 ms
        put, 2.7 ms inline; to 8 shards 13.5 against 8.6 ms (docs/scale-out.md). Across nodes
        a put also travels once per node."""
        return queries if self._small(queries) else self._ray.put(queries)

    def _through_lanes(self, queries: np.ndarray, k: int, deadline: float) -> list[Any] | None:
        """Every shard's answer over its lane (shard_direct.py), or None where a lane is
        missing or breaks: the caller then sends the whole batch through Ray."""
        from .shard_actor import ShardAnswer

        lanes = [self._lanes.get(shard.index) for shard in self.shards]
        open_lanes = [lane for lane in lanes if lane is not None and not lane.broken]
        if len(open_lanes) < len(self.shards):
            return None
        try:
            futures = [lane.submit(queries, k) for lane in open_lanes]
        except LaneBroken:
            return None
        answers = []
        for shard, lane, future in zip(self.shards, open_lanes, futures, strict=True):
            try:
                answer = future.result(timeout=max(deadline - time.monotonic(), 0))
            except LaneBroken:
                return None
            except TimeoutError:
                raise ShardsUnavailable(
                    protocol.TIMEOUT,
                    f"Shard {shard.index} did not answer before the deadline; retry shortly.",
                ) from None
            except RuntimeError as exc:  # the shard's engine raised
                raise EngineError(f"Shard {shard.index} failed: {exc}") from None
            answers.append(
                ShardAnswer(answer.rows, answer.scores, lane.incarnation, answer.seconds)
            )
        return answers

    def _gather(self, ref: Any, k: int, deadline: float) -> list[Any]:
        """Every shard's answer, each call retried while the deadline allows."""
        ray = self._ray
        calls = {shard.actor.search.remote(ref, k): shard for shard in self.shards}
        answers: dict[int, Any] = {}
        while calls:
            left = deadline - time.monotonic()
            ready = ray.wait(list(calls), num_returns=len(calls), timeout=max(left, 0))[0]
            if not ready:
                self._give_up(calls)
                late = ", ".join(str(s.index) for s in calls.values())
                raise ShardsUnavailable(
                    protocol.TIMEOUT,
                    f"Shard {late} did not answer before the deadline (reloading?); retry shortly.",
                )
            for done in ready:
                shard = calls.pop(done)
                try:
                    answers[shard.index] = answer = ray.get(done)
                except ray.exceptions.RayActorError as exc:
                    calls[self._retry(shard, ref, k, deadline, exc)] = shard
                    continue
                except ray.exceptions.RayTaskError as exc:  # the engine itself failed
                    self._give_up(calls)
                    raise EngineError(f"Shard {shard.index} failed: {_cause(exc)}") from None
                self._note(shard, answer.incarnation)
        return [answers[shard.index] for shard in self.shards]

    def _retry(self, shard: Shard, ref: Any, k: int, deadline: float, exc: Exception) -> Any:
        """A new call to a shard Ray could not reach, if the deadline leaves time."""
        if time.monotonic() + RETRY_PAUSE_S >= deadline:
            raise ShardsUnavailable(
                protocol.UNAVAILABLE,
                f"Shard {shard.index} is unavailable ({_cause(exc)}); retry shortly.",
            )
        log.warning("Shard %d did not answer (%s); retrying.", shard.index, _cause(exc))
        time.sleep(RETRY_PAUSE_S)
        return shard.actor.search.remote(ref, k)

    def _give_up(self, calls: dict[Any, Shard]) -> None:
        for ref in calls:  # calls still queued at a shard need not run
            try:
                self._ray.cancel(ref)
            except Exception:  # noqa: BLE001 - cancelling is only an economy
                log.debug("Could not cancel a shard call.", exc_info=True)

    def get(self, keys: Any) -> Any:
        """Vectors by key (GET /vectors/KEY) are not read back from shards yet."""
        raise EngineError(
            "Reading vectors back by key is not available with --shards; read the file."
        )

    # -- health ------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        return any(shard.status != "ready" for shard in self.shards)

    def live_info(self) -> dict[str, object]:
        """The /info fields that change while serving (`lane`: whether the shard's direct
        lane is open)."""
        with self._lock:
            shards = [shard.public() for shard in self.shards]
        for entry in shards:
            lane = self._lanes.get(entry["shard"])
            entry["lane"] = lane is not None and not lane.broken
        return {"shards": shards}

    def _note(self, shard: Shard, incarnation: str) -> None:
        """A shard answered: count a restart when it answers from a new actor process."""
        with self._lock:
            known = shard.info.get("incarnation")
            if known is not None and incarnation != known:
                shard.restarts += 1
                shard.info["incarnation"] = incarnation
                if self._metrics is not None:
                    self._metrics.restarts.labels(str(shard.index)).inc()
                log.warning("Shard %d came back (restart %d).", shard.index, shard.restarts)

    def _watch(self) -> None:
        """Probe every shard each PROBE_INTERVAL_S: statuses, nodes and restarts for /info,
        /healthz and /metrics."""
        while not self._stop.wait(PROBE_INTERVAL_S):
            try:
                self._probe_all()
            except Exception:  # noqa: BLE001 - the monitor must outlive a failed probe
                log.exception("Probing the shards failed.")

    def _probe_all(self) -> None:
        ray, now = self._ray, time.monotonic()
        for shard in self.shards:
            if shard.probe is None:
                shard.probe, shard.probe_sent = shard.actor.describe.remote(), now
        probes = [shard.probe for shard in self.shards]
        ready = set(ray.wait(probes, num_returns=len(probes), timeout=PROBE_INTERVAL_S)[0])
        for shard in self.shards:
            status = shard.status
            if shard.probe in ready:
                try:
                    info = ray.get(shard.probe)
                except ray.exceptions.RayError as exc:
                    status = "dead" if isinstance(exc, ray.exceptions.ActorDiedError) else status
                    log.warning("Shard %d: %s", shard.index, _cause(exc))
                else:
                    self._note(shard, info["incarnation"])
                    with self._lock:
                        shard.info = info
                    self._renew_lane(shard)
                    status = "ready"
                shard.probe = None
            elif time.monotonic() - shard.probe_sent > PROBE_GRACE_S:
                status = "reloading"
            self._set_status(shard, status)

    def _renew_lane(self, shard: Shard) -> None:
        """A new lane where the shard has none, or a broken one, or one to an earlier
        incarnation; tried once per incarnation (a shard whose lane cannot be reached is
        served through Ray, without a retry every probe)."""
        incarnation = shard.info["incarnation"]
        lane = self._lanes.get(shard.index)
        if lane is not None and not lane.broken and lane.incarnation == incarnation:
            return
        if lane is None and self._laneless.get(shard.index) == incarnation:
            return
        if lane is not None:
            lane.close()
        lane = connect_lane(shard.info, self._lane_key)
        self._lanes[shard.index] = lane
        if lane is None:
            self._laneless[shard.index] = incarnation

    def _set_status(self, shard: Shard, status: str) -> None:
        if status == shard.status:
            return
        log.warning("Shard %d is %s.", shard.index, status)
        shard.status = status
        if self._metrics is not None:
            self._metrics.up.labels(str(shard.index)).set(status == "ready")

    # -- shutdown ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop probing, end the actors, and stop (or leave) Ray."""
        self._stop.set()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.join(2 * PROBE_INTERVAL_S + 1)
        for lane in self._lanes.values():
            if lane is not None:
                lane.close()
        self._lanes = {}
        for shard in self.shards:
            try:
                self._ray.kill(shard.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                log.debug("Shard %d was already gone.", shard.index)
        self.shards = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def describe(self) -> dict[str, object]:
        engine = dict(self.shards[0].info.get("engine", {}))
        return {**engine, "n": self.n, "dim": self.dim, "device": self.device}


def _cause(exc: BaseException) -> str:
    """The first line of a Ray error, which otherwise carries a whole traceback."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_sharded(settings: Settings, progress: Any = None) -> ShardedEngine:
    """The sharded engine, every shard loaded and warm (in the service's loading thread)."""
    began = time.perf_counter()
    engine = ShardedEngine(settings, progress)
    engine.warmup()
    log.info(
        "%d shards ready in %.2f s (slowest shard load %.2f s).",
        len(engine.shards),
        time.perf_counter() - began,
        max(shard.info["load_seconds"] for shard in engine.shards),
    )
    return engine
