"""One shard: a Ray actor process that loads its own contiguous rows and runs today's engine.

The constructor reads the rows itself, from the same file path (or the demo seed) the front
end was given: the matrix never passes through the front end. Ray runs the constructor again
when it restarts a dead actor, so a restarted shard reloads its rows on its own.
Each answer carries the actor's `incarnation` (new on every start), from which the front end
counts restarts. `describe` runs in its own concurrency group: a probe is answered while a
search runs, and is not answered while the constructor still loads (the shard is reloading).

Threads. A shard's BLAS pool (the batch-1 path) and TensorFlow's intra-op pool get `threads`,
the CPUs Ray reserves for the shard, instead of whatever the library picks (numpy's OpenBLAS:
one thread or every core, depending on whether Ray set OMP_NUM_THREADS before numpy loaded;
TensorFlow: every core). Threads beyond the reserved CPUs compete with the other shards and
the front end on the same cores; the reserved ones are what a shard may use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from threadpoolctl import threadpool_info, threadpool_limits

from .settings import EngineSettings
from .shard_direct import LaneServer

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
    threads: int = 1  # BLAS and TensorFlow intra-op threads: the CPUs Ray reserves for it
    lane_key: bytes = b""  # the authkey of its direct lane (shard_direct.py); none if empty


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


def limit_threads(threads: int) -> Any:
    """Size the BLAS pools and TensorFlow's intra-op pool to `threads`; call it before
    TensorFlow's first op (its pool is fixed then). Returns threadpoolctl's limiter, which
    the caller keeps (the limits last as long as the process; keeping it is only explicit)."""
    from .engine import tf  # imported there after tf_runtime set its environment

    with contextlib.suppress(RuntimeError):  # TensorFlow already ran an op: its pool stays
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    return threadpool_limits(threads, user_api="blas")


def thread_counts() -> dict[str, int]:
    """What the pools use now (threadpoolctl reads the BLAS libraries themselves)."""
    from .engine import tf  # imported there after tf_runtime set its environment

    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {
        "blas": max(blas, default=0),
        "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
    }


class ShardServer:
    """The actor's class (wrapped by `ray.remote` in flasma_ws/shards.py)."""

    def __init__(self, spec: ShardSpec) -> None:
        began = time.perf_counter()
        self.spec = spec
        self.incarnation = uuid.uuid4().hex
        from .engine import Engine, configure_threads

        self._limits = limit_threads(spec.threads)
        configure_threads(spec.tf_interop_threads)
        self.targets = open_rows(spec)
        self.engine = Engine(self.targets, spec.engine)
        self.engine.warmup()
        self._one_search = threading.Lock()  # Ray's calls and the lane's: one at a time
        self.lane = (
            LaneServer(ray.util.get_node_ip_address(), spec.lane_key, self.engine.dim, self._top)
            if spec.lane_key
            else None
        )
        self.load_seconds = time.perf_counter() - began

    def _top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """This shard's exact top-min(k, n) with global row numbers (engine order: score
        descending, lower row first: shard_merge.py relies on nothing more), and seconds."""
        with self._one_search:
            started = time.perf_counter()
            rows, scores = self.engine.search(queries, min(k, self.engine.max_k))
            seconds = time.perf_counter() - started
        return rows + self.spec.start, scores, seconds  # rows of the range -> of the file

    @ray.method(concurrency_group=SEARCH_GROUP)
    def search(self, queries: np.ndarray, k: int) -> ShardAnswer:
        rows, scores, seconds = self._top(queries, k)
        return ShardAnswer(rows, scores, self.incarnation, seconds)

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
            "lane": self.lane.address if self.lane is not None else None,
            "load_seconds": round(self.load_seconds, 3),
            "threads": thread_counts(),
            "engine": self.engine.describe(),
        }
