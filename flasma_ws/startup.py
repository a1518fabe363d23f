"""Start-up: from Settings to the ready parts (engine, codec, batcher, /info document).

`load_engine` runs in a worker thread (TensorFlow's import overlapped with the file scan, the
copy to the device, the warm-up); `assemble` builds the rest on the event loop. Service
(service.py) keeps the state machine and only calls these.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol
from .batcher import Batcher
from .machine import describe_cpu, gpu_model
from .metrics import Metrics
from .protocol import Codec
from .settings import Settings
from .text import counted

log = logging.getLogger("flasma_ws")

Progress = Callable[[int], None]  # raises to stop a long load between chunks


@dataclass(frozen=True)
class Loaded:
    """What the loading thread made: the keyed engine, and the collection when writable."""

    engine: Any  # flasma_ws.live_engine.LiveEngine: typed loosely (TensorFlow loads lazily)
    collection: Any = None  # flasma_ws.collection.Collection with --data-dir


@dataclass(frozen=True)
class Parts:
    """What a ready service serves with. The batcher is built, not started."""

    engine: Any
    codec: Codec
    batcher: Batcher
    info: dict[str, object]  # GET /info, but for "state"
    collection: Any = None


def assemble(settings: Settings, loaded: Loaded, metrics: Metrics) -> Parts:
    """The codec, batcher and /info document for a loaded engine (on the event loop)."""
    from .write_codec import WriteCodec

    engine, collection = loaded.engine, loaded.collection
    writable = collection is not None
    # A live collection changes size: k is bounded by max_k alone, and answers may be short.
    n = engine.max_k if writable else engine.n
    top_k = default_k(settings, n)
    limits = settings.limits
    writes = WriteCodec(engine.dim, engine.key_type, limits.max_queries_per_frame)
    keyed = writable and engine.key_type == "int"
    codec = Codec(engine.dim, n, top_k, engine.max_k, limits.max_queries_per_frame, writes, keyed)
    # A sharded engine keeps several batches in flight and has per-shard metrics.
    in_flight = getattr(engine, "in_flight", 1)
    batcher = Batcher(engine, metrics, settings.batcher, settings.engine.max_batch, in_flight)
    if hasattr(engine, "attach_metrics"):
        engine.attach_metrics(metrics.registry)
    info = describe(settings, engine, top_k)
    info["writable"] = writable
    info["key_type"] = engine.key_type
    if writable:
        info.update(collection.describe())
        if not collection.imported:  # its rows are its own now, whatever --dim says
            info["demo"] = None
    metrics.track_certified(lambda: certified_stats(engine))
    return Parts(engine, codec, batcher, info, collection)


def certified_stats(engine: Any) -> Any:
    """The serving engine's certified-search counts, or None (a live engine's base is
    replaced at each compaction, so this is looked up at every scrape)."""
    certified = getattr(getattr(engine, "base", engine), "certified", None)
    return certified.stats if certified is not None else None


def default_k(settings: Settings, n: int) -> int:
    """--top-k, or N when the file holds fewer rows: said once here, not on every request."""
    if settings.top_k <= n:
        return settings.top_k
    log.warning(
        "--top-k %d is more than the %s served; requests that give no k get %d results.",
        settings.top_k,
        counted(n, "vector"),
        n,
    )
    return n


def load_engine(settings: Settings, started: float, progress: Progress) -> Loaded:
    """Vectors read, matrix on the device, warmed up (in a worker thread)."""
    if settings.shards:  # the shards load their own rows; TensorFlow never loads here
        from .shards import load_sharded

        return Loaded(load_sharded(settings, progress))
    from .vectors import open_targets

    s = settings
    if s.data_dir is not None:
        return _load_collection(s, progress)
    began = time.perf_counter()
    # Importing TensorFlow takes seconds of mostly Python work, scanning the file mostly
    # numpy work that releases the GIL: do both at once.
    # A daemon: when the scan refuses the file, the error is reported at once rather than
    # after the rest of the import (seconds).
    importing = threading.Thread(
        target=importlib.import_module, args=("flasma_ws.engine",), daemon=True
    )
    importing.start()
    targets = open_targets(s.npy, s.dim, s.demo_size, s.demo_seed, s.drop_zero, progress=progress)
    scanned = time.perf_counter()
    importing.join()
    from .collection_startup import read_only_engine
    from .engine import configure_threads

    imported = time.perf_counter()
    if not configure_threads(s.tf_interop_threads):
        log.info("TensorFlow already runs in this process; its thread settings stay.")
    _log_notes(s, targets)
    engine = read_only_engine(s, targets, progress)
    copied = time.perf_counter()
    engine.warmup(progress=progress)
    warmed = time.perf_counter()
    log.info(
        "Start-up split: process start to load %.2f s, scan %.2f s and TensorFlow import "
        "%.2f s (overlapped), copy to %s %.2f s, warm-up of %d batch sizes %.2f s.",
        began - started,
        scanned - began,
        imported - began,
        engine.device,
        copied - imported,
        len(engine.warmup_batches),
        warmed - copied,
    )
    return Loaded(engine)


def _load_collection(settings: Settings, progress: Progress) -> Loaded:
    from .collection_startup import open_collection
    from .engine import configure_threads

    if not configure_threads(settings.tf_interop_threads):
        log.info("TensorFlow already runs in this process; its thread settings stay.")
    engine, collection = open_collection(settings, progress)
    engine.warmup(progress=progress)
    return Loaded(engine, collection)


def describe(settings: Settings, engine: Any, top_k: int) -> dict[str, object]:
    """The /info document: the served data, its limits, and which kernels answer."""
    s, kernels = settings, engine.describe()
    return {
        "n": engine.n,
        "dim": engine.dim,
        "dtype": s.dtype,
        "device": engine.device,
        "gpu": gpu_model(engine.device),  # its model name; null on CPU
        "max_batch": s.max_batch,
        "top_k": top_k,
        "max_k": engine.max_k,
        "source": _source(s),
        "demo": None
        if s.npy is not None
        else {"size": s.demo_size, "seed": s.demo_seed, "dim": s.dim},
        "drop_zero": s.drop_zero,
        "zero_rows_dropped": getattr(engine.targets, "zero_rows", 0),
        "max_queries_per_frame": s.max_queries_per_frame,
        "binary_header_bytes": protocol.BINARY_HEADER.size,
        # Which kernels answer: figures differ 3x between CPUs and kernel choices.
        "cpu": describe_cpu(),
        **{key: kernels[key] for key in ("onednn", "tf32", "blas_max_batch", "precision")},
    }


def _source(settings: Settings) -> str:
    if settings.data_dir is not None:
        return f"data dir {settings.data_dir}"
    return "demo" if settings.npy is None else str(Path(settings.npy))


def _log_notes(settings: Settings, targets: Any) -> None:
    """What the user should know about the data being served."""
    s = settings
    if s.npy is None:
        log.info(
            "No --npy given: serving a generated demo set of %d x %d (seed %d).",
            s.demo_size,
            s.dim,
            s.demo_seed,
        )
    if targets.zero_rows:
        log.info("Skipped %s (--drop-zero).", counted(targets.zero_rows, "zero-norm row"))
    if targets.source.integer_dtype is not None:
        log.warning(
            "%s holds %s values; serving them as float32.",
            targets.source.label,
            targets.source.integer_dtype,
        )
