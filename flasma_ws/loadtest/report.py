"""What a run measured: `RunReport` (a sweep: `SweepReport`, one RunReport per value).

`to_json()` gives the --json-out document whose keys README.md documents and
benchmarks/targets.py reads: keep them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import LoadConfig
from .remote import ServerCounters
from .run import Measured, Recorder
from .writes import Writer

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Latency:
    """Milliseconds per request (per frame with --multi); None when nothing was answered."""

    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    max: float | None
    mean: float | None

    @classmethod
    def of(cls, latencies_s: list[float]) -> Latency:
        ms = np.array(latencies_s) * 1000.0
        if not ms.size:
            return cls(None, None, None, None, None, None)
        p50, p90, p95, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(p50, p90, p95, p99, float(ms.max()), float(ms.mean()))


@dataclass(frozen=True)
class Verification:
    """--verify: how many answers were checked, their recall@k, and what was not exact."""

    verified: int
    recall: float | None
    exact: bool
    inexact: int
    examples: list[str]  # the first few problems, "query 12: ..."


@dataclass(frozen=True)
class WriteReport:
    """--write-ratio: the upserts sent while measuring and their acknowledgement latency (ms,
    from the send, or in an open loop from the scheduled time, to the acknowledgement)."""

    ratio: float
    sent: int
    acknowledged: int
    writes_per_s: float  # acknowledged writes per second of the measured phase
    latency_ms: Latency
    errors: dict[str, int]  # write frames by error code
    keys_written: int  # distinct keys of ours written to (all deleted after the run)

    @classmethod
    def of(cls, writer: Writer, wall_s: float) -> WriteReport:
        r = writer.recorder
        return cls(
            writer.ratio,
            r.sent,
            r.acknowledged,
            r.acknowledged / wall_s,
            Latency.of(r.latencies),
            dict(sorted(r.errors.items())),
            writer.written,
        )


@dataclass(frozen=True)
class ServerSummary:
    """The server, from its /info."""

    n: int | None
    dim: int | None
    dtype: str | None
    device: str | None
    max_batch: int | None

    @classmethod
    def of(cls, info: dict[str, Any]) -> ServerSummary:
        return cls(*(info.get(key) for key in ("n", "dim", "dtype", "device", "max_batch")))


@dataclass(frozen=True)
class RunReport:
    url: str
    mode: str  # "ws-json", "ws-binary" or "http"
    loop: str  # "closed" or "open"
    connections: int
    inflight: int | None  # closed loop only
    rate: float | None  # open loop only
    arrival: str | None  # open loop only
    multi: int
    k: int | None
    duration_s: float
    sent: int
    answered: int
    unanswered: int
    throughput_qps: float
    latency_ms: Latency
    errors: dict[str, int]  # queries by error code
    mean_batch_size: float | None  # from the server's /metrics
    mean_engine_ms: float | None
    client_cpu_percent: float
    timed_out: bool
    verification: Verification | None = None
    server: ServerSummary | None = None  # a single run's; a sweep holds it once
    writes: WriteReport | None = None  # with --write-ratio; sent/answered/q/s: searches only

    @property
    def runs(self) -> list[RunReport]:
        return [self]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        verification, server = out.pop("verification"), out.pop("server")
        out.update(verification or {})
        if server is not None:
            out["server"] = server
        return out


@dataclass(frozen=True)
class SweepReport:
    sweep: str  # the swept LoadConfig field
    values: list[float]
    server: ServerSummary
    points: list[RunReport]

    @property
    def runs(self) -> list[RunReport]:
        return self.points

    def to_json(self) -> dict[str, Any]:
        server = asdict(self.server)
        points = [point.to_json() for point in self.points]
        return {"sweep": self.sweep, "values": self.values, "server": server, "points": points}


Report = RunReport | SweepReport


def nothing_answered(report: Report) -> bool:
    """True if some run sent queries and got not a single result back."""
    return any(run.sent and not run.answered for run in report.runs)


def nothing_acknowledged(report: Report) -> bool:
    """True if some run sent writes and got not a single acknowledgement back."""
    return any(
        run.writes and run.writes.sent and not run.writes.acknowledged for run in report.runs
    )


def is_exact(report: Report) -> bool:
    """False if any verified answer (of any sweep point) was not exact."""
    return all(run.verification is None or run.verification.exact for run in report.runs)


def build_report(
    config: LoadConfig,
    recorder: Recorder,
    measured: Measured,
    verification: Verification | None,
    writer: Writer | None = None,
) -> RunReport:
    errors = dict(sorted(recorder.errors.items()))
    closed = config.rate is None
    return RunReport(
        url=config.url,
        mode=config.mode,
        loop="closed" if closed else "open",
        connections=config.connections,
        inflight=config.inflight if closed else None,
        rate=config.rate,
        arrival=None if closed else config.arrival,
        multi=config.multi,
        k=config.k,
        duration_s=round(measured.wall_s, 4),
        sent=recorder.sent,
        answered=recorder.answered,
        unanswered=recorder.sent - recorder.answered - sum(errors.values()),
        throughput_qps=recorder.answered / measured.wall_s,
        latency_ms=Latency.of(recorder.latencies),
        errors=errors,
        mean_batch_size=_mean(measured.counters, "batch"),
        mean_engine_ms=_scaled(_mean(measured.counters, "engine"), 1000.0),
        client_cpu_percent=100.0 * measured.cpu_share,
        timed_out=measured.timed_out,
        verification=verification,
        writes=None if writer is None else WriteReport.of(writer, measured.wall_s),
    )


def _mean(counters: ServerCounters | None, name: str) -> float | None:
    """The server's mean batch size ("batch") or engine seconds per batch ("engine")."""
    if counters is None or not getattr(counters, f"{name}_count"):
        return None
    return getattr(counters, f"{name}_sum") / getattr(counters, f"{name}_count")


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
