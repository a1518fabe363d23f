"""Connection admission: every TCP connection is counted from the moment it is accepted, capped
in total and per client address, and its HTTP request head is bounded in time.

A flood of half-open connections (`GET /ws HTTP/1.1\\r\\nHost: x\\r\\n` and never the blank
line) once held 4,080 of a 4,096 file-descriptor budget for good and locked every real client
out (issue 18). Now:

- `--max-connections` counts every connection, handshaking, plain HTTP or WebSocket. Its
  default is `DEFAULT_SHARE` of the open-file limit (raised to its hard limit at start-up),
  minus `PROBE_RESERVE`: the rest is left for the process's own files (TensorFlow's libraries,
  the vector file, logs).
- Beyond it, `PROBE_RESERVE` more connections are admitted for probes only: one whose request
  is `GET /healthz` or `GET /metrics` is answered; any other gets 503 once its head arrives,
  and a reserve connection has `PROBE_HEAD_TIMEOUT_S` to send it. Beyond the reserve a new
  connection gets a minimal 503 and is closed at once, never left hanging.
- `--max-connections-per-ip` is checked first, so that one address over its cap is refused
  without taking a slot (or the reserve) from anyone else.
- Every stage of a connection's life is bounded in time (`Stage`): the request head (for /ws,
  the WebSocket handshake request) must be complete within `--handshake-timeout-s` of the
  connection (or of the first byte of a later keep-alive request), else the connection is
  closed; a request body within `--body-timeout-s` of its head, else 408 and closed; an idle
  keep-alive connection closes after `KEEP_ALIVE_TIMEOUT_S`; a WebSocket is pinged every
  `--ws-ping-interval-s` and closed (1011) when a pong does not come within
  `--ws-ping-timeout-s` (uvicorn's keepalive, counted here). A deadline does not expire while
  the server itself holds the client's bytes back (reading paused behind a pipelined request
  or a body the app has not taken yet): the client is not the slow party then.
- A client that pipelines requests without reading the answers holds at most
  `MAX_PIPELINED` parsed requests: the connection closes after the answer to the last of
  them (`Connection: close`), and the client retries the rest (RFC 9112, 9.3.2). Answers
  wait in uvicorn's write buffer, which stops the app at its high-water mark (64 KiB).

`Guard` is the accounting, free of sockets; `guarded_protocols` makes uvicorn's httptools and
websockets-sansio protocol classes report to it, behind a `Gate` that refuses before any of
uvicorn's per-connection work (tests/test_uvicorn_internals.py pins the hooks used).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import resource
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from . import protocol
from .metrics import Metrics
from .protocol import Code

log = logging.getLogger("flasma_ws")

DEFAULT_SHARE = 0.8  # of the open-file limit, for connections; the rest for the process's files
PROBE_RESERVE = 4  # connections beyond --max-connections that may only ask /healthz or /metrics
PROBE_PATHS = frozenset({"/healthz", "/metrics"})
PROBE_HEAD_TIMEOUT_S = 1.0  # a probe sends its whole request at once
LOG_EVERY_S = 10.0  # at most one log line per limit per this many seconds
KEEP_ALIVE_TIMEOUT_S = 5  # an idle keep-alive HTTP connection closes (uvicorn's default)
MAX_PIPELINED = 64  # parsed requests one connection may queue behind the one being answered


class State(str, enum.Enum):
    HANDSHAKING = "handshaking"  # the first request head is not complete yet
    HTTP = "http"
    WEBSOCKET = "websocket"


class Reason(str, enum.Enum):
    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    MAX_PIPELINED = "max_pipelined"  # a request beyond MAX_PIPELINED queued: left unanswered


class Stage(str, enum.Enum):
    """The stages a timeout closes a connection in, with what was missing and its flag."""

    what: str
    flag: str

    REQUEST_HEAD = ("request_head", "no complete request head", "--handshake-timeout-s")
    BODY = ("body", "no complete request body", "--body-timeout-s")
    PING = ("ping", "no answer to a ping", "--ws-ping-timeout-s")

    def __new__(cls, value: str, what: str, flag: str) -> Stage:
        member = str.__new__(cls, value)
        member._value_ = value
        member.what, member.flag = what, flag
        return member


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit above the kernel's nr_open
            log.info("Could not raise the open-file limit above %d.", soft)
    return soft


def default_max_connections(open_file_limit: int) -> int:
    """`DEFAULT_SHARE` of the open-file limit, less the probe reserve (at least 1)."""
    return max(1, int(open_file_limit * DEFAULT_SHARE) - PROBE_RESERVE)


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_ip: int
    handshake_timeout_s: float
    body_timeout_s: float = 30.0
    ws_ping_interval_s: float | None = 20.0  # None: no pings
    ws_ping_timeout_s: float = 20.0
    open_file_limit: int | None = None  # the soft RLIMIT_NOFILE in force, once raised

    def document(self) -> dict[str, object]:
        """The limits in force, for GET /info."""
        constants = {
            "probe_slots": PROBE_RESERVE,
            "keep_alive_timeout_s": KEEP_ALIVE_TIMEOUT_S,
            "max_pipelined": MAX_PIPELINED,
        }
        return {**dataclasses.asdict(self), **constants}


@dataclass
class Slot:
    """One admitted connection."""

    ip: str
    state: State
    reserve: bool  # admitted beyond --max-connections: probes only


class RateLimitedLog:
    """One warning per key per `every_s`, saying how many more happened in between."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self._last: dict[str, float] = {}
        self._since: Counter[str] = Counter()

    def warn(self, key: str, message: str) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._since[key] += 1
            return
        more = self._since.pop(key, 0)
        suffix = f" ({more} more since the last such line)" if more else ""
        log.warning("%s%s; this line repeats at most every %g s.", message, suffix, self.every_s)
        self._last[key] = now


class Guard:
    """Counts connections by state and address, decides admission, feeds /metrics and the log."""

    def __init__(self, limits: Limits, metrics: Metrics, warn: RateLimitedLog | None = None):
        self.limits = limits
        self.metrics = metrics
        self.warn = warn or RateLimitedLog()
        self.slots: dict[object, Slot] = {}
        self.per_ip: Counter[str] = Counter()
        # .labels() takes a lock and a lookup: once per label, not once per connection
        self._refused = {r: metrics.connections_refused.labels(r.value) for r in Reason}
        self._open = {s: metrics.tcp_connections.labels(s.value) for s in State}

    def admit(self, key: object, ip: str) -> Slot | Reason:
        """A slot for a new connection, or why it is refused."""
        limits = self.limits
        if self.per_ip[ip] >= limits.max_connections_per_ip:
            return self.refuse(
                Reason.MAX_CONNECTIONS_PER_IP,
                f"Refused a connection from {ip}: --max-connections-per-ip "
                f"({limits.max_connections_per_ip}) reached",
            )
        if len(self.slots) >= limits.max_connections + PROBE_RESERVE:
            return self.refuse(
                Reason.MAX_CONNECTIONS,
                f"Refused a connection from {ip}: --max-connections "
                f"({limits.max_connections}) and the {PROBE_RESERVE} probe slots are taken",
            )
        slot = Slot(ip, State.HANDSHAKING, reserve=len(self.slots) >= limits.max_connections)
        self.slots[key] = slot
        self.per_ip[ip] += 1
        self._open[slot.state].inc()
        return slot

    def refuse(self, reason: Reason, message: str) -> Reason:
        self._refused[reason].inc()
        self.warn.warn(reason.value, message)
        return reason

    def move(self, key: object, state: State) -> None:
        slot = self.slots.get(key)
        if slot is None or slot.state is state:
            return
        self._open[slot.state].dec()
        self._open[state].inc()
        slot.state = state

    def release(self, key: object) -> None:
        """The connection closed; a second call for the same key does nothing."""
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        self._open[slot.state].dec()
        self.per_ip[slot.ip] -= 1
        if not self.per_ip[slot.ip]:
            del self.per_ip[slot.ip]

    def timed_out(self, stage: Stage, ip: str, timeout_s: float) -> None:
        self.metrics.connections_timed_out.labels(stage.value).inc()
        self.warn.warn(
            f"timeout:{stage.value}",
            f"Closed a connection from {ip}: {stage.what} within {timeout_s:g} s ({stage.flag})",
        )


def closing_response(status: str, code: Code, message: str, extra: str = "") -> bytes:
    """A minimal, complete HTTP response with the usual JSON error document; the socket
    closes next."""
    body = protocol.encode_error(protocol.NO_ID, code, message)
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def refusal_response(reason: Reason) -> bytes:
    """503 `too_many_connections`, for a connection beyond a cap."""
    if reason is Reason.MAX_CONNECTIONS_PER_IP:
        message = "This address holds its limit of connections (--max-connections-per-ip)."
    else:
        message = "The server holds its limit of connections (--max-connections)."
    return closing_response(
        "503 Service Unavailable",
        Code.TOO_MANY_CONNECTIONS,
        message + " Retry later.",
        "retry-after: 1\r\n",
    )


# Built once: a flood of refused connections costs a write each, not an encode.
REFUSALS = {reason: refusal_response(reason) for reason in Reason}


def body_timeout_response(timeout_s: float) -> bytes:
    """408 `request_timeout`, for a body that did not arrive in time."""
    return closing_response(
        "408 Request Timeout",
        Code.REQUEST_TIMEOUT,
        f"The request body did not arrive within {timeout_s:g} s of its head "
        "(--body-timeout-s); send the whole request at once.",
    )


def guarded_protocols(guard: Guard) -> tuple[type[Gate], type[WebSocketsSansIOProtocol]]:
    """What uvicorn makes for each new connection (a gate that hands an admitted one to its
    httptools protocol) and its WebSocket protocol class, reporting to this server's guard."""
    http = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
    return (
        type("GuardedGate", (Gate,), {"guard": guard, "protocol": http}),
        type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": guard}),
    )


class Gate(asyncio.Protocol):
    """The listener's protocol for a new connection: it asks the guard first, and only an
    admitted connection gets uvicorn's protocol (its parser, flow control, addresses and
    bookkeeping), which then takes the transport over. A refused one costs a lookup, one
    prebuilt write and a close: in a flood of 18,976 refusals, uvicorn's protocol set-up and
    teardown were most of the server's own work per refused connection."""

    guard: ClassVar[Guard]
    protocol: ClassVar[type[GuardedHttpProtocol]]

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs  # uvicorn's config, server state and app state

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        admitted = self.guard.admit(transport, ip)
        if isinstance(admitted, Reason):
            transport.write(REFUSALS[admitted])
            transport.close()
            return
        protocol = self.protocol(**self._kwargs)
        protocol.slot = admitted
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """A refused connection's bytes: ignored, it closes."""


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """After the upgrade the transport talks to this protocol, so it gives the slot back; it
    counts the connections that uvicorn's keepalive closes for want of a pong."""

    guard: ClassVar[Guard]

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def keepalive_timeout(self) -> None:
        if not (self.close_sent or self.transport.is_closing()):  # else uvicorn does nothing
            ip = self.client[0] if self.client else "?"
            self.guard.timed_out(Stage.PING, ip, self.ping_timeout or 0.0)
        super().keepalive_timeout()


class PipelineFlow(FlowControl):
    """uvicorn's flow control, but reading stays paused while a request waits in the pipeline:
    the bytes after it are more requests, each parsed into objects once read. (uvicorn
    resumes reading after every answer, so a client that pipelines thousands and reads none
    fills the server with parsed requests until its answers block the writes.)"""

    def __init__(self, transport: asyncio.Transport, pipeline: deque[Any]) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        if not self._pipeline:  # the request being answered is the last one read
            super().resume_reading()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, admitted by the guard, with a deadline on each stage that
    waits for the client (the request head, the body) and a bounded pipeline."""

    guard: ClassVar[Guard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot: Slot | None = None  # the gate admitted it
        self._refused = False  # a 503 was written: ignore whatever else the client sends
        self._dropping = False  # MAX_PIPELINED queued: later requests are left unanswered
        self._stage: Stage | None = None  # what we wait for the client to send
        self._requests = 0  # request heads begun: a stage is (stage, request)
        self._deadline: asyncio.TimerHandle | None = None
        self._armed: tuple[Stage, int] | None = None  # what the deadline is for

    # -- the connection ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = PipelineFlow(transport, self.pipeline)
        self._stage = Stage.REQUEST_HEAD
        self._follow_stage()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._follow_stage()  # once per read, not per request: most requests come whole

    def _refuse(self, reason: Reason) -> None:
        self._refused = True
        self._stage = None
        self._disarm()
        self.transport.write(REFUSALS[reason])
        self.transport.close()

    # -- deadlines ----------------------------------------------------------------------
    def _follow_stage(self) -> None:
        """A deadline for the stage the connection waits in, started when the stage began
        (for the request head: at the connection, or at a later request's first byte)."""
        waiting = None if self._stage is None else (self._stage, self._requests)
        if waiting == self._armed:
            return
        self._disarm()
        if self._stage is not None and self.slot is not None and not self._refused:
            timeout = self._timeout(self._stage)
            self._deadline = self.loop.call_later(timeout, self._expired, self._stage, timeout)
            self._armed = waiting

    def _timeout(self, stage: Stage) -> float:
        limits = self.guard.limits
        if stage is Stage.BODY:
            return limits.body_timeout_s
        if self.slot is not None and self.slot.reserve:
            return min(limits.handshake_timeout_s, PROBE_HEAD_TIMEOUT_S)
        return limits.handshake_timeout_s

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._armed = None, None

    def _expired(self, stage: Stage, timeout_s: float) -> None:
        if self.flow.read_paused:  # we hold the client's bytes back: the delay is ours
            self._deadline = self.loop.call_later(timeout_s, self._expired, stage, timeout_s)
            return
        self._deadline, self._armed = None, None
        ip = self.client[0] if self.client else "?"
        self.guard.timed_out(stage, ip, timeout_s)
        if stage is Stage.BODY:
            self._answer_body_timeout(timeout_s)
        self.transport.close()

    def _answer_body_timeout(self, timeout_s: float) -> None:
        """408, unless an answer is under way or due first (a pipelined request's)."""
        cycle = self.cycle
        if cycle is None or cycle.response_started or self.pipeline:
            return
        cycle.disconnected = True  # the app's receive() now says http.disconnect; send() no-op
        cycle.message_event.set()
        self.transport.write(body_timeout_response(timeout_s))

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._dropping:
            self._requests += 1
            self._stage = Stage.REQUEST_HEAD  # a later keep-alive request gets its own deadline

    def on_headers_complete(self) -> None:
        if self._refused or self._dropping:
            return
        upgrade = bool(self.parser.should_upgrade()) and self._should_upgrade()
        if self.slot is not None and self.slot.reserve and (upgrade or not self._is_probe()):
            self._refuse(self._refuse_in_reserve())
            return
        if not upgrade and len(self.pipeline) >= MAX_PIPELINED:
            self._drop_the_rest()
            return
        self._stage = None if upgrade else Stage.BODY
        if upgrade:
            self._disarm()
        else:
            self.guard.move(self.transport, State.HTTP)
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._refused or self._dropping:
            return
        self.guard.move(self.transport, State.WEBSOCKET)
        super().handle_websocket_upgrade()

    def on_body(self, body: bytes) -> None:
        if not (self._refused or self._dropping):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not (self._refused or self._dropping):
            self._stage = None
            super().on_message_complete()

    def _drop_the_rest(self) -> None:
        """MAX_PIPELINED requests wait: the newest closes the connection after its answer;
        the requests after it are parsed and left, for the client to retry."""
        self._dropping, self._stage = True, None
        self.cycle.keep_alive = False
        self.guard.refuse(
            Reason.MAX_PIPELINED,
            f"Closing a connection from {self.slot.ip if self.slot else '?'} after its "
            f"{MAX_PIPELINED} pipelined requests waiting to be answered",
        )

    def _refuse_in_reserve(self) -> Reason:
        limit = self.guard.limits.max_connections
        return self.guard.refuse(
            Reason.MAX_CONNECTIONS,
            f"Refused a request from {self.slot.ip if self.slot else '?'} in a probe slot: "
            f"--max-connections ({limit}) reached and it asked for neither /healthz nor /metrics",
        )

    def _is_probe(self) -> bool:
        if self.parser.get_method() != b"GET":
            return False
        try:
            path = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            return False
        return path is not None and path.decode("latin-1") in PROBE_PATHS
