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
- The request head (for /ws, the WebSocket handshake request) must be complete within
  `--handshake-timeout-s` of the connection (or of the first byte of a later keep-alive
  request); otherwise the connection is closed.

`Guard` is the accounting, free of sockets; `guarded_protocols` makes uvicorn's httptools and
websockets-sansio protocol classes report to it (tests/test_uvicorn_internals.py pins the
hooks used).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
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


class State(str, enum.Enum):
    HANDSHAKING = "handshaking"  # the first request head is not complete yet
    HTTP = "http"
    WEBSOCKET = "websocket"


class Reason(str, enum.Enum):
    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"


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
        self.metrics.tcp_connections.labels(slot.state.value).inc()
        return slot

    def refuse(self, reason: Reason, message: str) -> Reason:
        self.metrics.connections_refused.labels(reason.value).inc()
        self.warn.warn(reason.value, message)
        return reason

    def move(self, key: object, state: State) -> None:
        slot = self.slots.get(key)
        if slot is None or slot.state is state:
            return
        self.metrics.tcp_connections.labels(slot.state.value).dec()
        self.metrics.tcp_connections.labels(state.value).inc()
        slot.state = state

    def release(self, key: object) -> None:
        """The connection closed; a second call for the same key does nothing."""
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        self.metrics.tcp_connections.labels(slot.state.value).dec()
        self.per_ip[slot.ip] -= 1
        if not self.per_ip[slot.ip]:
            del self.per_ip[slot.ip]

    def timed_out(self, stage: str, ip: str, timeout_s: float) -> None:
        self.metrics.connections_timed_out.labels(stage).inc()
        self.warn.warn(
            f"timeout:{stage}",
            f"Closed a connection from {ip}: no complete request head within {timeout_s:g} s "
            "(--handshake-timeout-s)",
        )


def refusal_response(reason: Reason) -> bytes:
    """A minimal, complete HTTP 503 with the usual JSON error document; the socket closes next."""
    if reason is Reason.MAX_CONNECTIONS_PER_IP:
        message = "This address holds its limit of connections (--max-connections-per-ip)."
    else:
        message = "The server holds its limit of connections (--max-connections)."
    body = protocol.encode_error(
        protocol.NO_ID, Code.TOO_MANY_CONNECTIONS, message + " Retry later."
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocols(
    guard: Guard,
) -> tuple[type[HttpToolsProtocol], type[WebSocketsSansIOProtocol]]:
    """uvicorn's HTTP and WebSocket protocol classes, reporting to this server's guard."""
    return (
        type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": guard}),
        type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": guard}),
    )


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """After the upgrade the transport talks to this protocol, so it gives the slot back."""

    guard: ClassVar[Guard]

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self.transport)
        super().connection_lost(exc)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, admitted by the guard and with a timer on each request head."""

    guard: ClassVar[Guard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slot: Slot | None = None
        self._refused = False  # a 503 was written: ignore whatever else the client sends
        self._head_timer: asyncio.TimerHandle | None = None

    # -- the connection ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admitted = self.guard.admit(transport, self.client[0] if self.client else "")
        if isinstance(admitted, Reason):
            self._refuse(admitted)
            return
        self._slot = admitted
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def _refuse(self, reason: Reason) -> None:
        self._refused = True
        self._stop_head_timer()
        self.transport.write(refusal_response(reason))
        self.transport.close()

    # -- the request head's deadline ----------------------------------------------------
    def _start_head_timer(self) -> None:
        if self._head_timer is None and self._slot is not None:
            timeout = self.guard.limits.handshake_timeout_s
            if self._slot.reserve:
                timeout = min(timeout, PROBE_HEAD_TIMEOUT_S)
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out, timeout)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, timeout_s: float) -> None:
        self._head_timer = None
        ip = self.client[0] if self.client else "?"
        self.guard.timed_out("request_head", ip, timeout_s)
        self.transport.close()

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head_timer()  # a later keep-alive request gets its own deadline

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._stop_head_timer()
        upgrade = bool(self.parser.should_upgrade()) and self._should_upgrade()
        if self._slot is not None and self._slot.reserve and (upgrade or not self._is_probe()):
            self._refuse(self._refuse_in_reserve())
            return
        if not upgrade:
            self.guard.move(self.transport, State.HTTP)
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._refused:
            return
        self.guard.move(self.transport, State.WEBSOCKET)
        super().handle_websocket_upgrade()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse_in_reserve(self) -> Reason:
        limit = self.guard.limits.max_connections
        return self.guard.refuse(
            Reason.MAX_CONNECTIONS,
            f"Refused a request from {self._slot.ip if self._slot else '?'} in a probe slot: "
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
