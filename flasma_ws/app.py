"""Routes: the ASGI app that uvicorn drives. Sockets and routes only; no tensors.

/ws        WebSocket, one Connection per client (docs/protocol.md)
POST /cos  Flasma's route: {"embedding": [...]} -> {"result": [[index, score], ...]}
GET /healthz, GET /info, GET /metrics
GET /      the dashboard (static files from flasma_ws/dashboard/), fed by GET /stats
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import orjson

from . import assets, auth, protocol, stats
from . import metrics as metrics_module
from .batcher import INTERNAL_MESSAGE, Failure
from .errors import ProtocolError
from .protocol import Code, Query
from .service import Service, State, WriteDone
from .text import counted
from .write_codec import WriteRequest, encode_get_answer, encode_write_answer

log = logging.getLogger("flasma_ws")

Scope = dict[str, Any]
Message = dict[str, Any]
JSON_HEADERS = [(b"content-type", b"application/json")]


class Connection:
    """One WebSocket client: reads frames, submits queries, sends each answer exactly once.

    In-flight queries (received, not yet answered) are capped at max_inflight: at the cap we
    stop reading, so the client is slowed by TCP rather than growing our memory.
    """

    def __init__(self, service: Service, send: Any) -> None:
        self.service = service
        self.send = send
        self.alive = True
        self.inflight = 0
        self.max_inflight = service.settings.max_inflight
        self.outbox: deque[tuple[Message, float, str]] = deque()
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.closing: int | None = None
        self.sender: asyncio.Task[None] | None = None

    async def run(self, receive: Any) -> None:
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            while True:
                if self.inflight >= self.max_inflight:
                    self.room.clear()
                    await self.room.wait()
                    if not self.alive:  # the sender found the client gone
                        break
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                self.inflight += 1
                self._handle(message, time.perf_counter())
        finally:
            self.alive = False
            self.sender.cancel()

    def _handle(self, message: Message, received: float) -> None:
        request_id: protocol.RequestId = None
        try:
            codec = self.service.require_codec()
            data = message.get("bytes")
            query = (
                codec.parse_binary(data) if data is not None else codec.parse_text(message["text"])
            )
            request_id = query.id
            if isinstance(query, WriteRequest):
                request_id = query.id
                self.service.write(
                    query, lambda done: self._write_answer(request_id, done, received)
                )
                return
            self.service.submit(query, lambda result: self._answer(query, result, received), self)
        except ProtocolError as exc:
            self._push_error(exc.request_id, exc.code, exc.message, received)
        except Exception:
            log.exception("Handling a WebSocket frame failed.")
            self._push_error(request_id, protocol.INTERNAL, INTERNAL_MESSAGE, received)

    def _answer(
        self, query: Query, result: tuple[np.ndarray, np.ndarray] | Failure, received: float
    ) -> None:
        if isinstance(result, Failure):
            self._push_error(query.id, result.code, result.message, received)
            return
        try:
            frame = protocol.Codec.encode_result(query, *result, self.service.keyed)
        except Exception:
            log.exception("Encoding an answer failed.")
            self._push_error(query.id, protocol.INTERNAL, INTERNAL_MESSAGE, received)
            return
        self.service.metrics.queries.inc(query.count)
        if query.binary:
            self._push({"type": "websocket.send", "bytes": frame}, received, "ok")
        else:
            self._push({"type": "websocket.send", "text": frame.decode()}, received, "ok")

    def _write_answer(
        self, request_id: protocol.RequestId, done: WriteDone | Failure, received: float
    ) -> None:
        if isinstance(done, Failure):
            self._push_error(request_id, done.code, done.message, received)
            return
        frame = encode_write_outcome(done)
        self._push({"type": "websocket.send", "text": frame.decode()}, received, "ok")

    def _push_error(
        self, request_id: protocol.RequestId, code: str, text: str, received: float
    ) -> None:
        frame = protocol.Codec.encode_error(request_id, code, text).decode()
        self._push({"type": "websocket.send", "text": frame}, received, code)

    def _push(self, message: Message, received: float, outcome: str) -> None:
        self.outbox.append((message, received, outcome))
        self.wake.set()

    async def _send_loop(self) -> None:
        metrics = self.service.metrics
        outcomes: dict[str, Any] = {}
        latency = metrics.latency_seconds.labels("ws")
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.outbox:
                    message, received, outcome = self.outbox.popleft()
                    await self.send(message)  # waits while the client's socket buffer is full
                    self.inflight -= 1
                    self.room.set()
                    counter = outcomes.get(outcome)
                    if counter is None:  # .labels() costs a lock and a lookup: once per outcome
                        counter = outcomes[outcome] = metrics.requests.labels("ws", outcome)
                    counter.inc()
                    latency.observe(time.perf_counter() - received)
                if self.closing is not None and self.inflight == 0:
                    await self.send({"type": "websocket.close", "code": self.closing})
                    return
        except Exception:  # the client went away mid-send (cancellation is not an Exception)
            self.alive = False
            self.room.set()  # a reader parked at the in-flight cap must wake up to leave

    async def close_after_flush(self, code: int) -> None:
        """Send every pending answer, then close with `code` (1001 when the server drains)."""
        self.closing = code
        self.wake.set()
        if self.sender is not None:
            await asyncio.gather(self.sender, return_exceptions=True)


class App:
    """The ASGI application: one instance per server. It owns its WebSocket connections."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.connections: set[Connection] = set()
        self.stats = stats.StatsFeed(service.metrics.registry)
        self.connection_limits: dict[str, object] = {}  # for /info; the listener sets them

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def close_connections(self, code: int) -> None:
        """Send every connection's pending answers, then close it with `code` (1001: draining)."""
        await asyncio.gather(
            *(c.close_after_flush(code) for c in list(self.connections)), return_exceptions=True
        )

    # -- lifespan ----------------------------------------------------------------------
    async def _lifespan(self, receive: Any, send: Any) -> None:
        loading: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Listen first and load in the background, so /healthz can say 503 meanwhile.
                loading = asyncio.get_running_loop().create_task(self.service.load())
                self.stats.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if loading is not None and not loading.done():
                    loading.cancel()
                await self.stats.stop()
                await self.service.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- WebSocket ---------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        route = ROUTE_OF.get(scope["path"])
        if route is None or route.method != WEBSOCKET:
            await _reject(send, Code.NOT_FOUND, f"WebSocket connections go to {WS_PATH}.")
            return
        refusal = self._refusal(route, scope) or self._handshake_refusal()
        if refusal is not None:
            await _reject(send, *refusal)
            return
        # The selected subprotocol is the plain name, never the one that carries the token.
        chosen = auth.selected_subprotocol(scope.get("subprotocols") or [])
        await send({"type": "websocket.accept", "subprotocol": chosen})
        connection = Connection(self.service, send)
        self.connections.add(connection)
        self.service.metrics.connections.inc()
        try:
            await connection.run(receive)
        finally:
            self.connections.discard(connection)
            self.service.metrics.connections.dec()

    def _handshake_refusal(self) -> tuple[Code, str] | None:
        """(code, message) when the connection limit is reached or the server is not ready."""
        limit = self.service.settings.max_connections
        if limit is not None and len(self.connections) >= limit:
            return (
                Code.TOO_MANY_CONNECTIONS,
                f"The server holds its limit of {counted(limit, 'connection')}; retry later.",
            )
        if self.service.state is not State.READY:
            return Code.UNAVAILABLE, f"The server is {self.service.state.value}; retry shortly."
        return None

    def _refusal(self, route: Route, scope: Scope) -> tuple[Code, str] | None:
        """(code, message) when the token or the browser Origin is not accepted, else None."""
        settings = self.service.settings
        if not route.guarded:
            return None
        headers = dict(scope["headers"])
        if settings.token is not None and not _authorized(scope, headers, settings.token):
            return Code.UNAUTHORIZED, (
                "Send the header 'Authorization: Bearer <token>' (browsers, on /ws: the "
                "subprotocols 'flasma.bearer' and 'flasma.bearer.<base64url token>')."
            )
        origin = headers.get(b"origin")
        allowed = settings.allowed_origins
        if origin is not None and allowed is not None and origin.decode("latin-1") not in allowed:
            return Code.FORBIDDEN_ORIGIN, "This Origin is not allowed (see --allowed-origins)."
        return None

    # -- HTTP --------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        route = ROUTE_OF.get(path)
        if method in ("GET", "HEAD") and path.startswith(VECTOR_PREFIX):
            route = VECTOR_ROUTE  # GET /vectors/{key}, any key (even "delete")
        elif route is None and path.startswith(ASSETS_PATH):
            route = ASSET_ROUTE  # the dashboard's files
        if route is None:
            await _error(send, Code.NOT_FOUND, f"No route {path}; see {ROUTE_LIST}.")
        elif route.method == WEBSOCKET:  # a plain HTTP request to the WebSocket route
            await _error(
                send,
                Code.UPGRADE_REQUIRED,
                f"{path} is a WebSocket endpoint: connect with a WebSocket client "
                f"(ws://HOST:PORT{path}), or send HTTP queries to POST /cos.",
            )
        elif method not in route.allowed:
            allow = [(b"allow", ", ".join(route.allowed).encode())]
            message = f"{path} takes {route.method}, not {method}."
            await _error(send, Code.METHOD_NOT_ALLOWED, message, allow)
        elif (refusal := self._refusal(route, scope)) is not None:
            await _error(send, *refusal)
        else:
            assert route.handler is not None  # every HTTP route has one
            await route.handler(self, scope, receive, send)

    async def _healthz(self, _scope: Scope, _receive: Any, send: Any) -> None:
        status, text = self.service.health()  # 200 "degraded" while a shard reloads
        await _respond(send, status, {"status": text})

    async def _info(self, _scope: Scope, _receive: Any, send: Any) -> None:
        info = {**self.service.info_document(), "connections": self.connection_limits}
        await _respond(send, 200, {**info, "state": self.service.state.value})

    async def _metrics(self, _scope: Scope, _receive: Any, send: Any) -> None:
        content_type = [(b"content-type", metrics_module.CONTENT_TYPE.encode())]
        await _respond(send, 200, self.service.metrics.render(), content_type)

    async def _vectors_upsert(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._http_write(scope, receive, send, "upsert")

    async def _vectors_delete(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._http_write(scope, receive, send, "delete")

    async def _vector_get(self, scope: Scope, receive: Any, send: Any) -> None:
        raw = scope["path"][len(VECTOR_PREFIX) :]
        key: object = raw
        if self.service.codec is not None and self.service.engine.key_type == "int":
            key = int(raw) if raw.isdigit() else raw  # not an int: bad_key names it
        body = orjson.dumps({"keys": [key]})
        await self._http_write(scope, receive, send, "get", body)

    async def _http_write(
        self, scope: Scope, receive: Any, send: Any, op: str, body: bytes | None = None
    ) -> None:
        """POST /vectors, POST /vectors/delete, GET /vectors/{key}: answers as on /ws,
        errors as for /cos (a bad item: the code of its error and the frame's answer)."""
        received = time.perf_counter()
        route = f"vectors_{op}"
        try:
            if body is None:
                body = await _read_body(receive, self.service.settings.max_body_bytes)
            request = self.service.require_codec().parse_http_op(body, op)
            future: asyncio.Future[WriteDone | Failure] = asyncio.get_running_loop().create_future()
            self.service.write(request, lambda done: _settle(future, done))
            outcome: WriteDone | Failure = await future
        except ProtocolError as exc:
            outcome = Failure(exc.code, exc.message)
        except Exception:
            log.exception("Handling %s failed.", scope["path"])
            outcome = Failure(protocol.INTERNAL, INTERNAL_MESSAGE)
        code = await self._send_write_outcome(send, op, outcome)
        self.service.metrics.requests.labels(route, code).inc()
        self.service.metrics.latency_seconds.labels(route).observe(time.perf_counter() - received)

    async def _send_write_outcome(self, send: Any, op: str, outcome: WriteDone | Failure) -> str:
        if isinstance(outcome, Failure):
            await _error(send, outcome.code, outcome.message)
            return outcome.code
        if op != "get":
            await _respond(send, 200, encode_write_outcome(outcome))
            return "ok"
        request = outcome.request
        if request.errors:  # the one key is malformed
            error = request.errors[0]
            await _error(send, error.code, error.message)
            return error.code
        vector = outcome.value[0]
        if vector is None:
            key = request.keys[0]
            await _error(send, Code.NOT_FOUND, f"No live row has the key {key!r}.")
            return Code.NOT_FOUND
        item = {"key": request.keys[0], "embedding": vector}
        await _respond(send, 200, orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY))
        return "ok"

    async def _stats(self, scope: Scope, _receive: Any, send: Any) -> None:
        try:
            since = _since(scope.get("query_string", b""))
        except ProtocolError as exc:
            await _error(send, exc.code, exc.message)
            return
        feed = {**self.stats.document(since), **stats.service_part(self.service)}
        await _respond(send, 200, feed)

    async def _asset(self, scope: Scope, _receive: Any, send: Any) -> None:
        found = assets.asset(scope["path"])
        if found is None:
            await _error(send, Code.NOT_FOUND, f"No dashboard file {scope['path']}; open / .")
            return
        kind, body = found
        await _respond(send, 200, body, [(b"content-type", kind), *assets.HEADERS])

    async def _cos(self, scope: Scope, receive: Any, send: Any) -> None:
        received = time.perf_counter()
        metrics = self.service.metrics
        try:
            body = await _read_body(receive, self.service.settings.max_body_bytes)
            query = self.service.require_codec().parse_cos(body)
            future: asyncio.Future[tuple[np.ndarray, np.ndarray] | Failure] = (
                asyncio.get_running_loop().create_future()
            )
            self.service.submit(query, lambda result: _settle(future, result), HttpPeer.of(scope))
            result = await future
        except ProtocolError as exc:
            result = Failure(exc.code, exc.message)
        except Exception:
            log.exception("Handling POST /cos failed.")
            result = Failure(protocol.INTERNAL, INTERNAL_MESSAGE)
        if isinstance(result, Failure):
            await _error(send, result.code, result.message)
            outcome = result.code
        else:
            await _respond(send, 200, protocol.Codec.encode_cos(*result))
            outcome = "ok"
            metrics.queries.inc()
        metrics.requests.labels("cos", outcome).inc()
        metrics.latency_seconds.labels("cos").observe(time.perf_counter() - received)


def _authorized(scope: Scope, headers: dict[bytes, bytes], token: str) -> bool:
    """The Authorization header, or on /ws the subprotocol a browser can send instead."""
    if auth.header_ok(headers.get(b"authorization", b""), token):
        return True
    return scope["type"] == "websocket" and auth.subprotocol_ok(
        scope.get("subprotocols") or [], token
    )


def _since(query_string: bytes) -> float | None:
    """/stats?since=T: only the seconds after unix time T (the last `t` a dashboard holds)."""
    values = parse_qs(query_string.decode("latin-1")).get("since")
    if not values:
        return None
    try:
        since = float(values[-1])
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise ProtocolError(
            protocol.BAD_REQUEST, "since must be a unix time in seconds (the last t you hold)."
        )
    return since


Handler = Callable[[App, Scope, Any, Any], Awaitable[None]]
WEBSOCKET = "WEBSOCKET"  # the method of the WebSocket route: HTTP requests to it get 426


@dataclass(frozen=True)
class HttpPeer:
    """One keep-alive HTTP connection to /cos, by its client address: a flow of the fair
    batcher, so that one busy HTTP client waits behind its own queries, not others'. Its
    requests are never skipped (an HTTP client's departure shows only when we answer)."""

    client: tuple[str, int] | None
    alive: bool = True

    @classmethod
    def of(cls, scope: Scope) -> HttpPeer:
        client = scope.get("client")
        return cls(tuple(client) if client else None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Route:
    """One route: dispatch, auth, 404 and 405 (with its Allow header) are derived from these."""

    path: str
    method: str  # GET routes answer HEAD too
    guarded: bool  # needs the token and an allowed Origin (when set); probes stay open
    handler: Handler | None = None  # HTTP routes; /ws is served by Connection

    @property
    def allowed(self) -> tuple[str, ...]:
        return (self.method, "HEAD") if self.method == "GET" else (self.method,)


WS_PATH = "/ws"
VECTOR_PREFIX = "/vectors/"
VECTOR_ROUTE = Route("/vectors/{key}", "GET", guarded=True, handler=App._vector_get)
ASSETS_PATH = f"/{assets.FOLDER}/"
ROUTES = (
    Route("/info", "GET", guarded=True, handler=App._info),
    Route("/cos", "POST", guarded=True, handler=App._cos),
    Route("/vectors", "POST", guarded=True, handler=App._vectors_upsert),
    Route("/vectors/delete", "POST", guarded=True, handler=App._vectors_delete),
    Route(WS_PATH, WEBSOCKET, guarded=True),
    Route("/healthz", "GET", guarded=False, handler=App._healthz),
    Route("/metrics", "GET", guarded=False, handler=App._metrics),
    Route("/stats", "GET", guarded=True, handler=App._stats),
    # The dashboard's files are open (the page asks for the token); its feed is guarded.
    Route("/", "GET", guarded=False, handler=App._asset),
    Route(ASSETS_PATH, "GET", guarded=False, handler=App._asset),
)
ROUTE_OF = {route.path: route for route in ROUTES}
ASSET_ROUTE = ROUTE_OF[ASSETS_PATH]  # serves every path under it
ROUTE_LIST = ", ".join(route.path for route in (*ROUTES, VECTOR_ROUTE))


def encode_write_outcome(done: WriteDone) -> bytes:
    if done.request.op == "get":
        return encode_get_answer(done.request, done.value)
    return encode_write_answer(done.request, done.value)


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


async def _read_body(receive: Any, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError(protocol.BAD_REQUEST, "The client disconnected mid-body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(Code.TOO_LARGE, f"The body exceeds the limit of {limit} bytes.")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _respond(send: Any, status: int, body: object, headers: list | None = None) -> None:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": (headers or JSON_HEADERS) + [(b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


EXTRA_HEADERS: dict[str, list[tuple[bytes, bytes]]] = {
    Code.UNAUTHORIZED: [(b"www-authenticate", b"Bearer")],
    Code.UPGRADE_REQUIRED: [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],  # RFC 9110
}


async def _error(send: Any, code: str, message: str, headers: list | None = None) -> None:
    """An HTTP error document with the code's status (and the headers its status calls for)."""
    extra = EXTRA_HEADERS.get(code, []) + (headers or [])
    body = protocol.encode_error(protocol.NO_ID, code, message)
    await _respond(send, protocol.http_status(code), body, JSON_HEADERS + extra if extra else None)


async def _reject(send: Any, code: Code, message: str) -> None:
    """Refuse a WebSocket handshake with the code's HTTP status and a JSON body."""
    body = protocol.encode_error(protocol.NO_ID, code, message)
    start = {"type": "websocket.http.response.start", "status": code.status}
    await send({**start, "headers": JSON_HEADERS})
    await send({"type": "websocket.http.response.body", "body": body})
