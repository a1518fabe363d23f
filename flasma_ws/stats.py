"""The dashboard's feed, `GET /stats`: the metrics registry sampled once a second into a
five-minute ring, served as JSON columns (docs/protocol.md, "GET /stats"). No sockets.

Cheap by construction: the query path never sees it. One sample is one `registry.collect()`
(0.12 ms on a Zen 5 core) per second on the event loop, whether 0 or 50 dashboards are open;
a request only slices the ring (`?since=` sends just the new seconds) and encodes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

INTERVAL_S = 1.0
WINDOW_S = 300  # five minutes of one-second points
COLUMNS = (
    "t",
    "queries",
    "qps",
    "batches_per_s",
    "mean_batch",
    "engine_ms",
    "p50_ms",
    "p99_ms",
    "errors_per_s",
    "queue_depth",
    "active_flows",
    "open_connections",
    "tcp_connections",
)


@dataclass(frozen=True)
class Snapshot:
    """The registry's cumulative values at one moment (histograms as cumulative buckets)."""

    t: float
    queries: float = 0.0
    batches: float = 0.0
    batch_rows: float = 0.0
    batch_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count)
    engine_s: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # every route together
    outcomes: dict[str, float] = field(default_factory=dict)  # outcome -> requests, all routes
    gauges: dict[str, float] = field(default_factory=dict)
    tcp: dict[str, float] = field(default_factory=dict)
    refused: float = 0.0
    skipped: float = 0.0


def take(registry: CollectorRegistry, now: float) -> Snapshot:
    """One snapshot of flasma-ws's registry (metrics.Metrics) at unix time `now`."""
    values: dict[str, float] = {}
    outcomes: dict[str, float] = {}
    tcp: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {"batch": {}, "latency": {}}
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "flasma_requests_total":
                outcome = labels["outcome"]
                outcomes[outcome] = outcomes.get(outcome, 0.0) + value
            elif name == "flasma_tcp_connections":
                tcp[labels["state"]] = value
            elif name in ("flasma_batch_size_bucket", "flasma_request_latency_seconds_bucket"):
                into = buckets["batch" if name.startswith("flasma_batch") else "latency"]
                bound = float(labels["le"])
                into[bound] = into.get(bound, 0.0) + value  # latency: summed over routes
            else:
                values[name] = values.get(name, 0.0) + value
    return Snapshot(
        t=now,
        queries=values.get("flasma_queries_total", 0.0),
        batches=values.get("flasma_batch_size_count", 0.0),
        batch_rows=values.get("flasma_batch_size_sum", 0.0),
        batch_buckets=tuple(sorted(buckets["batch"].items())),
        engine_s=values.get("flasma_engine_seconds_sum", 0.0),
        latency_buckets=tuple(sorted(buckets["latency"].items())),
        outcomes=outcomes,
        gauges={
            key: values.get(f"flasma_{key}", 0.0)
            for key in ("queue_depth", "active_flows", "open_connections")
        },
        tcp=tcp,
        refused=values.get("flasma_connections_refused_total", 0.0),
        skipped=values.get("flasma_skipped_queries_total", 0.0),
    )


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The q-quantile of cumulative (bound, count) buckets, interpolated linearly inside its
    bucket as Prometheus's histogram_quantile does; the last finite bound when it falls in
    +Inf; None when the buckets are empty."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _minus(
    new: tuple[tuple[float, float], ...], old: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], ...]:
    before = dict(old)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in new)


def _ratio(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return numerator / denominator * scale if denominator > 0 else None


def _errors(outcomes: dict[str, float]) -> float:
    return sum(count for outcome, count in outcomes.items() if outcome != "ok")


def point(old: Snapshot, new: Snapshot) -> dict[str, float | None]:
    """One interval's row of COLUMNS, from two consecutive snapshots."""
    dt = new.t - old.t
    batches = new.batches - old.batches
    latency = _minus(new.latency_buckets, old.latency_buckets)
    return {
        "t": round(new.t, 3),
        "queries": new.queries - old.queries,
        "qps": _ratio(new.queries - old.queries, dt),
        "batches_per_s": _ratio(batches, dt),
        "mean_batch": _ratio(new.batch_rows - old.batch_rows, batches),
        "engine_ms": _ratio(new.engine_s - old.engine_s, batches, 1000.0),
        "p50_ms": _ms(quantile(0.5, latency)),
        "p99_ms": _ms(quantile(0.99, latency)),
        "errors_per_s": _ratio(_errors(new.outcomes) - _errors(old.outcomes), dt),
        **new.gauges,
        "tcp_connections": sum(new.tcp.values()),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _by_code(new: dict[str, float], old: dict[str, float]) -> dict[str, float]:
    counts = {code: n - old.get(code, 0.0) for code, n in new.items() if code != "ok"}
    return {code: n for code, n in sorted(counts.items()) if n > 0}


class StatsFeed:
    """Samples a registry every INTERVAL_S into a ring of WINDOW_S points; `document` serves it."""

    def __init__(self, registry: CollectorRegistry, window_s: int = WINDOW_S) -> None:
        self.registry = registry
        self.snapshots: deque[Snapshot] = deque(maxlen=window_s + 1)
        self.points: deque[dict[str, float | None]] = deque(maxlen=window_s)
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        snapshot = take(self.registry, time.time() if now is None else now)
        if self.snapshots:
            self.points.append(point(self.snapshots[-1], snapshot))
        self.snapshots.append(snapshot)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            self.sample()

    def document(self, since: float | None = None) -> dict[str, Any]:
        """The feed's metric part: series (one column per COLUMNS entry, intervals after
        `since`), totals since start, and the window's batch sizes and errors by code."""
        if not self.snapshots:  # not started (an app driven without its lifespan)
            self.sample()
        rows = [p for p in self.points if since is None or (p["t"] or 0.0) > since]
        first, last = self.snapshots[0], self.snapshots[-1]
        return {
            "t": round(last.t, 3),
            "interval_s": INTERVAL_S,
            "window_s": round(last.t - first.t, 3),
            "series": {column: [row[column] for row in rows] for column in COLUMNS},
            "now": {**last.gauges, "tcp_connections": dict(last.tcp)},
            "totals": {
                "queries": last.queries,
                "batches": last.batches,
                "requests": sum(last.outcomes.values()),
                "errors": _by_code(last.outcomes, {}),
                "skipped": last.skipped,
                "connections_refused": last.refused,
            },
            "window": {
                "batch_size": [
                    [None if math.isinf(bound) else bound, count]
                    for bound, count in _counts(_minus(last.batch_buckets, first.batch_buckets))
                ],
                "errors": _by_code(last.outcomes, first.outcomes),
            },
        }


def _counts(cumulative: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """Cumulative buckets as per-bucket counts."""
    counts, below = [], 0.0
    for bound, count in cumulative:
        counts.append((bound, count - below))
        below = count
    return counts


# The settings a dashboard shows as limits (every one is a `serve` flag).
LIMITS = (
    "max_batch",
    "max_k",
    "queue_size",
    "timeout_ms",
    "max_inflight",
    "max_queries_per_frame",
    "max_frame_bytes",
    "max_body_bytes",
    "max_connections",
    "max_connections_per_ip",
)
MATRIX = ("n", "dim", "dtype", "device", "gpu", "cpu", "source")


def service_part(service: Any) -> dict[str, Any]:
    """What /stats says of the service itself: state, uptime, the matrix, the limits."""
    info, settings = {**service.info, **service.live_info()}, service.settings  # live rows
    return {
        "state": service.state.value,
        "uptime_s": round(time.perf_counter() - service.started, 3),
        "matrix": {key: info.get(key) for key in MATRIX},
        "limits": {key: getattr(settings, key) for key in LIMITS},
        "auth": settings.token is not None,
    }
