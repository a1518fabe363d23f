"""`bench --shards`: the sharded engine's time per batch against one engine at the same total N.

For each shard count the matrix (the demo set of --n rows) is split over that many Ray actors
on a local Ray; one engine in this process holds all N. Both answer the same queries, timed in
turns (timing.time_calls): fan-out overhead = sharded minus single-engine seconds per batch.
On one machine the shards share its cores, so this is the cost of going through Ray, not the
speed-up of more devices (docs/scale-out.md models that). Each of S shards reserves
cores / S CPUs, and so runs that many BLAS and TensorFlow threads (at least one): the shards
together use the cores the one engine uses. Also: the merge alone at 64 synthetic shards, the
cost that grows with the shard count in the front end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from .errors import ConfigError
from .settings import Settings
from .shard_merge import merge_top_k
from .timing import time_calls

Progress = Callable[[str], None]


@dataclass(frozen=True)
class FanoutResult:
    dim: int
    batch: int
    shards: int
    single_ms: float  # one engine over all N, per batch
    sharded_ms: float  # the sharded engine, per batch

    @property
    def overhead_ms(self) -> float:
        return self.sharded_ms - self.single_ms

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "overhead_ms": self.overhead_ms}


def merge_ms(batch: int = 128, k: int = 10, shards: int = 64, calls: int = 300) -> float:
    """Median milliseconds of one merge of `shards` synthetic (batch, k) answers."""
    rng = np.random.default_rng(0)
    rows, scores = [], []
    for s in range(shards):
        part = -np.sort(-rng.standard_normal((batch, k)).astype(np.float32), axis=1)
        scores.append(part)
        rows.append(np.sort(rng.integers(0, 1 << 20, (batch, k)), axis=1) + (s << 20))
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        merge_top_k(rows, scores, k)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


def run_fanout(
    shard_counts: tuple[int, ...],
    dims: tuple[int, ...],
    batches: tuple[int, ...],
    n: int,
    k: int = 10,
    seconds: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[FanoutResult]:
    """One FanoutResult per (dim, batch, shard count), on a local Ray started here."""
    from . import shards as sharding
    from .engine import Engine
    from .vectors import open_targets

    if not shard_counts or min(shard_counts) < 1:
        raise ConfigError("--shards takes shard counts of at least 1, e.g. 1,2,4.")
    ray = sharding.import_ray(loopback=True)
    owned = not ray.is_initialized()
    cores = os.cpu_count() or 1
    if owned:  # room for every shard count's engine at once, each reserving all the cores
        sharding.start_local_ray(cores * len(shard_counts), object_store_mib=256)
    results = []
    try:
        for dim in dims:
            settings = Settings(
                dim=dim, demo_size=n, demo_seed=seed, max_batch=max(batches), max_k=k, top_k=k
            )
            if progress is not None:
                progress(f"d={dim}: one engine over {n:,} rows")
            single = Engine(open_targets(None, dim, n, seed), settings.engine)
            single.warmup()
            engines = {}
            for count in shard_counts:
                if progress is not None:
                    progress(f"d={dim}: {count} shards loading")
                engines[count] = sharding.ShardedEngine(
                    settings.replace(shards=count, shard_cpus=cores / count)
                )
            try:
                results += _measure(single, engines, dim, batches, k, seconds, seed, progress)
            finally:
                for engine in engines.values():
                    engine.close()
    finally:
        if owned:
            ray.shutdown()
    return results


def _measure(
    single: Any,
    engines: dict[int, Any],
    dim: int,
    batches: tuple[int, ...],
    k: int,
    seconds: float,
    seed: int,
    progress: Progress | None,
) -> list[FanoutResult]:
    rng = np.random.default_rng([seed, dim])
    out = []
    for batch in batches:
        if progress is not None:
            progress(f"d={dim}: batch {batch}")
        q = rng.standard_normal((batch, dim)).astype(np.float32)
        calls: dict[str, Callable[[], object]] = {"single": partial(single.search, q, k)}
        for count, engine in engines.items():
            calls[str(count)] = partial(engine.search, q, k)
        median = time_calls(calls, seconds)
        for count in engines:
            out.append(
                FanoutResult(dim, batch, count, median["single"] * 1000, median[str(count)] * 1000)
            )
    return out


def markdown(results: list[FanoutResult]) -> str:
    lines = [
        "| d | batch | shards | one engine ms | sharded ms | fan-out overhead ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.dim} | {r.batch} | {r.shards} | {r.single_ms:.2f} | {r.sharded_ms:.2f} "
            f"| {r.overhead_ms:+.2f} |"
        )
    return "\n".join(lines)
