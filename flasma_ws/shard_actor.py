"""One shard: a Ray actor process that loads its own contiguous rows and runs today's engine.

The constructor reads the rows itself, from the same file path (or the demo seed) the front
end was given: the matrix never passes through the front end. Ray runs the constructor again
when it restarts a dead actor, so a restarted shard reloads its rows on its own.
Each answer carries the actor's `incarnation` (new on every start), from which the front end
counts restarts. `describe` runs in its own concurrency group: a probe is answered while a
search runs, and is not answered while the constructor still loads (the shard is reloading).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from .settings import EngineSettings

SEARCH_GROUP, PROBE_GROUP = "search", "probe"
CONCURRENCY_GROUPS = {SEARCH_GROUP: 1, PROBE_GROUP: 1}  # one search at a time: Engine's rule


@dataclass(frozen=True)
class ShardSpec:
    """What a shard loads: rows start..stop of a file (or of the demo stream)."""

    index: int
    start: int
    stop: int
    npy: str | None
    dim: int | None
    demo_size: int
    demo_seed: int
    drop_zero: bool
    engine: EngineSettings
    tf_interop_threads: int


@dataclass(frozen=True)
class ShardAnswer:
    rows: np.ndarray  # (B, k_s) global row numbers, int64
    scores: np.ndarray  # (B, k_s) float32
    incarnation: str
    seconds: float  # the shard's own search time


def open_rows(spec: ShardSpec) -> Any:
    """The shard's Targets: its rows only, scanned (NaN, zero rows) by the shard itself."""
    from .vectors import open_demo, open_npy, prepare

    if spec.npy is None:
        assert spec.dim is not None
        source = open_demo(spec.demo_size, spec.dim, spec.demo_seed)
    else:
        source = open_npy(spec.npy, spec.dim)
    return prepare(source.row_range(spec.start, spec.stop), spec.drop_zero)


class ShardServer:
    """The actor's class (wrapped by `ray.remote` in flasma_ws/shards.py)."""

    def __init__(self, spec: ShardSpec) -> None:
        began = time.perf_counter()
        self.spec = spec
        self.incarnation = uuid.uuid4().hex
        from .engine import Engine, configure_threads

        configure_threads(spec.tf_interop_threads)
        self.targets = open_rows(spec)
        self.engine = Engine(self.targets, spec.engine)
        self.engine.warmup()
        self.load_seconds = time.perf_counter() - began

    @ray.method(concurrency_group=SEARCH_GROUP)
    def search(self, queries: np.ndarray, k: int) -> ShardAnswer:
        """This shard's exact top-min(k, n) with global row numbers (engine order: score
        descending, lower row first: shard_merge.py relies on nothing more)."""
        started = time.perf_counter()
        rows, scores = self.engine.search(queries, min(k, self.engine.max_k))
        rows = rows + self.spec.start  # rows within the range -> rows of the file
        return ShardAnswer(rows, scores, self.incarnation, time.perf_counter() - started)

    @ray.method(concurrency_group=PROBE_GROUP)
    def describe(self) -> dict[str, Any]:
        return {
            "shard": self.spec.index,
            "rows": [self.spec.start, self.spec.stop],
            "n": self.engine.n,
            "dim": self.engine.dim,
            "max_k": self.engine.max_k,
            "zero_rows": self.targets.zero_rows,
            "device": self.engine.device,
            "host": socket.gethostname(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "load_seconds": round(self.load_seconds, 3),
            "engine": self.engine.describe(),
        }
