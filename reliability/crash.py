"""kill -9 at random moments loses no acknowledged write (issue 14).

A server subprocess serves a live collection in a temporary --data-dir. Writers on several
connections pipeline upserts (new and existing keys) and deletes; the server is SIGKILLed at
a random moment (compactions run often, so some kills land inside one), restarted with
--data-dir alone, and every key any writer touched is read back with `get`:

- a key's state must be its last acknowledged write, or a write sent after it that was not
  yet acknowledged (it may have reached the log before the kill): never an older state, never
  a state no one wrote, never a half-applied frame's mix;
- a deleted key is not returned by a search for its last vector.

    python -m reliability.crash [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import websockets

from flasma_ws.reference import unit_rows
from flasma_ws.testing import ServerProcess, launch, wait_ready

DIM, BASE_ROWS, WRITERS, PIPELINE = 16, 2_000, 4, 16
DELETED = None  # a key's state after a delete
SERVE_ARGS = ("--compact-min-rows", "300", "--compact-fraction", "0.05", "--log-level", "warning")


@dataclass
class KeyHistory:
    """Every write sent for one key, in send order (one connection owns a key, and a
    connection's frames are logged in the order they arrive), and how far it is acked."""

    states: list[Any] = field(default_factory=list)  # float32 unit vector or DELETED
    acked: int = -1  # index of the last acknowledged write; -1: the state before this cycle
    before: Any = DELETED

    def allowed(self) -> list[Any]:
        later = self.states[self.acked + 1 :]
        last = self.states[self.acked] if self.acked >= 0 else self.before
        return [last, *later]


@dataclass
class Outcome:
    cycles: int = 0
    acked_writes: int = 0
    checked_keys: int = 0
    compacted_cycles: int = 0  # a new snapshot appeared during the cycle
    killed_mid_compaction: int = 0  # a snapshot was being written at the kill
    problems: list[str] = field(default_factory=list)


def unit(vector: np.ndarray) -> np.ndarray:
    """What the server stores: normalized in float64, rounded once to float32."""
    return unit_rows(vector)[0].astype(np.float32)


class Writer:
    """One connection's random writes over the keys it owns: every base key k with
    k % WRITERS == owner, and new keys from its own range."""

    def __init__(self, owner: int, keys: dict[int, KeyHistory], seed: int) -> None:
        self.rng = random.Random(seed)
        self.keys = keys
        self.owned = [k for k in range(BASE_ROWS) if k % WRITERS == owner]
        self.fresh = iter(range(1_000_000 * (owner + 1), 1_000_000 * (owner + 2)))

    def _history(self, key: int) -> KeyHistory:
        if key not in self.keys:  # a base key starts as the server has it, a new one absent
            self.keys[key] = KeyHistory(before=_UNKNOWN if key < BASE_ROWS else DELETED)
        return self.keys[key]

    def _record(self, key: int, state: Any) -> tuple[int, int]:
        history = self._history(key)
        history.states.append(state)
        return key, len(history.states) - 1

    def frame(self, frame_id: int) -> tuple[bytes, list[tuple[int, int]]]:
        """A random upsert (new or existing keys) or delete; records each key's new state."""
        rng = self.rng
        if rng.random() < 0.25:
            doomed = sorted(set(rng.sample(self.owned, 3)))
            touched = [self._record(key, DELETED) for key in doomed]
            return orjson.dumps({"id": frame_id, "op": "delete", "keys": doomed}), touched
        picks = range(rng.randint(1, 8))
        chosen = {next(self.fresh) if rng.random() < 0.5 else rng.choice(self.owned) for _ in picks}
        items, touched = [], []
        for key in sorted(chosen):
            vector = np.asarray([rng.gauss(0, 1) for _ in range(DIM)], np.float32)
            touched.append(self._record(key, unit(vector)))
            items.append({"key": key, "embedding": vector.tolist()})
        return orjson.dumps({"id": frame_id, "op": "upsert", "items": items}), touched

    async def run(self, url: str) -> int:
        """Pipeline frames until the connection dies; returns the frames acknowledged."""
        pending: dict[int, list[tuple[int, int]]] = {}  # frame id -> (key, state index)
        acks = next_id = 0
        try:
            async with websockets.connect(url, max_size=None, open_timeout=10) as ws:
                while True:
                    while len(pending) < PIPELINE:
                        next_id += 1
                        frame, pending[next_id] = self.frame(next_id)
                        await ws.send(frame.decode())
                    answer = orjson.loads(await ws.recv())
                    touched = pending.pop(answer["id"])
                    if "error" in answer or answer.get("errors"):
                        raise RuntimeError(f"a write was refused: {answer}")
                    for key, index in touched:
                        history = self.keys[key]
                        history.acked = max(history.acked, index)
                    acks += 1
        except (websockets.ConnectionClosed, OSError):
            return acks


_UNKNOWN = "unknown"  # a base key's state before its first write: whatever the server has


async def read_back(url: str, wanted: list[int]) -> dict[int, np.ndarray | None]:
    found: dict[int, np.ndarray | None] = {}
    async with websockets.connect(url, max_size=None) as ws:
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start : start + 1000]
            await ws.send(orjson.dumps({"id": start, "op": "get", "keys": chunk}).decode())
            answer = orjson.loads(await ws.recv())
            for key, item in zip(chunk, answer["items"]):
                found[key] = None if item is None else np.asarray(item["embedding"], np.float32)
    return found


async def deleted_not_found(url: str, keys: dict[int, KeyHistory], found: dict) -> list[str]:
    """Search for the last vector of some deleted keys: the key must not come back."""
    problems = []
    probes = [
        (key, next(s for s in reversed(h.states) if s is not None and s is not _UNKNOWN))
        for key, h in keys.items()
        if found.get(key) is None and any(isinstance(s, np.ndarray) for s in h.states)
    ][:50]
    async with websockets.connect(url, max_size=None) as ws:
        for i, (key, vector) in enumerate(probes):
            await ws.send(orjson.dumps({"id": i, "embedding": vector.tolist(), "k": 5}).decode())
            answer = orjson.loads(await ws.recv())
            if key in [pair[0] for pair in answer["result"]]:
                problems.append(f"deleted key {key} came back from a search")
    return problems


def check(keys: dict[int, KeyHistory], found: dict[int, np.ndarray | None]) -> list[str]:
    problems = []
    for key, history in keys.items():
        got = found[key]
        allowed = history.allowed()
        if any(state is _UNKNOWN for state in allowed):
            continue  # a base key acked nothing yet this cycle: any of its states is fine
        if not any(_same(got, state) for state in allowed):
            problems.append(
                f"key {key}: state after restart is not its last acked write or a later one "
                f"({len(history.states)} writes, acked up to {history.acked})"
            )
    return problems


def _same(got: np.ndarray | None, state: Any) -> bool:
    if isinstance(state, str):
        return False
    if state is None or got is None:
        return state is None and got is None
    return bool(np.array_equal(got, state))


async def one_cycle(server: ServerProcess, keys: dict[int, KeyHistory], rng: random.Random) -> int:
    """Write until a random SIGKILL; returns the writes acknowledged."""
    writers = [Writer(w, keys, rng.randrange(2**31)) for w in range(WRITERS)]
    tasks = [asyncio.create_task(w.run(server.url)) for w in writers]
    await asyncio.sleep(rng.uniform(0.3, 2.5))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    return sum(await asyncio.gather(*tasks))


def run(cycles: int, workdir: Path, seed: int = 0) -> Outcome:
    rng = random.Random(seed)
    data = workdir / "data"
    outcome = Outcome()
    keys: dict[int, KeyHistory] = {}
    first = ("--dim", str(DIM), "--demo-size", str(BASE_ROWS))
    server = wait_ready(
        launch(workdir / "serve-0.log", "--data-dir", str(data), *first, *SERVE_ARGS)
    )
    for cycle in range(cycles):
        snapshots_before = _snapshots(data)
        outcome.acked_writes += asyncio.run(one_cycle(server, keys, rng))
        outcome.compacted_cycles += _snapshots(data) != snapshots_before
        outcome.killed_mid_compaction += any(data.glob("snapshots/*.tmp"))
        log = workdir / f"serve-{cycle + 1}.log"
        server = wait_ready(launch(log, "--data-dir", str(data), *SERVE_ARGS))
        found = asyncio.run(read_back(server.url, sorted(keys)))
        problems = check(keys, found) + asyncio.run(deleted_not_found(server.url, keys, found))
        outcome.problems += [f"cycle {cycle + 1}: {p}" for p in problems]
        outcome.checked_keys += len(keys)
        outcome.cycles += 1
        for key in keys:  # the verified state is the next cycle's start
            keys[key] = KeyHistory(before=found[key])
        if problems:
            break
    server.stop()
    return outcome


def _snapshots(data: Path) -> list[str]:
    return sorted(p.name for p in data.glob("snapshots/snap-*") if p.suffix != ".tmp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flasma-crash-") as tmp:
        outcome = run(args.cycles, Path(tmp), args.seed)
    print(
        f"{outcome.cycles} kill -9 cycles in {time.perf_counter() - started:.0f} s: "
        f"{outcome.acked_writes:,} acknowledged write frames, {outcome.checked_keys:,} key "
        f"checks; a compaction finished in {outcome.compacted_cycles} cycles, "
        f"{outcome.killed_mid_compaction} kills landed while a snapshot was being written; "
        f"{len(outcome.problems)} problems"
    )
    for problem in outcome.problems[:20]:
        print("  " + problem)
    raise SystemExit(1 if outcome.problems else 0)


if __name__ == "__main__":
    main()
