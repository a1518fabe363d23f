"""Hostile clients at the connection level (issue 18), against a server subprocess on loopback:

    python -m reliability.hostile                    # 5,000 half-open, a 5,000-connection flood
    python -m reliability.hostile --half-open 1000 --flood 2000 --seconds 3

1. Slow-handshake flood: --half-open connections, 200 from each of the addresses 127.0.1.1,
   127.0.1.2, ..., each sending `GET /ws HTTP/1.1\\r\\nHost: x\\r\\n` and never the blank line;
   the server must close every one within --handshake-timeout-s + 1 s.
2. Connection flood: --flood connections opened as fast as possible (256 at a time) from the
   one address 127.0.2.1, up to 1,024 open at once, each sending nothing: beyond
   --max-connections-per-ip (256) they are refused at once, the rest time out.

Beside each, a well-behaved client on 127.0.0.2 connects and sends one query at a time for
--seconds; its connect time and latency are compared with a run without a flood (targets:
connects in <= 1 s, p99 <= 2 x the baseline's, 0 failures). Loopback only; every flood is
bounded in count and time and ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

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


async def good_client_apart(url: str, dim: int, seconds: float) -> Probe:
    """The well-behaved client in a process of its own, so that the flood's client-side work
    (on this event loop) does not show in its latency."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, run_good_client, url, dim, seconds)


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


async def beside(flood: asyncio.Task, server: ServerProcess, args: argparse.Namespace) -> Probe:
    await asyncio.sleep(0.5)  # let the flood build up
    peak = asyncio.create_task(peak_usage(server, flood))
    probe = await good_client_apart(server.url, args.dim, args.seconds)
    await flood
    fds, rss = await peak
    print(f"  server during the flood: at most {fds} fds, {rss:.0f} MiB RSS")
    return probe


async def peak_usage(server: ServerProcess, flood: asyncio.Task) -> tuple[int, float]:
    """The server's most open files and RSS, sampled every 0.1 s while the flood lasts."""
    fds, rss = 0, 0.0
    while not flood.done():
        fds, rss = max(fds, server.open_fds()), max(rss, server.rss_mib())
        await asyncio.sleep(0.1)
    return fds, rss


def meets(probe: Probe, baseline: Probe) -> bool:
    p99 = percentiles_ms(probe.latencies_s, (99,))[0]
    base99 = percentiles_ms(baseline.latencies_s, (99,))[0]
    return probe.connect_s <= 1.0 and p99 <= 2 * base99 and probe.failures == 0


async def scenario(server: ServerProcess, args: argparse.Namespace) -> bool:
    port = int(server.http_url.rsplit(":", 1)[1])
    fds_start, rss_start = server.open_fds(), server.rss_mib()
    print(f"server at rest: {fds_start} fds, {rss_start:.0f} MiB RSS")
    baseline = await good_client_apart(server.url, args.dim, args.seconds)
    print(baseline.line("baseline, no flood"))

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

    await asyncio.sleep(HANDSHAKE_TIMEOUT_S + 1)
    after = await good_client_apart(server.url, args.dim, 1.0)
    seen = metrics(server.http_url)
    print(after.line("after the floods"))
    print(f"server after: {server.open_fds()} fds, {server.rss_mib():.0f} MiB RSS")
    for name, value in sorted(seen.items()):
        if name.startswith(("flasma_connections_", "flasma_tcp_connections")):
            print(f"  {name} {value:g}")
    on_time = len(closed) == args.half_open and worst <= HANDSHAKE_TIMEOUT_S + 1
    return on_time and meets(slow, baseline) and meets(flooded, baseline) and not after.failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half-open", type=int, default=5000)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per well-behaved run")
    parser.add_argument("--dim", type=int, default=100)
    args = parser.parse_args()
    raise_nofile(args.half_open + 1024)
    warn_if_busy()
    serve = ["--dim", str(args.dim), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    return run_against_server("hostile", serve, lambda server: scenario(server, args))


if __name__ == "__main__":
    sys.exit(main())
