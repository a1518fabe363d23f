"""Hostile clients at the connection level (issue 18), against a server subprocess on loopback:

    python -m reliability.hostile                    # 5,000 half-open, a 5,000-connection flood
    python -m reliability.hostile --half-open 1000 --flood 2000 --seconds 3
    python -m reliability.hostile --pin              # the floods on CPU 1, the rest on CPU 0

1. Slow-handshake flood: --half-open connections, 200 from each of the addresses 127.0.1.1,
   127.0.1.2, ..., each sending `GET /ws HTTP/1.1\\r\\nHost: x\\r\\n` and never the blank line;
   the server must close every one within --handshake-timeout-s + 1 s.
2. Connection flood: --flood connections opened as fast as possible (256 at a time) from the
   one address 127.0.2.1, up to 1,024 open at once, each sending nothing: beyond
   --max-connections-per-ip (256) they are refused at once, the rest time out.
3. Slow reader of /cos answers: --slow-readers connections from 127.0.3.1, each with a 4 KiB
   receive buffer, pipelining --slow-requests POST /cos queries with k = max_k and never
   reading an answer; the server must stop reading them (TCP pushes back) and hold bounded
   memory: its RSS may grow by at most --slow-rss-mib while they hang on.

Beside each, a well-behaved client on 127.0.0.2 connects and sends one query at a time for
--seconds; its connect time and latency are compared with a run without a flood (targets:
connects in <= 1 s, p99 <= 2 x the baseline's, 0 failures). Each phase reports the CPU
seconds the server and this script (the attacker) spent in it; --pin puts the server and
the well-behaved client on CPU 0 and this script on CPU 1, so that the attacker's own work
does not take the server's CPU. Loopback only; every flood is bounded in count and time and
ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import websockets

from reliability.common import (
    ServerProcess,
    metrics,
    percentiles_ms,
    raise_nofile,
    run_against_server,
    warn_if_busy,
)

HALF_OPEN = b"GET /ws HTTP/1.1\r\nHost: x\r\n"
PER_ADDRESS = 200  # half-open connections per source address: under the per-address cap
GOOD_ADDRESS = "127.0.0.2"
FLOOD_ADDRESS = "127.0.2.1"
SLOW_ADDRESS = "127.0.3.1"
SLOW_RCVBUF = 4096  # the slow reader's receive buffer: its window fills after ~1 answer
FLOOD_IN_FLIGHT = 1024  # connections the flood keeps open at once: 4 x the per-address cap
HANDSHAKE_TIMEOUT_S = 2.0  # the server's, shortened so that the run stays short


@dataclass
class Probe:
    """What the well-behaved client saw."""

    connect_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    failures: int = 0

    def line(self, name: str) -> str:
        p50, p99 = percentiles_ms(self.latencies_s, (50, 99))
        return (
            f"{name}: connect {self.connect_s * 1000:.0f} ms, {len(self.latencies_s)} queries, "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, failures {self.failures}"
        )


async def good_client(url: str, dim: int, seconds: float) -> Probe:
    probe = Probe()
    vector = np.random.default_rng(1).standard_normal(dim).tolist()
    started = time.perf_counter()
    try:
        async with websockets.connect(url, local_addr=(GOOD_ADDRESS, 0), open_timeout=5) as ws:
            probe.connect_s = time.perf_counter() - started
            stop = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < stop:
                sent = time.perf_counter()
                await ws.send(orjson.dumps({"id": n, "embedding": vector, "k": 10}).decode())
                answer = orjson.loads(await ws.recv())
                probe.latencies_s.append(time.perf_counter() - sent)
                probe.failures += "error" in answer
                n += 1
    except (OSError, websockets.WebSocketException, asyncio.TimeoutError):
        probe.failures += 1
    return probe


async def good_client_apart(
    url: str, dim: int, seconds: float, cpus: set[int] | None = None
) -> Probe:
    """The well-behaved client in a process of its own, so that the flood's client-side work
    (on this event loop) does not show in its latency."""
    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=pin, initargs=(cpus,)) as pool:
        return await loop.run_in_executor(pool, run_good_client, url, dim, seconds)


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_good_client(url: str, dim: int, seconds: float) -> Probe:
    return asyncio.run(good_client(url, dim, seconds))


async def half_open(port: int, source: str, timeout_s: float) -> float | None:
    """Seconds until the server closed a half-open connection; None if it answered instead
    or had not closed it within twice the timeout."""
    opened = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(HALF_OPEN)
    try:
        data = await asyncio.wait_for(reader.read(), 2 * timeout_s + 1)
        return time.monotonic() - opened if not data else None
    except asyncio.TimeoutError:
        return None
    finally:
        writer.close()


async def slow_handshake_flood(port: int, count: int) -> list[float | None]:
    sources = [f"127.0.1.{1 + n // PER_ADDRESS}" for n in range(count)]
    tasks = []
    for start in range(0, count, 100):  # 100 at a time: a burst of thousands overflows backlogs
        tasks += [
            asyncio.create_task(half_open(port, source, HANDSHAKE_TIMEOUT_S))
            for source in sources[start : start + 100]
        ]
        await asyncio.sleep(0.01)
    return list(await asyncio.gather(*tasks))


async def flood_one(port: int, gate: asyncio.Semaphore) -> str:
    """Open a connection, send nothing, wait for the server to refuse or time it out."""
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(FLOOD_ADDRESS, 0)
            )
        except OSError:
            return "failed to connect"
        try:
            data = await asyncio.wait_for(reader.read(), 2 * HANDSHAKE_TIMEOUT_S + 1)
            return "refused (503)" if data.startswith(b"HTTP/1.1 503") else "timed out"
        except asyncio.TimeoutError:
            return "still open"
        finally:
            writer.close()


async def connection_flood(port: int, count: int) -> dict[str, int]:
    gate = asyncio.Semaphore(FLOOD_IN_FLIGHT)
    done = await asyncio.gather(*(flood_one(port, gate) for _ in range(count)))
    return {outcome: done.count(outcome) for outcome in sorted(set(done))}


def slow_request(dim: int, k: int) -> bytes:
    body = orjson.dumps({"embedding": np.ones(dim).tolist(), "k": k})
    head = f"POST /cos HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@dataclass
class SlowReaders:
    """Connections that pipeline /cos queries and never read an answer."""

    socks: list[socket.socket] = field(default_factory=list)
    written: int = 0  # bytes the kernel took from us, all connections together

    async def pump(self, port: int, count: int, requests: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            sock.bind((SLOW_ADDRESS, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            self.socks.append(sock)
        await asyncio.gather(*(self._write(sock, requests, request) for sock in self.socks))

    async def _write(self, sock: socket.socket, requests: int, request: bytes) -> None:
        loop, batch = asyncio.get_running_loop(), 64
        for start in range(0, requests, batch):
            data = request * min(batch, requests - start)
            await loop.sock_sendall(sock, data)  # waits while the server does not read
            self.written += len(data)

    async def stalled(self, quiet_s: float = 1.0, limit_s: float = 30.0) -> float:
        """Seconds until writing made no progress for `quiet_s` (or `limit_s` passed)."""
        started = last_change = time.monotonic()
        last = -1
        while time.monotonic() - started < limit_s:
            if self.written != last:
                last, last_change = self.written, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    def vanish(self) -> None:
        """Close with a reset (SO_LINGER 0), as a client that dies does."""
        for sock in self.socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


async def slow_reader_phase(server: ServerProcess, args: argparse.Namespace) -> tuple[Probe, bool]:
    """The slow readers, then the well-behaved client beside them; True when the server's
    RSS grew by at most --slow-rss-mib while they hung on."""
    max_k = int(httpx.get(f"{server.http_url}/info", timeout=10).json()["max_k"])
    request = slow_request(args.dim, max_k)
    rss_before, answered_before = server.rss_mib(), cos_answers(server)
    print(
        f"slow reader: {args.slow_readers} connections from {SLOW_ADDRESS}, each pipelining "
        f"{args.slow_requests} POST /cos (k={max_k}, {len(request)} bytes) and reading nothing"
    )
    slow, over = SlowReaders(), asyncio.Event()
    peak = asyncio.create_task(peak_usage(server, over))
    pump = asyncio.create_task(
        slow.pump(server.port, args.slow_readers, args.slow_requests, request)
    )
    stalled_after = await slow.stalled()
    answered = cos_answers(server) - answered_before
    print(
        f"  TCP pushed back after {stalled_after:.1f} s: {slow.written // len(request)} of "
        f"{args.slow_readers * args.slow_requests} requests written, {answered:.0f} answered"
    )
    probe = await beside(pump, server, args, lead_s=0.0, wait=False)
    over.set()
    fds, rss_peak = await peak
    pump.cancel()
    slow.vanish()
    await asyncio.sleep(1.0)
    grew = rss_peak - rss_before
    print(
        f"  server RSS {rss_before:.0f} MiB before, at most {rss_peak:.0f} MiB ({grew:+.1f}) "
        f"and {fds} fds while they hung on, {server.rss_mib():.0f} MiB after they vanished"
    )
    print(probe.line("  well-behaved client"))
    return probe, grew <= args.slow_rss_mib


def cos_answers(server: ServerProcess) -> float:
    """POST /cos requests answered so far, every outcome."""
    seen = metrics(server.http_url)
    prefix = "flasma_requests_total{"
    return sum(v for name, v in seen.items() if name.startswith(prefix) and 'route="cos"' in name)


async def beside(
    flood: asyncio.Task,
    server: ServerProcess,
    args: argparse.Namespace,
    lead_s: float = 0.5,
    wait: bool = True,
) -> Probe:
    """The well-behaved client beside `flood` (then waiting for the flood to end, if `wait`),
    with the server's peak fds and RSS and the CPU spent meanwhile."""
    await asyncio.sleep(lead_s)  # let the flood build up
    cpu, done = CpuClock(server), asyncio.Event()
    peak = asyncio.create_task(peak_usage(server, flood if wait else done))
    probe = await good_client_apart(server.url, args.dim, args.seconds, args.good_cpus)
    if wait:
        await flood
    done.set()
    fds, rss = await peak
    print(f"  server during the flood: at most {fds} fds, {rss:.0f} MiB RSS; {cpu.line()}")
    return probe


class CpuClock:
    """CPU seconds the server (all its threads) and this process spent since it was made."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.wall, self.mine, self.theirs = time.monotonic(), own_cpu_s(), process_cpu_s(server)

    def line(self) -> str:
        wall = time.monotonic() - self.wall
        theirs, mine = process_cpu_s(self.server) - self.theirs, own_cpu_s() - self.mine
        return f"CPU in {wall:.1f} s: server {theirs:.1f} s, attacker (this script) {mine:.1f} s"


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(server: ServerProcess) -> float:
    """utime + stime of every thread, from /proc/PID/stat (fields 14 and 15, in ticks)."""
    stat = Path(f"/proc/{server.process.pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_server(server: ServerProcess, cpus: set[int]) -> None:
    """Every thread of the server onto `cpus` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{server.process.pid}/task"):
        os.sched_setaffinity(int(task), cpus)


async def peak_usage(
    server: ServerProcess, flood: asyncio.Task | asyncio.Event
) -> tuple[int, float]:
    """The server's most open files and RSS, sampled every 0.1 s while the flood lasts."""
    fds, rss = 0, 0.0
    over = flood.is_set if isinstance(flood, asyncio.Event) else flood.done
    while not over():
        fds, rss = max(fds, server.open_fds()), max(rss, server.rss_mib())
        await asyncio.sleep(0.1)
    return fds, rss


def meets(probe: Probe, baseline: Probe) -> bool:
    p99 = percentiles_ms(probe.latencies_s, (99,))[0]
    base99 = percentiles_ms(baseline.latencies_s, (99,))[0]
    return probe.connect_s <= 1.0 and p99 <= 2 * base99 and probe.failures == 0


async def scenario(server: ServerProcess, args: argparse.Namespace) -> bool:
    port = server.port
    if args.pin:
        pin_server(server, {0})
        os.sched_setaffinity(0, {1})
        print("pinned: the server and the well-behaved client on CPU 0, the attacker on CPU 1")
    fds_start, rss_start = server.open_fds(), server.rss_mib()
    print(f"server at rest: {fds_start} fds, {rss_start:.0f} MiB RSS")
    cpu = CpuClock(server)
    baseline = await good_client_apart(server.url, args.dim, args.seconds, args.good_cpus)
    print(baseline.line("baseline, no flood"))
    print(f"  {cpu.line()}")

    print(f"slow-handshake flood: {args.half_open} half-open connections")
    flood = asyncio.create_task(slow_handshake_flood(port, args.half_open))
    slow = await beside(flood, server, args)
    closed = [t for t in flood.result() if t is not None]
    worst = max(closed, default=float("nan"))
    print(f"  closed by the server: {len(closed)} of {args.half_open}, last after {worst:.2f} s")
    print(slow.line("  well-behaved client"))

    print(f"connection flood: {args.flood} connections from {FLOOD_ADDRESS}")
    flood = asyncio.create_task(connection_flood(port, args.flood))
    flooded = await beside(flood, server, args)
    print(f"  outcomes: {flood.result()}")
    print(flooded.line("  well-behaved client"))

    slowed, bounded = await slow_reader_phase(server, args)

    await asyncio.sleep(HANDSHAKE_TIMEOUT_S + 1)
    after = await good_client_apart(server.url, args.dim, 1.0, args.good_cpus)
    seen = metrics(server.http_url)
    print(after.line("after the floods"))
    print(f"server after: {server.open_fds()} fds, {server.rss_mib():.0f} MiB RSS")
    for name, value in sorted(seen.items()):
        if name.startswith(("flasma_connections_", "flasma_tcp_connections")):
            print(f"  {name} {value:g}")
    on_time = len(closed) == args.half_open and worst <= HANDSHAKE_TIMEOUT_S + 1
    checks = {
        f"half-open closed within {HANDSHAKE_TIMEOUT_S + 1:g} s": on_time,
        "beside the slow handshakes: connect <= 1 s, p99 <= 2x, 0 failures": meets(slow, baseline),
        "beside the connection flood: same": meets(flooded, baseline),
        "beside the slow readers: same": meets(slowed, baseline),
        f"slow readers: server RSS growth <= {args.slow_rss_mib:g} MiB": bounded,
        "after the floods: 0 failures": not after.failures,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half-open", type=int, default=5000)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per well-behaved run")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--slow-readers", type=int, default=32, help="connections")
    parser.add_argument("--slow-requests", type=int, default=5000, help="per slow connection")
    parser.add_argument("--slow-rss-mib", type=float, default=64.0, help="allowed RSS growth")
    parser.add_argument("--pin", action="store_true", help="attacker on CPU 1, the rest on 0")
    parser.add_argument(
        "--refusal-cost",
        type=int,
        metavar="N",
        help="only measure the server's CPU per refused connection: N from one address, "
        "3 rounds, against --max-connections-per-ip 1",
    )
    args = parser.parse_args()
    args.good_cpus = {0} if args.pin else None
    raise_nofile(args.half_open + 1024)
    warn_if_busy()
    serve = ["--dim", str(args.dim), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    if args.refusal_cost:
        serve += ["--max-connections-per-ip", "1"]
        return run_against_server("refusals", serve, lambda s: refusal_cost(s, args.refusal_cost))
    return run_against_server("hostile", serve, lambda server: scenario(server, args))


async def refusal_cost(server: ServerProcess, count: int) -> bool:
    """Server and attacker CPU per refused connection, nothing else running."""
    for round_ in range(3):
        cpu = CpuClock(server)
        outcomes = await connection_flood(server.port, count)
        theirs, mine = process_cpu_s(server) - cpu.theirs, own_cpu_s() - cpu.mine
        print(
            f"round {round_}: {outcomes}; server CPU {theirs:.2f} s "
            f"({theirs / count * 1e6:.0f} us per connection), attacker {mine:.2f} s "
            f"({mine / count * 1e6:.0f} us)"
        )
    return True


if __name__ == "__main__":
    sys.exit(main())
