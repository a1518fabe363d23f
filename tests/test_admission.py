"""Connection admission (issue 18): every TCP connection counted and capped, in total and per
address, and the request head bounded in time. Real loopback sockets against an in-process
server; the per-address cases bind client sockets to other 127.0.0.0/8 addresses."""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from flasma_ws.admission import (
    PROBE_RESERVE,
    Guard,
    Limits,
    RateLimitedLog,
    Reason,
    State,
    default_max_connections,
    raise_open_file_limit,
)
from flasma_ws.errors import ConfigError
from flasma_ws.metrics import Metrics, read_samples
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings
from flasma_ws.testing import SERVE, ServerProcess, free_port, wait_ready

DIM = 8
HALF_OPEN = b"GET /ws HTTP/1.1\r\nHost: x\r\n"  # the head never ends


def base(**changes: object) -> Settings:
    return Settings(dim=DIM, demo_size=200, port=0).replace(**changes)


def connect(port: int, source: str = "127.0.0.1", send: bytes = HALF_OPEN) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(send)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


@contextmanager
def half_open(port: int, count: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [stack.enter_context(connect(port, source)) for _ in range(count)]


def samples(running: BackgroundServer) -> dict[str, float]:
    """The server's metrics read in-process: /metrics itself may be out of slots."""
    return read_samples(running.service.metrics.render().decode())


async def query_over_ws(url: str, source: str = "127.0.0.1") -> None:
    async with websockets.connect(url, local_addr=(source, 0), open_timeout=2) as ws:
        await ws.send(orjson.dumps({"id": 1, "embedding": [1.0] * DIM}).decode())
        assert orjson.loads(await ws.recv())["id"] == 1


# -- against a server ----------------------------------------------------------------------
def test_half_open_connections_are_closed_within_the_timeout_plus_one_second():
    with BackgroundServer(base(handshake_timeout_s=1.0)) as running:
        started = time.monotonic()
        with half_open(running.server.port, 5) as socks:
            assert all(read_to_eof(sock) == b"" for sock in socks)  # closed, nothing said
        took = time.monotonic() - started
        assert 0.9 <= took <= 2.0, took
        seen = samples(running)
        assert seen['flasma_connections_timed_out_total{stage="request_head"}'] == 5
        assert seen['flasma_tcp_connections{state="handshaking"}'] == 0
        assert httpx.get(running.http_url + "/healthz").status_code == 200


async def test_a_slow_later_keep_alive_request_times_out_too():
    with BackgroundServer(base(handshake_timeout_s=1.0)) as running:
        sock = connect(running.server.port, send=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with sock:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # a second request that never ends
            started = time.monotonic()
            read_to_eof(sock)
            assert time.monotonic() - started <= 2.0


def test_beyond_the_cap_refused_at_once_while_probes_still_answer():
    with BackgroundServer(base(max_connections=4)) as running:
        port = running.server.port
        with half_open(port, 4):
            assert httpx.get(running.http_url + "/healthz").status_code == 200  # a probe slot
            assert httpx.get(running.http_url + "/metrics").status_code == 200
            info = httpx.get(running.http_url + "/info")
            assert info.status_code == 503
            assert info.json()["error"]["code"] == "too_many_connections"
            with half_open(port, PROBE_RESERVE):  # the probe slots taken too
                started = time.monotonic()
                with connect(port, send=b"") as refused:
                    answer = read_to_eof(refused)
                assert time.monotonic() - started < 0.5
                assert answer.startswith(b"HTTP/1.1 503")
                assert b"too_many_connections" in answer
                seen = samples(running)
                assert seen['flasma_tcp_connections{state="handshaking"}'] == 4 + PROBE_RESERVE
        refused_total = samples(running)[
            'flasma_connections_refused_total{reason="max_connections"}'
        ]
        assert refused_total == 2  # /info in a probe slot, then the one beyond the reserve


async def test_websockets_count_against_the_cap_and_free_their_slot():
    with BackgroundServer(base(max_connections=2)) as running:
        first = await websockets.connect(running.url)
        assert samples(running)['flasma_tcp_connections{state="websocket"}'] == 1
        await first.close()
        await query_over_ws(running.url)
        seen = samples(running)
        assert seen['flasma_tcp_connections{state="websocket"}'] == 0
        assert not running.server.guard.slots


async def test_one_address_over_its_cap_does_not_cost_another_its_slot():
    with BackgroundServer(base(max_connections=8, max_connections_per_ip=3)) as running:
        port = running.server.port
        with half_open(port, 3, source="127.0.0.2"):
            with connect(port, source="127.0.0.2", send=b"") as refused:
                answer = read_to_eof(refused)
            assert answer.startswith(b"HTTP/1.1 503")
            assert b"--max-connections-per-ip" in answer
            await query_over_ws(running.url, source="127.0.0.3")
        reason = 'flasma_connections_refused_total{reason="max_connections_per_ip"}'
        assert samples(running)[reason] == 1


# -- the accounting alone ------------------------------------------------------------------
def guard(total: int = 2, per_ip: int = 10) -> Guard:
    return Guard(Limits(total, per_ip, 10.0), Metrics())


def test_the_reserve_follows_the_cap_and_per_ip_comes_first():
    g = guard(total=2, per_ip=3)
    slots = [g.admit(n, "a") for n in range(3)]
    assert [getattr(s, "reserve", None) for s in slots] == [False, False, True]
    assert g.admit(3, "a") is Reason.MAX_CONNECTIONS_PER_IP
    for n in range(3, 2 + PROBE_RESERVE):
        assert g.admit(n, f"b{n}") not in tuple(Reason)
    assert g.admit("last", "c") is Reason.MAX_CONNECTIONS
    g.release(0)
    g.release(0)  # twice: no effect
    assert g.per_ip["a"] == 2 and len(g.slots) == 1 + PROBE_RESERVE


def test_states_move_and_release_from_where_they_are():
    g = guard()
    g.admit("k", "a")
    g.move("k", State.WEBSOCKET)
    g.release("k")
    seen = read_samples(g.metrics.render().decode())
    assert {seen[f'flasma_tcp_connections{{state="{s.value}"}}'] for s in State} == {0}
    assert not g.per_ip


def test_the_log_line_is_rate_limited(caplog: pytest.LogCaptureFixture):
    now = [0.0]
    warn = RateLimitedLog(every_s=10, clock=lambda: now[0])
    for _ in range(3):
        warn.warn("k", "limit hit")
    now[0] = 11
    warn.warn("k", "limit hit")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "(2 more since the last such line)" in lines[1]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    assert raise_open_file_limit() == 4096 and calls == [(4096, 4096)]


def test_an_unraisable_open_file_limit_stays_as_it_is(monkeypatch: pytest.MonkeyPatch):
    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_file_limit() == 1024


def soft_open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise KeyError("Max open files")


def test_serve_raises_a_low_soft_open_file_limit_to_the_hard_one(tmp_path: Path):
    """A real `flasma-ws serve` started with a soft limit of 256: /info, /proc and the log
    show the hard limit in force, and the default --max-connections follows it."""
    low, hard = 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise")
    raised = low if hard == resource.RLIM_INFINITY else hard  # infinity cannot be set

    def lower_soft_limit() -> None:  # in the child, before it runs Python
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    port, log = free_port(), tmp_path / "server.log"
    command = [*SERVE, "--port", str(port), "--dim", str(DIM), "--demo-size", "100"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lower_soft_limit
        )
    server = wait_ready(ServerProcess(process, port, log, time.perf_counter()), 180)
    try:
        limits = httpx.get(server.http_url + "/info").json()["connections"]
        assert soft_open_file_limit(process.pid) == limits["open_file_limit"] == raised
        assert limits["max_connections"] == default_max_connections(raised)
    finally:
        code, _ = server.stop()
    assert code == 0
    assert f"open-file limit {raised})" in log.read_text()


def test_defaults_and_validation():
    assert default_max_connections(4096) == int(4096 * 0.8) - PROBE_RESERVE
    assert default_max_connections(1) == 1
    with pytest.raises(ConfigError, match="--handshake-timeout-s"):
        base(handshake_timeout_s=0)
    with pytest.raises(ConfigError, match="--max-connections-per-ip"):
        base(max_connections_per_ip=0)
    for flag in ("body_timeout_s", "ws_ping_timeout_s"):
        with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
            base(**{flag: 0})
    with pytest.raises(ConfigError, match="--ws-ping-interval-s"):
        base(ws_ping_interval_s=-1)
    assert base(ws_ping_interval_s=0).ws_ping_interval_s == 0  # never ping
