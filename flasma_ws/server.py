"""The listener: uvicorn drives our ASGI app on one port (HTTP via httptools, WebSocket via the
websockets library's sans-I/O protocol), and we own shutdown.

Shutdown on SIGTERM/SIGINT, in order: /healthz turns 503 and the listening socket closes;
everything queued is answered; every WebSocket closes with 1001; the process exits 0. A
second signal, or `drain_timeout_s`, cuts the drain short.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import math
import socket
import ssl
import threading
import time
from types import FrameType

import uvicorn

from .admission import (
    KEEP_ALIVE_TIMEOUT_S,
    PROBE_RESERVE,
    Guard,
    Limits,
    default_max_connections,
    guarded_protocols,
    raise_open_file_limit,
)
from .app import App
from .errors import ConfigError, FlasmaError
from .service import Service
from .settings import Settings

log = logging.getLogger("flasma_ws")


def uvicorn_config(settings: Settings, app: App, guard: Guard) -> uvicorn.Config:
    http, ws = guarded_protocols(guard)  # uvicorn's httptools and websockets-sansio, guarded
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=http,
        ws=ws,
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=settings.ws_compression,
        ws_ping_interval=guard.limits.ws_ping_interval_s,
        ws_ping_timeout=guard.limits.ws_ping_timeout_s,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(math.ceil(settings.drain_timeout_s), 1),
        ssl_certfile=settings.certfile,
        ssl_keyfile=settings.keyfile,
    )


class ClientFrameFilter(logging.Filter):
    """uvicorn logs a text frame that is not valid UTF-8 as an error with a traceback. It is
    the client's mistake, and the connection is closed with 1007 anyway: one info line."""

    MESSAGE = "A client sent a text frame that is not valid UTF-8; closed its connection (1007)."

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, UnicodeDecodeError):
            return True
        record.exc_info, record.exc_text, record.args = None, None, ()
        record.levelno, record.levelname, record.msg = logging.INFO, "INFO", self.MESSAGE
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def _filter_client_frames() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientFrameFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(ClientFrameFilter())


class FlasmaServer(uvicorn.Server):
    def __init__(self, settings: Settings, started: float | None = None) -> None:
        _filter_client_frames()
        self.service = Service(settings, started, on_fatal=self._fatal)
        self.settings = settings
        self.fatal: FlasmaError | None = None
        self._draining: asyncio.Task[None] | None = None
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.app = App(self.service)
        self.guard = Guard(connection_limits(settings), self.service.metrics)
        self.app.connection_limits = self.guard.limits.document()
        super().__init__(uvicorn_config(settings, self.app, self.guard))

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.event_loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:  # --port 0 picks one: log that one
            self.service.address = f"{self.settings.host}:{self.port}"
        limits = self.guard.limits
        pings = (
            f"pinged every {limits.ws_ping_interval_s:g} s, closed without a pong in "
            f"{limits.ws_ping_timeout_s:g} s"
            if limits.ws_ping_interval_s
            else "not pinged"
        )
        log.info(
            "Connections: at most %d (and %d for /healthz and /metrics; open-file limit %s), "
            "%d per client address; a request head must be complete within %g s, a body "
            "within %g s after; WebSockets %s.",
            limits.max_connections,
            PROBE_RESERVE,
            limits.open_file_limit,
            limits.max_connections_per_ip,
            limits.handshake_timeout_s,
            limits.body_timeout_s,
            pings,
        )

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.servers[0].sockets[0].getsockname()[1])

    def _fatal(self, exc: FlasmaError) -> None:
        self.fatal = exc
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): first signal drains, a second one forces exit.

        Unlike uvicorn's, it does not re-raise the signal afterwards, so a drain exits 0.
        """
        if self._draining is not None or self.event_loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        self.event_loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        log.info("Draining: answering queued requests, then closing connections.")
        for listener in self.servers:
            listener.close()  # stop accepting
        try:
            await asyncio.wait_for(self._drain_in_order(), self.settings.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning(
                "Drain timeout (%.1f s) passed; closing anyway.", self.settings.drain_timeout_s
            )
        self.should_exit = True

    async def _drain_in_order(self) -> None:
        await self.service.drain()  # every queued request answered
        await self.app.close_connections(1001)  # then each WebSocket, after its answers


def connection_limits(settings: Settings) -> Limits:
    """The connection limits in force; raises the soft open-file limit to the hard one first,
    since the default --max-connections is a share of it."""
    open_files = raise_open_file_limit()
    return Limits(
        max_connections=settings.max_connections or default_max_connections(open_files),
        max_connections_per_ip=settings.max_connections_per_ip,
        handshake_timeout_s=settings.handshake_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        ws_ping_interval_s=settings.ws_ping_interval_s or None,  # 0: never ping
        ws_ping_timeout_s=settings.ws_ping_timeout_s,
        open_file_limit=open_files,
    )


def serve(settings: Settings, started: float | None = None) -> None:
    """Run until a signal drains the server; raises the FlasmaError that stopped loading.

    The TLS files and the address are checked first, before any vector or TensorFlow work,
    so that a taken port or a bad certificate is one error line at once."""
    check_tls(settings)
    listener = bind(settings.host, settings.port)
    server = FlasmaServer(settings, started)
    server.run(sockets=[listener])
    # The process ends next. Python's final garbage collections walk every object TensorFlow
    # made (2.3 s of an idle server's 2.5 s exit, measured); frozen objects are skipped.
    gc.freeze()
    if server.fatal is not None:
        raise server.fatal


def bind(host: str, port: int) -> socket.socket:
    """The listening socket for host:port, or a ConfigError that says what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(
            f"--host {host} is not an IP address or a name this machine can resolve; "
            "give an address such as 127.0.0.1 (this machine only) or 0.0.0.0 (every network)."
        ) from exc
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise ConfigError(_bind_advice(host, port, exc)) from exc
    listener.set_inheritable(True)
    return listener


def _bind_advice(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where} is already in use by another program (another flasma-ws?); stop it, "
            "or choose another --port (0 picks a free one)."
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0."
    if exc.errno == errno.EACCES:
        return f"Listening on {where} needs privileges; choose a --port above 1023."
    return f"Cannot listen on {where} ({exc.strerror}); check --host and --port."


def check_tls(settings: Settings) -> None:
    """Load --certfile/--keyfile once up front: a bad file is a ConfigError, not a traceback."""
    if settings.certfile is None or settings.keyfile is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.certfile, settings.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"Cannot load the TLS certificate {settings.certfile} with the key "
            f"{settings.keyfile} ({exc}); give a PEM certificate and its PEM private key."
        ) from exc


class BackgroundServer:
    """A real server in a thread of this process, on a loopback port: for tests and embedding.

    with BackgroundServer(settings) as server:
        server.url  # ws://127.0.0.1:PORT/ws
    """

    def __init__(self, settings: Settings, ready_timeout_s: float = 120.0) -> None:
        self.server = FlasmaServer(settings.replace(host="127.0.0.1", port=settings.port or 0))
        self.ready_timeout_s = ready_timeout_s
        self._thread = threading.Thread(target=self.server.run, name="flasma-server", daemon=True)

    @property
    def service(self) -> Service:
        return self.server.service

    @property
    def http_url(self) -> str:
        scheme = "https" if self.server.settings.certfile else "http"
        return f"{scheme}://127.0.0.1:{self.server.port}"

    @property
    def url(self) -> str:
        scheme = "wss" if self.server.settings.certfile else "ws"
        return f"{scheme}://127.0.0.1:{self.server.port}/ws"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.server.fatal is not None:
                raise self.server.fatal
            if self.server.started and self.service.state.value == "ready":
                return self
            if not self._thread.is_alive():
                raise FlasmaError("The server thread ended before it was ready.")
            time.sleep(0.02)
        raise FlasmaError(f"The server was not ready within {self.ready_timeout_s} s.")

    def drain(self) -> None:
        """What SIGTERM does, for a server in a thread."""
        assert self.server.event_loop is not None
        self.server.event_loop.call_soon_threadsafe(self.server.begin_drain)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
