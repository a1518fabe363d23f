"""A client that sends 10,000 queries and never reads its answers, beside a normal client.

    python -m reliability.slow_consumer                     # server: --dim 100 --demo-size 20000
    python -m reliability.slow_consumer --max-inflight 256 --seconds 10

The server (a subprocess, so its RSS can be read) should stop reading the slow connection at
--max-inflight unanswered queries and hold a bounded write buffer, so that:
- its memory stays bounded (RSS growth below --rss-limit-mib while the slow client is stuck);
- it pushes out only about max-inflight plus socket buffers' worth of answers, not 10,000;
- a normal client's p99 latency is unaffected (with vs without the slow client, the p99 stays
  within 1.5x + 2 ms);
- once the slow client goes away, flasma_open_connections returns to 0.
Exit 1 if any of these fails.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect

from .common import (
    ServerProcess,
    metrics,
    percentiles_ms,
    spawn_server,
    wait_open_connections,
    warn_if_busy,
)

DIM = 100


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    answered: int
    sent: int

    def row(self, label: str) -> str:
        return (
            f"{label:<26} {self.sent:>6} {self.answered:>8} {self.p50_ms:>8.2f} "
            f"{self.p99_ms:>8.2f} {self.max_ms:>8.2f}"
        )


@dataclass
class RssSampler:
    """Samples the server's RSS in a thread; `peak` is the highest seen since `start`."""

    server: ServerProcess
    peak: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.server.rss_mib())

    def __enter__(self) -> RssSampler:
        self.peak = self.server.rss_mib()
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


def frame(request_id: int, vector: np.ndarray, k: int) -> str:
    return orjson.dumps({"id": request_id, "embedding": vector.tolist(), "k": k}).decode()


async def normal_client(url: str, rate: float, seconds: float, seed: int) -> Latency:
    """Open loop at `rate` queries/s on one connection; every answer is timed by its id."""
    vectors = np.random.default_rng(seed).standard_normal((256, DIM)).astype(np.float32)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    async with connect(url, max_size=None, compression=None, proxy=None) as ws:
        reader = asyncio.create_task(read_answers(ws, sent_at, latencies))
        count = int(rate * seconds)
        start = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            sent_at[i] = time.perf_counter()
            await ws.send(frame(i, vectors[i % len(vectors)], 10))
        deadline = time.monotonic() + 10
        while len(latencies) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        reader.cancel()
    p50, p99, top = percentiles_ms(latencies, [50, 99, 100])
    return Latency(p50, p99, top, len(latencies), count)


async def read_answers(ws: ClientConnection, sent_at: dict[int, float], out: list[float]) -> None:
    async for message in ws:
        answer = orjson.loads(message)
        if "result" in answer:
            out.append(time.perf_counter() - sent_at.pop(answer["id"]))


@dataclass
class SlowClient:
    """Sends `queries` frames (k=100: large answers) and never reads; a small receive buffer."""

    url: str
    queries: int
    sent: int = 0
    ws: ClientConnection | None = None
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, port = self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        # max_queue=1: the library stops reading the socket too once one answer is buffered.
        self.ws = await connect(self.url, sock=sock, max_queue=1, compression=None, proxy=None)
        self.task = asyncio.create_task(self.pump())

    async def pump(self) -> None:
        assert self.ws is not None
        vector = np.random.default_rng(99).standard_normal(DIM).astype(np.float32)
        for i in range(self.queries):
            await self.ws.send(frame(i, vector, 100))
            self.sent += 1

    async def wait_stalled(self, quiet_s: float = 1.0, limit_s: float = 30.0) -> float:
        """Until sending makes no progress for `quiet_s` (TCP pushes back) or all is sent."""
        started = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - started < limit_s and not (self.task and self.task.done()):
            if self.sent != last:
                last, since = self.sent, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.ws is not None:
            self.ws.transport.abort()  # no close handshake: the client just vanishes


def answered_ok(http_url: str) -> float:
    return metrics(http_url).get('flasma_requests_total{outcome="ok",route="ws"}', 0.0)


async def scenario(server: ServerProcess, args: argparse.Namespace) -> bool:
    url, http = server.url, server.http_url
    await normal_client(url, args.rate, 1.0, seed=0)  # warm-up
    rss_start = server.rss_mib()
    with RssSampler(server) as sampler:
        baseline = await normal_client(url, args.rate, args.seconds, seed=1)
    rss_baseline = sampler.peak

    before = answered_ok(http)
    slow = SlowClient(url, args.queries)
    with RssSampler(server) as sampler:
        await slow.start()
        stalled_after = await slow.wait_stalled()
        loaded = await normal_client(url, args.rate, args.seconds, seed=2)
        rss_slow = sampler.peak
        pushed_to_slow = answered_ok(http) - before - loaded.answered
        sent_by_slow = slow.sent
    slow.abort()  # the socket closes on the next loop iteration: wait off the loop
    left_open = await asyncio.to_thread(wait_open_connections, http, 0, 10)
    rss_end = server.rss_mib()

    header = ("sent", "answered", "p50 ms", "p99 ms", "max ms")
    print(f"{'normal client':<26} {header[0]:>6} " + " ".join(f"{h:>8}" for h in header[1:]))
    print(baseline.row("alone"))
    print(loaded.row("beside the slow client"))
    print(
        f"slow client: sent {sent_by_slow} of {args.queries} queries (k=100) before TCP pushed "
        f"back ({stalled_after:.1f} s); the server sent it {pushed_to_slow:.0f} answers"
    )
    print(
        f"server RSS MiB: start {rss_start:.1f}, peak alone {rss_baseline:.1f}, peak with slow "
        f"client {rss_slow:.1f}, end {rss_end:.1f}"
    )
    print(f"flasma_open_connections 10 s after the slow client vanished: {left_open:.0f}")
    return verdict(args, baseline, loaded, rss_slow - rss_baseline, pushed_to_slow, left_open)


def verdict(
    args: argparse.Namespace,
    baseline: Latency,
    loaded: Latency,
    rss_growth: float,
    pushed: float,
    left_open: float,
) -> bool:
    checks = {
        "every normal query answered": baseline.answered == baseline.sent
        and loaded.answered == loaded.sent,
        "normal p99 unaffected (<= 1.5x + 2 ms)": loaded.p99_ms <= 1.5 * baseline.p99_ms + 2,
        f"server RSS growth {rss_growth:.1f} MiB < {args.rss_limit_mib} MiB": rss_growth
        < args.rss_limit_mib,
        f"answers pushed to the slow client ({pushed:.0f}) < all {args.queries}": pushed
        < args.queries,
        "open connections back to 0": left_open == 0,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000, help="sent by the slow client")
    parser.add_argument("--rate", type=float, default=200.0, help="normal client, queries/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="normal client, per phase")
    parser.add_argument("--max-inflight", type=int, default=1024, help="the server's flag")
    parser.add_argument("--demo-size", type=int, default=20_000)
    parser.add_argument("--rss-limit-mib", type=float, default=64.0)
    args = parser.parse_args(argv)
    warn_if_busy()
    log = Path(tempfile.mkdtemp(prefix="flasma-slow-")) / "server.log"
    server = spawn_server(
        ["--dim", str(DIM), "--demo-size", str(args.demo_size)]
        + ["--max-inflight", str(args.max_inflight)],
        log,
    )
    try:
        ok = asyncio.run(scenario(server, args))
    finally:
        code, seconds = server.stop()
    prompt = code == 0 and seconds < 10
    print(f"{'PASS' if prompt else 'FAIL'}: SIGTERM exit status {code} after {seconds:.1f} s")
    print(f"(server log: {log})")
    return 0 if ok and prompt else 1


if __name__ == "__main__":
    sys.exit(main())
