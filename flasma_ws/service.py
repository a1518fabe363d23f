"""The running service's state machine (loading, ready, draining, failed), admission and drain.

Its parts come from startup.py. No sockets here: the ASGI app (app.py) routes requests to
`Service.submit` and closes its own connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import protocol, startup
from .batcher import Answer, Batcher, Failure, Owner
from .errors import FlasmaError, LoadCancelled, Overloaded, ProtocolError
from .metrics import Metrics
from .protocol import Code, Codec, Query
from .settings import Settings
from .write_codec import ItemError, WriteRequest

log = logging.getLogger("flasma_ws")


READ_ONLY_MESSAGE = (
    "This server is read-only: it was started without --data-dir. Restart it with "
    "--data-dir DIR to keep a live, durable collection that takes writes."
)


@dataclasses.dataclass(frozen=True)
class WriteDone:
    """A write's or get's outcome: the request as applied (with any `full` errors added) and
    the count (upserted, deleted) or the vectors (get)."""

    request: WriteRequest
    value: Any


WriteAnswer = Callable[["WriteDone | Failure"], None]


def _settle(future: Future[Any], answer: WriteAnswer, which: int, request: WriteRequest) -> None:
    """On the event loop: a write's or get's outcome to its answer callback."""
    error = future.exception()
    if error is not None:
        log.error("A write failed: %s", error)
        answer(Failure(protocol.INTERNAL, f"The write was not applied: {error}"))
        return
    result = future.result()
    answer(WriteDone(request, result[which] if isinstance(result, tuple) else result))


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Service:
    def __init__(
        self,
        settings: Settings,
        started: float | None = None,
        on_fatal: Callable[[FlasmaError], None] | None = None,
    ) -> None:
        """`on_fatal` receives the error that stopped loading (else it is logged)."""
        self.settings = settings
        self.metrics = Metrics()
        self.state = State.LOADING
        self.started = started if started is not None else time.perf_counter()
        self.engine: Any = None
        self.codec: Codec | None = None
        self.batcher: Batcher | None = None
        self.collection: Any = None  # flasma_ws.collection.Collection with --data-dir
        self.keyed = False  # binary answers carry u64 keys
        self.info: dict[str, object] = {"state": "loading"}
        self.on_fatal = on_fatal
        self.address = f"{settings.host}:{settings.port}"  # the listener sets the bound one
        self.top_k = settings.top_k  # the default k; at most N once loaded

    # -- start-up ----------------------------------------------------------------------
    async def load(self) -> None:
        """Load vectors and warm the engine off the event loop, then start batching."""
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(
                None, startup.load_engine, self.settings, self.started, self._still_wanted
            )
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
        if self.state is State.LOADING:  # else a signal came as loading finished
            self._ready(startup.assemble(self.settings, loaded, self.metrics))

    def _ready(self, parts: startup.Parts) -> None:
        self.engine, self.codec, self.batcher = parts.engine, parts.codec, parts.batcher
        self.info, self.top_k = parts.info, parts.codec.top_k
        parts.batcher.start()
        self.collection = parts.collection
        self.keyed = parts.codec.keyed
        if self.collection is not None:
            self.collection.start(parts.batcher.run_in_engine_thread)
            self.metrics.watch_collection(self.collection)
        # Everything loaded so far (TensorFlow's ~330k objects) lives as long as the process:
        # out of the collector's sight, a full collection under load takes ~0 ms, not the
        # ~235 ms pause that was the light client's p99 beside a heavy one (docs/reliability.md).
        gc.freeze()
        self.state = State.READY
        self.metrics.ready.set(1)
        log.info(
            "Ready on %s: %d vectors of dim %d (%s) on %s as %s, %.2f s from start.",
            self.address,
            parts.engine.n,
            parts.engine.dim,
            self.info["source"],
            parts.engine.device,
            self.settings.dtype,
            time.perf_counter() - self.started,
        )

    def _still_wanted(self, _done: int = 0) -> None:
        """Progress callback of loading: a shutdown signal stops a long load between chunks
        (threads cannot be cancelled, and the process would wait for this one)."""
        if self.state is State.DRAINING:
            raise LoadCancelled

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

    def write(self, request: WriteRequest, answer: WriteAnswer) -> None:
        """Apply an upsert or delete, or read (get); `answer` gets, on the event loop, the
        count (upsert, delete) or the vectors (get), or a Failure. Never raises."""
        if self.state is not State.READY or self.batcher is None:
            what = "still loading" if self.state is State.LOADING else "shutting down"
            answer(Failure(protocol.UNAVAILABLE, f"The server is {what}; retry shortly."))
            return
        loop = asyncio.get_running_loop()
        if request.op == "get":
            keys = request.keys
            future = (
                self.collection.get(keys)
                if self.collection is not None
                else self.batcher.run_in_engine_thread(lambda: self.engine.get(keys))
            )
            future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(_settle, f, answer, 0, request)
            )
            return
        if self.collection is None:
            answer(Failure(Code.READ_ONLY, READ_ONLY_MESSAGE))
            return
        if not request.keys:  # every item was refused: nothing to log
            answer(WriteDone(request, 0))
            return
        if request.op == "upsert":
            request, new = self._within_max_rows(request)
            assert request.vectors is not None
            future = self.collection.write(request.keys, request.vectors, [], new)
            which = 0
        else:
            future = self.collection.write([], np.empty((0, self.engine.dim)), request.keys)
            which = 1
        applied = request
        future.add_done_callback(
            lambda f: loop.call_soon_threadsafe(_settle, f, answer, which, applied)
        )

    def _within_max_rows(self, request: WriteRequest) -> tuple[WriteRequest, int]:
        """The upserts that fit --max-rows; new keys beyond it get `full`, one error each."""
        c = self.collection
        room = c.room()
        fresh = [not c.engine.has(key) for key in request.keys]
        if sum(fresh) <= room:
            return request, sum(fresh)
        keep, errors, taken = [], list(request.errors), 0
        for i, is_new in enumerate(fresh):
            if is_new and taken >= room:
                message = f"The collection holds its --max-rows of {c.max_rows}; delete first."
                errors.append(ItemError(request.positions[i], Code.FULL, message))
                continue
            taken += is_new
            keep.append(i)
        assert request.vectors is not None
        errors.sort(key=lambda e: e.index)
        trimmed = dataclasses.replace(
            request,
            keys=[request.keys[i] for i in keep],
            vectors=request.vectors[keep],
            positions=[request.positions[i] for i in keep],
            errors=errors,
        )
        return trimmed, taken

    def live_info(self) -> dict[str, object]:
        """The parts of /info that change while serving: live rows, the collection's state."""
        if self.collection is None:
            return {}
        return {"n": self.engine.n, **self.collection.describe()}

    def health(self) -> tuple[int, str]:
        """/healthz: 200 while serving ("degraded" while a shard reloads), else 503."""
        if self.state is not State.READY:
            return 503, self.state.value
        return 200, "degraded" if getattr(self.engine, "degraded", False) else "ready"

    def info_document(self) -> dict[str, object]:
        """/info: what was loaded, what changes while serving (live rows, a sharded engine's
        shards as they are now), and the state."""
        shards = self.engine.live_info() if hasattr(self.engine, "live_info") else {}
        return {**self.info, **self.live_info(), **shards, "state": self.state.value}

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
        if self.collection is not None:  # first: its last writes apply in the engine thread
            await asyncio.get_running_loop().run_in_executor(None, self.collection.close)
        if self.batcher is not None:
            await self.batcher.close()
        close = getattr(self.engine, "close", None)  # a sharded engine ends its actors
        if close is not None:
            await asyncio.get_running_loop().run_in_executor(None, close)
