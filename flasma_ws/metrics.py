"""Prometheus metrics, one registry per server so that several servers can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

disable_created_metrics()  # the *_created series only add noise to every scrape

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flasma_requests",
            "Requests answered, by route and outcome (ok or error code).",
            ["route", "outcome"],
            registry=r,
        )
        self.queries = Counter("flasma_queries", "Query vectors answered.", registry=r)
        self.queue_depth = Gauge(
            "flasma_queue_depth", "Query rows waiting for the engine.", registry=r
        )
        self.active_flows = Gauge(
            "flasma_active_flows", "Connections with queries waiting for the engine.", registry=r
        )
        self.queue_wait_seconds = Histogram(
            "flasma_queue_wait_seconds",
            "From a request queued to its first rows handed to the engine.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "flasma_batch_size", "Query rows per engine batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.engine_seconds = Histogram(
            "flasma_engine_seconds", "Engine time per batch.", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.latency_seconds = Histogram(
            "flasma_request_latency_seconds",
            "From request received to answer sent, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.connections = Gauge(
            "flasma_open_connections", "Open WebSocket connections.", registry=r
        )
        self.tcp_connections = Gauge(
            "flasma_tcp_connections",
            "Open TCP connections by state: handshaking (request head not complete), http, "
            "websocket.",
            ["state"],
            registry=r,
        )
        for state in ("handshaking", "http", "websocket"):
            self.tcp_connections.labels(state)  # every state shows, 0 included
        self.connections_refused = Counter(
            "flasma_connections_refused",
            "Connections refused by reason: max_connections, max_connections_per_ip; "
            "max_pipelined: closed after the answers to the requests it had queued.",
            ["reason"],
            registry=r,
        )
        self.connections_timed_out = Counter(
            "flasma_connections_timed_out",
            "Connections closed by a timeout, by stage: request_head, body, ping.",
            ["stage"],
            registry=r,
        )
        self.skipped = Counter(
            "flasma_skipped_queries",
            "Queued queries skipped because their client left.",
            registry=r,
        )
        self.ready = Gauge("flasma_ready", "1 once the engine is warm and serving.", registry=r)

    def watch_collection(self, collection: object) -> None:
        """Gauges read from a live collection at scrape time (no cost on the write path)."""
        from .collection import Collection

        assert isinstance(collection, Collection)
        c, r = collection, self.registry
        engine, wal, stats = c.engine, c.wal, c.stats
        gauges: dict[str, tuple[str, object]] = {
            "flasma_live_rows": ("Rows a search can return.", lambda: engine.n),
            "flasma_deleted_rows": (
                "Rows deleted or replaced since the last compaction, still masked.",
                lambda: engine.base_dead + engine.appended - (engine.n - engine.base_live),
            ),
            "flasma_appendable_rows": ("Rows in the appendable segment.", lambda: engine.appended),
            "flasma_wal_bytes": (
                "Bytes in the write-ahead log's segments.",
                lambda: wal.size_bytes,
            ),
            "flasma_wal_fsyncs": ("fsync calls of the write-ahead log.", lambda: wal.stats.fsyncs),
            "flasma_wal_records": ("Records written to the log.", lambda: wal.stats.records),
            "flasma_compactions": ("Compactions finished.", lambda: stats.compactions),
            "flasma_last_compaction_seconds": (
                "Duration of the last compaction.",
                lambda: stats.last_compaction_seconds,
            ),
        }
        for name, (text, read) in gauges.items():
            Gauge(name, text, registry=r).set_function(read)  # type: ignore[arg-type]

    def track_certified(self, read: Callable[[], Any]) -> None:
        """Export certified search's counts (`read()`: a flasma_ws.certified.Stats, or None
        where the engine serving now is not certified), read at scrape."""
        self.registry.register(_CertifiedCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CertifiedCollector:
    """Certified narrow search: fallback fraction = fallbacks / queries; mean candidates =
    candidates / (queries - fallbacks)."""

    HELP = {
        "queries": "Queries answered by certified narrow search.",
        "fallbacks": "Queries recomputed in float32 in full (more candidates than the cap).",
        "candidates": "Certified candidates rescored in float32, over the other queries.",
        "widened": "Queries rerun with the narrow top K' at the cap.",
    }

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.read()
        if stats is None:
            return
        for name, help_text in self.HELP.items():
            yield CounterMetricFamily(
                f"flasma_certified_{name}", help_text, value=getattr(stats, name)
            )


def read_samples(text: str) -> dict[str, float]:
    """Prometheus text as {'name{label="value",...}': value}, a bare name when unlabelled,
    read with prometheus-client's own parser (escapes, exemplars and comments handled)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        _sample_key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"
