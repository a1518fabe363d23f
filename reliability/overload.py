"""Offer 3x the server's measured capacity, then drop the load, and check how it copes.

    python -m reliability.overload                # server: --queue-size 256 --timeout-ms 500
    python -m reliability.overload --factor 3 --overload-seconds 5

Phases, against a server subprocess with a modest queue and deadline:
1. capacity: a closed loop (every connection keeps --window queries in flight, fewer in total
   than the queue holds) measures answered queries/s;
2. light: an open loop at --light of capacity gives the normal p50;
3. overload: an open loop at --factor x capacity;
4. drop: back to the light rate; p50 per 100 ms window (by send time) after the drop.

Checks (exit 1 on failure): every request answered exactly once; excess requests get
`overloaded` at once (p99 under --fast-ms); accepted requests meet their deadline as the
server defines it (the deadline is checked when a query's batch starts, so a result may come
one batch later: every result within --timeout-ms plus twice the mean engine batch time of
the overload phase); latency is back to normal (every window's p50 within 2x + 5 ms of the
light p50) within 1 s of the drop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect

from .common import (
    ServerProcess,
    metrics,
    percentiles_ms,
    run_against_server,
    warn_if_busy,
)

WINDOW_S = 0.1


@dataclass
class Request:
    phase: str
    sent: float
    answered: float | None = None
    outcome: str | None = None

    @property
    def latency(self) -> float:
        assert self.answered is not None
        return self.answered - self.sent


@dataclass
class Fleet:
    """Connections whose answers are matched to requests by id, across all phases."""

    sockets: list[ClientConnection]
    bodies: list[str]  # the JSON after the id: '"embedding":[...],"k":10}'
    requests: dict[int, Request] = field(default_factory=dict)
    duplicates: int = 0
    next_id: int = 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, phase: str) -> Request:
        request_id = self.next_id
        self.next_id += 1
        request = Request(phase, time.perf_counter())
        self.requests[request_id] = request
        body = self.bodies[request_id % len(self.bodies)]
        await self.sockets[request_id % len(self.sockets)].send(f'{{"id":{request_id},{body}')
        return request

    async def read(self, ws: ClientConnection) -> None:
        async for message in ws:
            now = time.perf_counter()
            answer = orjson.loads(message)
            request = self.requests[answer["id"]]
            if request.answered is not None:
                self.duplicates += 1
                continue
            request.answered = now
            request.outcome = "ok" if "result" in answer else answer["error"]["code"]
            self.answered.set()

    def unanswered(self) -> int:
        return sum(r.answered is None for r in self.requests.values())

    async def settle(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.unanswered() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def phase(self, name: str) -> list[Request]:
        return [r for r in self.requests.values() if r.phase == name and r.answered]


async def closed_loop(fleet: Fleet, window: int, seconds: float) -> float:
    """Answered queries/s with `window` in flight per connection."""
    stop = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            request = await fleet.send("capacity")
            while request.answered is None:
                fleet.answered.clear()
                await fleet.answered.wait()
            done += request.outcome == "ok"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window * len(fleet.sockets))))
    return done / (time.perf_counter() - started)


async def open_loop(fleet: Fleet, phase: str, rate: float, seconds: float) -> float:
    """Send at `rate`/s regardless of answers (catching up in bursts); returns the rate offered."""
    started = time.perf_counter()
    total = int(rate * seconds)
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            await fleet.send(phase)
            sent += 1
            await asyncio.sleep(0)  # let the readers time answers during a burst
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    return sent / (time.perf_counter() - started)


def engine_totals(http_url: str) -> tuple[float, float]:
    values = metrics(http_url)
    return values["flasma_engine_seconds_sum"], values["flasma_engine_seconds_count"]


def mean_batch_s(before: tuple[float, float], after: tuple[float, float]) -> float:
    batches = after[1] - before[1]
    return (after[0] - before[0]) / batches if batches else 0.0


def window_p50s(requests: list[Request], start: float) -> list[tuple[float, float, int]]:
    """(window start s, p50 ms of results, results) per 100 ms window by send time."""
    by_window: dict[int, list[float]] = {}
    for r in requests:
        if r.outcome == "ok":
            by_window.setdefault(int((r.sent - start) / WINDOW_S), []).append(r.latency)
    return [
        (w * WINDOW_S, float(np.median(by_window[w])) * 1000, len(by_window[w]))
        for w in sorted(by_window)
    ]


def recovery_s(windows: list[tuple[float, float, int]], normal_ms: float) -> float | None:
    """Start of the first window from which every later p50 is normal; None if never."""
    limit = max(2 * normal_ms, normal_ms + 5)
    for i, (start, _, _) in enumerate(windows):
        if all(p50 <= limit for _, p50, _ in windows[i:]):
            return start
    return None


@dataclass
class Probe:
    """Server side, every 100 ms from a thread: queue depth and the ws latency histogram; and
    this client's event-loop lag (a saturated client inflates every latency it measures)."""

    http_url: str
    samples: list[tuple[float, float, dict[float, float]]] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def scrape(self) -> None:
        while not self.stop.wait(WINDOW_S):
            asked = time.perf_counter()
            values = metrics(self.http_url)
            # A busy server answers late; the state was read somewhere in between.
            when = (asked + time.perf_counter()) / 2
            buckets = {
                float(key.split('le="', 1)[1].split('"', 1)[0]): value
                for key, value in values.items()
                if key.startswith("flasma_request_latency_seconds_bucket") and 'route="ws"' in key
            }
            self.samples.append((when, values["flasma_queue_depth"], buckets))

    async def watch_loop(self) -> None:
        while not self.stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append((before, time.perf_counter() - before - 0.01))

    def windows(self, start: float) -> list[tuple[float, float, float, float]]:
        """(window start s, queue depth, server p50 bucket ms, client loop lag max ms)."""
        rows = []
        for (t0, _, b0), (t1, depth, b1) in zip(self.samples, self.samples[1:]):
            if t1 < start:
                continue
            lag = max((x for t, x in self.lags if t0 <= t < t1), default=0.0)
            rows.append((t0 - start, depth, bucket_p50_ms(b0, b1), lag * 1000))
        return rows


def bucket_p50_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """Upper bound of the histogram bucket holding the median of the answers in between."""
    total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    for bound in sorted(after):
        if total and after[bound] - before.get(bound, 0) >= total / 2:
            return bound * 1000
    return float("nan")


def describe(requests: list[Request], outcome: str) -> str:
    latencies = [r.latency for r in requests if r.outcome == outcome]
    p50, p99, top = percentiles_ms(latencies, [50, 99, 100])
    return f"{outcome} {len(latencies)}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {top:.1f} ms"


async def scenario(server: ServerProcess, args: argparse.Namespace) -> bool:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, args.dim)).astype(np.float32)
    bodies = [orjson.dumps({"embedding": v.tolist(), "k": 10}).decode()[1:] for v in vectors]
    sockets = [
        await connect(server.url, max_size=None, compression=None, proxy=None)
        for _ in range(args.connections)
    ]
    fleet = Fleet(sockets, bodies)
    readers = [asyncio.create_task(fleet.read(ws)) for ws in sockets]

    capacity = await closed_loop(fleet, args.window, args.capacity_seconds)
    await fleet.settle()
    light_rate, heavy_rate = args.light * capacity, args.factor * capacity
    probe = Probe(server.http_url)
    threading.Thread(target=probe.scrape, daemon=True).start()
    watcher = asyncio.create_task(probe.watch_loop())
    await open_loop(fleet, "light", light_rate, args.light_seconds)
    engine_before = engine_totals(server.http_url)
    offered = await open_loop(fleet, "overload", heavy_rate, args.overload_seconds)
    batch_s = mean_batch_s(engine_before, engine_totals(server.http_url))
    drop = time.perf_counter()
    await open_loop(fleet, "drop", light_rate, args.drop_seconds)
    probe.stop.set()
    await watcher
    await fleet.settle()
    for ws in sockets:
        await ws.close()
    await asyncio.gather(*readers, return_exceptions=True)
    print_probe(probe, drop)
    return report(fleet, args, capacity, light_rate, offered, drop, batch_s)


def print_probe(probe: Probe, drop: float) -> None:
    rows = probe.windows(drop - 1.0)
    print(
        "from 1 s before the drop, per 100 ms: queue depth / server-side p50 bucket ms / "
        "client loop lag max ms"
    )
    print("  " + ", ".join(f"{t:+.1f}s {d:.0f}/{p:g}/{lag:.0f}" for t, d, p, lag in rows[:30]))


def report(
    fleet: Fleet,
    args: argparse.Namespace,
    capacity: float,
    light_rate: float,
    offered: float,
    drop: float,
    batch_s: float,
) -> bool:
    light, heavy, after = fleet.phase("light"), fleet.phase("overload"), fleet.phase("drop")
    # Normal: the light load once settled (its first second follows the closed loop's backlog).
    settled = min(r.sent for r in light) + 1.0
    normal_ms = percentiles_ms(
        [r.latency for r in light if r.outcome == "ok" and r.sent >= settled], [50]
    )[0]
    outcomes = Counter(r.outcome for r in heavy)
    print(
        f"capacity (closed loop, {args.window} in flight x {args.connections}): {capacity:.0f} q/s"
    )
    print(
        f"light load {light_rate:.0f} q/s: {describe(light, 'ok')}; normal p50 {normal_ms:.1f} ms"
    )
    print(
        f"overload: offered {offered:.0f} q/s ({offered / capacity:.1f}x) for "
        f"{args.overload_seconds} s: {dict(outcomes)}"
    )
    for outcome in ("overloaded", "ok", "timeout"):
        print("  " + describe(heavy, outcome))
    results = [r.latency for r in heavy if r.outcome == "ok"]
    deadline_s = args.timeout_ms / 1000
    within = sum(x <= deadline_s for x in results) / max(1, len(results))
    allowed_s = deadline_s + 2 * batch_s
    print(
        f"  results within the {args.timeout_ms} ms deadline: {100 * within:.2f}%; mean engine "
        f"batch {1000 * batch_s:.0f} ms; latest result {1000 * max(results, default=0):.0f} ms "
        f"(allowed {1000 * allowed_s:.0f} ms)"
    )
    windows = window_p50s(after, drop)
    recovered = recovery_s(windows, normal_ms)
    print(
        "after the drop, p50 ms per 100 ms window: "
        + ", ".join(f"{p50:.1f}" for _, p50, _ in windows[:15])
    )
    print(
        f"back to normal ({normal_ms:.1f} ms p50) after: "
        + ("never" if recovered is None else f"{recovered:.1f} s")
    )
    fast = percentiles_ms([r.latency for r in heavy if r.outcome == "overloaded"], [99])[0]
    checks = {
        "every request answered exactly once": fleet.unanswered() == 0 and fleet.duplicates == 0,
        "overload reached (some requests refused)": outcomes["overloaded"] > 0,
        f"overloaded answered at once (p99 {fast:.1f} < {args.fast_ms} ms)": fast < args.fast_ms,
        "results meet the deadline (started before it)": max(results, default=0) <= allowed_s,
        "latency normal within 1 s of the drop": recovered is not None and recovered <= 1.0,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--demo-size", type=int, default=300_000)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--timeout-ms", type=int, default=500)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="closed loop, per connection")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--light", type=float, default=0.3, help="light rate, x capacity")
    parser.add_argument("--light-seconds", type=float, default=4.0)
    parser.add_argument("--factor", type=float, default=3.0, help="overload rate, x capacity")
    parser.add_argument("--overload-seconds", type=float, default=5.0)
    parser.add_argument("--drop-seconds", type=float, default=3.0)
    parser.add_argument("--fast-ms", type=float, default=50.0, help="overloaded answers' p99")
    args = parser.parse_args(argv)
    if args.window * args.connections >= args.queue_size:
        parser.error("--window x --connections must stay below --queue-size (no overload yet)")
    warn_if_busy()
    return run_against_server(
        "overload",
        ["--dim", str(args.dim), "--demo-size", str(args.demo_size)]
        + ["--queue-size", str(args.queue_size), "--timeout-ms", str(args.timeout_ms)],
        lambda server: scenario(server, args),
    )


if __name__ == "__main__":
    sys.exit(main())
