"""The running service's state: vectors, engine, codec and batcher, built from one Settings.

No sockets here: the ASGI app (app.py) routes requests to `Service.submit`.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import protocol
from .batcher import Answer, Batcher, Failure, Owner
from .errors import FlasmaError, LoadCancelled, Overloaded, ProtocolError
from .machine import describe_cpu
from .metrics import Metrics
from .protocol import Codec, Query
from .settings import Settings
from .text import counted

log = logging.getLogger("flasma_ws")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Service:
    def __init__(self, settings: Settings, started: float | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.state = State.LOADING
        self.started = started if started is not None else time.perf_counter()
        self.engine: Any = None
        self.codec: Codec | None = None
        self.batcher: Batcher | None = None
        self.info: dict[str, object] = {"state": "loading"}
        self.on_fatal: Callable[[FlasmaError], None] | None = None
        self.address = f"{settings.host}:{settings.port}"  # the listener sets the bound one
        self.top_k = settings.top_k  # the default k; at most N once loaded

    # -- start-up ----------------------------------------------------------------------
    async def load(self) -> None:
        """Load vectors and warm the engine off the event loop, then start batching."""
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, self._build_engine)
        except LoadCancelled:
            log.info("Loading stopped: the server is shutting down.")
            return
        except FlasmaError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # noqa: BLE001 - the log names it, the process exits 1
            log.exception("Loading failed unexpectedly.")
            self._fail(FlasmaError(f"Loading failed unexpectedly: {exc}"))
            return
        if self.state is not State.LOADING:  # a signal came as loading finished
            return
        s = self.settings
        self.engine = engine
        self.top_k = self._default_k(engine)
        self.codec = Codec(
            engine.dim, engine.n, self.top_k, engine.max_k, s.limits.max_queries_per_frame
        )
        self.batcher = Batcher(engine, self.metrics, s.batcher, s.engine.max_batch)
        self.batcher.start()
        self.info = self._describe(engine)
        self.state = State.READY
        self.metrics.ready.set(1)
        log.info(
            "Ready on %s: %d vectors of dim %d (%s) on %s as %s, %.2f s from start.",
            self.address,
            engine.n,
            engine.dim,
            self.info["source"],
            engine.device,
            s.dtype,
            time.perf_counter() - self.started,
        )

    def _default_k(self, engine: Any) -> int:
        """--top-k, or N when the file holds fewer rows: said once here, not on every request."""
        if self.settings.top_k <= engine.n:
            return self.settings.top_k
        log.warning(
            "--top-k %d is more than the %s served; requests that give no k get %d results.",
            self.settings.top_k,
            counted(engine.n, "vector"),
            engine.n,
        )
        return int(engine.n)

    def _build_engine(self) -> Any:
        from .vectors import open_targets

        s = self.settings
        began = time.perf_counter()
        # Importing TensorFlow takes seconds of mostly Python work, scanning the file mostly
        # numpy work that releases the GIL: do both at once.
        # A daemon: when the scan refuses the file, the error is reported at once rather than
        # after the rest of the import (seconds).
        importing = threading.Thread(
            target=importlib.import_module, args=("flasma_ws.engine",), daemon=True
        )
        importing.start()
        targets = open_targets(
            s.npy, s.dim, s.demo_size, s.demo_seed, s.drop_zero, progress=self._still_wanted
        )
        scanned = time.perf_counter()
        importing.join()
        from .engine import Engine, configure_threads

        imported = time.perf_counter()
        if not configure_threads(s.tf_interop_threads):
            log.info("TensorFlow already runs in this process; its thread settings stay.")
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
        engine = Engine(targets, s.engine, progress=self._still_wanted)
        copied = time.perf_counter()
        engine.warmup(progress=self._still_wanted)
        warmed = time.perf_counter()
        log.info(
            "Start-up split: process start to load %.2f s, scan %.2f s and TensorFlow import "
            "%.2f s (overlapped), copy to %s %.2f s, warm-up of %d batch sizes %.2f s.",
            began - self.started,
            scanned - began,
            imported - began,
            engine.device,
            copied - imported,
            len(engine.warmup_batches),
            warmed - copied,
        )
        return engine

    def _still_wanted(self, _done: int = 0) -> None:
        """Progress callback of loading: a shutdown signal stops a long load between chunks
        (threads cannot be cancelled, and the process would wait for this one)."""
        if self.state is State.DRAINING:
            raise LoadCancelled

    def _describe(self, engine: Any) -> dict[str, object]:
        s = self.settings
        return {
            "n": engine.n,
            "dim": engine.dim,
            "dtype": s.dtype,
            "device": engine.device,
            "max_batch": s.max_batch,
            "top_k": self.top_k,
            "max_k": engine.max_k,
            "source": "demo" if s.npy is None else str(Path(s.npy)),
            "demo": None
            if s.npy is not None
            else {"size": s.demo_size, "seed": s.demo_seed, "dim": s.dim},
            "drop_zero": s.drop_zero,
            "zero_rows_dropped": engine.targets.zero_rows,
            "max_queries_per_frame": s.max_queries_per_frame,
            "binary_header_bytes": protocol.BINARY_HEADER.size,
            # Which kernels answer: figures differ 3x between CPUs and kernel choices.
            "cpu": describe_cpu(),
            "onednn": engine.onednn.describe(),
            "tf32": engine.tf32,
            "blas_max_batch": engine.describe()["blas_max_batch"],
        }

    def _fail(self, exc: FlasmaError) -> None:
        self.state = State.FAILED
        if self.on_fatal is None:
            log.error("%s", exc)
        else:
            self.on_fatal(exc)  # the listener stops and raises it: reported once, by the caller

    # -- requests ----------------------------------------------------------------------
    def submit(self, query: Query, answer: Answer, owner: Owner | None = None) -> None:
        """Queue a validated query; problems are answered through `answer`, never raised."""
        if self.state is not State.READY or self.batcher is None:
            what = "still loading" if self.state is State.LOADING else "shutting down"
            answer(Failure(protocol.UNAVAILABLE, f"The server is {what}; retry shortly."))
            return
        shape = query.vectors.shape
        if len(shape) != 2 or shape[0] < 1 or shape[1] != self.engine.dim:
            # The codec guarantees this; checked again because one malformed array would
            # fail the whole batch, other clients' queries included.
            answer(
                Failure(protocol.BAD_DIMENSION, f"Expected vectors of dimension {self.engine.dim}.")
            )
            return
        timeout_ms = query.timeout_ms or self.settings.timeout_ms
        try:
            self.batcher.submit(
                query.vectors, query.k, time.monotonic() + timeout_ms / 1000, answer, owner
            )
        except Overloaded as exc:
            answer(Failure(protocol.OVERLOADED, str(exc)))

    def require_codec(self) -> Codec:
        if self.codec is None:
            raise ProtocolError(protocol.UNAVAILABLE, "The server is still loading; retry shortly.")
        return self.codec

    # -- shutdown ----------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop taking requests and answer all queued ones (the app then closes its sockets)."""
        self.state = State.DRAINING
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.drain()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
