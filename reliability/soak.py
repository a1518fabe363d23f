"""Soak: many concurrent WebSocket connections, each streaming queries for a long time.

    python -m reliability.soak                           # 1,000 connections x 60 s
    python -m reliability.soak --connections 200 --seconds 10

The server runs as a subprocess (`python -m flasma_ws serve`) so that its RSS and open file
descriptors can be read from /proc. Every connection sends queries at --rate per second with
at most --pipeline unanswered (even connections JSON, odd ones binary), for --seconds.

Checks (exit 1 on failure): every query answered exactly once (matched by id per connection),
no connection dropped, server RSS stable (end of the run within --rss-growth-mib of the
sample taken once all connections were streaming), and after the clients close
flasma_open_connections is back to 0 and the server's open fds back to where they started.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from flasma_ws.protocol import BINARY_HEADER, encode_binary_query

from .common import (
    ServerProcess,
    percentiles_ms,
    raise_nofile,
    run_against_server,
    wait_open_connections,
    warn_if_busy,
)


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    duplicates: int = 0
    unknown: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    dropped: list[str] = field(default_factory=list)
    unanswered: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Samples:
    """(seconds since the streams started, RSS MiB, open fds) every 5 s."""

    rows: list[tuple[float, float, int]] = field(default_factory=list)


class Stream:
    """One connection: paced queries with bounded pipelining, answers matched by id."""

    def __init__(self, index: int, ws: ClientConnection, vectors: np.ndarray, tally: Tally) -> None:
        self.index = index
        self.ws = ws
        self.vectors = vectors
        self.binary = index % 2 == 1
        self.tally = tally
        self.pending: dict[int, float] = {}
        self.room = asyncio.Event()
        self.room.set()

    def frame(self, request_id: int) -> str | bytes:
        vector = self.vectors[request_id % len(self.vectors)]
        if self.binary:
            return encode_binary_query(request_id, vector, k=10)
        return orjson.dumps({"id": request_id, "embedding": vector.tolist(), "k": 10}).decode()

    async def send(self, stop: float, rate: float, pipeline: int) -> None:
        request_id = 0
        next_at = time.perf_counter() + random.random() / rate  # spread the connections out
        while time.perf_counter() < stop:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            while len(self.pending) >= pipeline:
                self.room.clear()
                await self.room.wait()
            self.pending[request_id] = time.perf_counter()
            await self.ws.send(self.frame(request_id))
            self.tally.sent += 1
            request_id += 1
            next_at += 1 / rate

    async def read(self) -> None:
        async for message in self.ws:
            if isinstance(message, bytes):
                request_id, outcome = BINARY_HEADER.unpack_from(message)[0], "ok"
            else:
                answer = orjson.loads(message)
                request_id = answer["id"]
                outcome = "ok" if "result" in answer else answer["error"]["code"]
            self.on_answer(request_id, outcome)

    def on_answer(self, request_id: int, outcome: str) -> None:
        sent = self.pending.pop(request_id, None)
        if sent is None:
            self.tally.duplicates += 1
            return
        self.tally.answered += 1
        self.tally.outcomes[outcome] += 1
        if len(self.tally.latencies) < 2_000_000:
            self.tally.latencies.append(time.perf_counter() - sent)
        self.room.set()

    async def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def run_stream(stream: Stream, stop: float, args: argparse.Namespace, tally: Tally) -> None:
    reader = asyncio.create_task(stream.read())
    try:
        await stream.send(stop, args.rate, args.pipeline)
        await stream.drain(30)
    except ConnectionClosed as exc:
        tally.dropped.append(f"connection {stream.index}: {exc!r}")
    if reader.done() and reader.exception() is not None:
        tally.dropped.append(f"connection {stream.index}: {reader.exception()!r}")
    tally.unanswered += len(stream.pending)
    await stream.ws.close()
    await asyncio.gather(reader, return_exceptions=True)


def sample_forever(server: ServerProcess, samples: Samples, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(5.0):
        samples.rows.append((time.monotonic() - started, server.rss_mib(), server.open_fds()))


async def open_all(url: str, count: int) -> list[ClientConnection]:
    """Open `count` connections, 50 at a time (a burst of 1,000 handshakes overflows backlogs)."""
    sockets: list[ClientConnection] = []
    for start in range(0, count, 50):
        batch = range(start, min(count, start + 50))
        sockets += await asyncio.gather(
            *(
                connect(url, max_size=None, compression=None, proxy=None, open_timeout=60)
                for _ in batch
            )
        )
    return sockets


async def scenario(server: ServerProcess, args: argparse.Namespace) -> bool:
    tally, samples = Tally(), Samples()
    fds_start, rss_start = server.open_fds(), server.rss_mib()
    vectors = np.random.default_rng(0).standard_normal((128, args.dim)).astype(np.float32)
    opened = time.monotonic()
    sockets = await open_all(server.url, args.connections)
    print(f"opened {len(sockets)} connections in {time.monotonic() - opened:.1f} s")
    stop_sampling = threading.Event()
    threading.Thread(
        target=sample_forever, args=(server, samples, stop_sampling), daemon=True
    ).start()
    streams = [Stream(i, ws, vectors, tally) for i, ws in enumerate(sockets)]
    started = time.perf_counter()
    stop = started + args.seconds
    await asyncio.gather(*(run_stream(s, stop, args, tally) for s in streams))
    elapsed = time.perf_counter() - started
    stop_sampling.set()
    left_open = wait_open_connections(server.http_url, 0, timeout_s=10)
    fds_end, rss_end = server.open_fds(), server.rss_mib()
    return report(
        args, tally, samples, elapsed, (rss_start, rss_end), (fds_start, fds_end), left_open
    )


def report(
    args: argparse.Namespace,
    tally: Tally,
    samples: Samples,
    elapsed: float,
    rss: tuple[float, float],
    fds: tuple[int, int],
    left_open: float,
) -> bool:
    p50, p99, top = percentiles_ms(tally.latencies, [50, 99, 100])
    print(
        f"{args.connections} connections x {elapsed:.0f} s: sent {tally.sent}, answered "
        f"{tally.answered} ({tally.answered / elapsed:.0f}/s), duplicates {tally.duplicates}, "
        f"unanswered {tally.unanswered}, dropped connections {len(tally.dropped)}"
    )
    print(
        f"outcomes: {dict(tally.outcomes)}; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {top:.0f} ms"
    )
    print(
        "server RSS MiB / open fds every 5 s: "
        + ", ".join(f"{t:.0f}s {r:.0f}/{f}" for t, r, f in samples.rows)
    )
    print(f"server RSS MiB: before clients {rss[0]:.1f}, after clients closed {rss[1]:.1f}")
    print(
        f"server open fds: before {fds[0]}, after {fds[1]}; "
        f"flasma_open_connections after close: {left_open:.0f}"
    )
    steady = [r for t, r, _ in samples.rows if t >= min(10.0, args.seconds / 2)]
    growth = steady[-1] - steady[0] if len(steady) >= 2 else 0.0
    checks = {
        "every query answered exactly once": tally.unanswered == 0
        and tally.duplicates == 0
        and tally.answered == tally.sent,
        "no connection dropped": not tally.dropped,
        f"RSS stable while streaming (+{growth:.1f} MiB <= {args.rss_growth_mib})": growth
        <= args.rss_growth_mib,
        "open connections back to 0": left_open == 0,
        "open fds back to the start": fds[1] <= fds[0],
    }
    for line in tally.dropped[:5]:
        print("  " + line)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=2.0, help="queries/s per connection")
    parser.add_argument("--pipeline", type=int, default=4, help="unanswered per connection")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--demo-size", type=int, default=10_000)
    parser.add_argument("--rss-growth-mib", type=float, default=32.0)
    args = parser.parse_args(argv)
    limit = raise_nofile(2 * args.connections + 256)  # the server subprocess inherits it
    if limit < args.connections + 64:
        parser.error(f"RLIMIT_NOFILE is {limit}: too low for {args.connections} connections")
    warn_if_busy()
    return run_against_server(
        "soak",
        # Every soak connection comes from one address: lift the per-address cap above them.
        ["--dim", str(args.dim), "--demo-size", str(args.demo_size)]
        + ["--max-connections-per-ip", str(args.connections + 8)],
        lambda server: scenario(server, args),
    )


if __name__ == "__main__":
    sys.exit(main())
