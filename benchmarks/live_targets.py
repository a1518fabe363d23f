"""Measure issue 14's live-collection targets on this machine, each within one run.

    python benchmarks/live_targets.py                # the real sizes (minutes; ~1 GB of temp files)
    python benchmarks/live_targets.py --smoke        # tiny sizes: checks that it works
    python benchmarks/live_targets.py --only a,b --json-out live.json

Every figure comes from real `flasma-ws serve --data-dir` processes on loopback (launched by
flasma_ws.testing), driven by `flasma-ws loadtest` in its own process (a, b) or by pipelined
binary upsert frames from this process (c, d), one server at a time:

  a  search q/s with 10 % writes >= 0.8 x read-only q/s: N = 100k, d = 100, one server,
     `loadtest --connections 64 --inflight 4` alternating read-only and --write-ratio 0.1
  b  write acknowledgement p99 <= 20 ms at 1,000 upserts/s, open loop (group commit, this disk),
     beside the disk's own group-commit floor at the same rate (benchmarks/disk_floor.py),
     measured before, during (on another file) and after the server's run
  c  bulk import >= 100,000 rows/s over binary upsert frames of 1,000 rows, d = 100, pipelined
     over 4 connections (compaction off, so the log's growth is the bytes written)
  d  recovery of a 1M x 100 snapshot plus a 100,000-record log to /healthz 200 <= 10 s: import
     a 1M demo set, write 100,000 one-row upsert frames (compaction off), kill -9, restart
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

# The sibling script's report and process helpers (both run as `python benchmarks/X.py`).
from disk_floor import group_commit_floor  # type: ignore[import-not-found]
from targets import FLASMA, Check, report, serving  # type: ignore[import-not-found]
from websockets.asyncio.client import connect

from flasma_ws.metrics import read_samples
from flasma_ws.testing import ServerProcess, wait_ready
from flasma_ws.write_codec import encode_binary_upsert

NO_COMPACTION = ["--compact-min-rows", "100000000"]


@dataclass(frozen=True)
class Sizes:
    n: int = 100_000  # a, b
    load_s: float = 8.0  # each loadtest run of a
    write_s: float = 10.0  # b
    bulk_rows: int = 500_000  # c
    frame_rows: int = 1_000  # c
    recovery_n: int = 1_000_000  # d
    log_records: int = 100_000  # d


SMOKE = Sizes(
    n=5_000, load_s=1.0, write_s=1.0, bulk_rows=5_000, frame_rows=500, recovery_n=20_000,
    log_records=2_000,
)  # fmt: skip


# -- processes ---------------------------------------------------------------------------------
def loadtest(server: ServerProcess, workdir: Path, name: str, *args: str) -> dict:
    out = workdir / f"load-{name}.json"
    command = [*FLASMA, "loadtest", "--url", server.url, "--json-out", str(out), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def metrics(server: ServerProcess) -> dict[str, float]:
    response = httpx.get(f"{server.http_url}/metrics", timeout=10, trust_env=False)
    return read_samples(response.text)


def info(server: ServerProcess) -> dict:
    return httpx.get(f"{server.http_url}/info", timeout=10, trust_env=False).json()


# -- pipelined binary upserts ------------------------------------------------------------------
def upsert_frames(first_key: int, rows: int, per_frame: int, dim: int, seed: int) -> list[bytes]:
    """Binary upsert frames of `per_frame` random rows, keys first_key.., ids 0, 1, ..."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, start in enumerate(range(0, rows, per_frame)):
        count = min(per_frame, rows - start)
        keys = list(range(first_key + start, first_key + start + count))
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        frames.append(encode_binary_upsert(i, keys, vectors))  # type: ignore[arg-type]
    return frames


async def _connection(url: str, frames: list[bytes], mine: range, window: int) -> list[float]:
    """Send frames[mine] keeping `window` in flight; each frame's send-to-ack seconds."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    async with connect(url, max_size=None, compression=None, proxy=None) as ws:
        todo = iter(mine)
        for index in itertools.islice(todo, window):
            sent[index] = time.perf_counter()
            await ws.send(frames[index])
        while sent:
            answer = orjson.loads(await ws.recv())
            if "upserted" not in answer or answer.get("errors"):
                raise RuntimeError(f"An upsert frame failed: {str(answer)[:300]}")
            latencies.append(time.perf_counter() - sent.pop(answer["id"]))
            following = next(todo, None)
            if following is not None:
                sent[following] = time.perf_counter()
                await ws.send(frames[following])
    return latencies


async def _pipelined(url: str, frames: list[bytes], connections: int, window: int) -> list[float]:
    parts = [range(c, len(frames), connections) for c in range(connections)]
    done = await asyncio.gather(*(_connection(url, frames, p, window) for p in parts))
    return [latency for part in done for latency in part]


def pipelined(url: str, frames: list[bytes], connections: int, window: int) -> tuple[float, list]:
    """(wall seconds, per-frame ack latencies) of sending every frame."""
    started = time.perf_counter()
    latencies = asyncio.run(_pipelined(url, frames, connections, window))
    return time.perf_counter() - started, latencies


# -- the targets -------------------------------------------------------------------------------
def demo_args(n: int, data_dir: Path, *extra: str) -> list[str]:
    return ["--dim", "100", "--demo-size", str(n), "--data-dir", str(data_dir), *extra]


def a_b(sizes: Sizes, workdir: Path) -> list[Check]:
    common = ["--connections", "64", "--inflight", "4", "--warmup", "1"]
    common += ["--duration", str(sizes.load_s)]
    read_qps: list[float] = []
    write_qps: list[float] = []
    reports: list[dict] = []
    with serving(workdir, *demo_args(sizes.n, workdir / "ab")) as server:
        wait_ready(server)
        appendable: list[float] = []  # rows in the appendable segment before each run
        for turn in range(2):  # alternating: drift of the VM hits both alike
            appendable.append(metrics(server)["flasma_appendable_rows"])
            ro = loadtest(server, workdir, f"ro-{turn}", *common)
            appendable.append(metrics(server)["flasma_appendable_rows"])
            rw = loadtest(server, workdir, f"rw-{turn}", *common, "--write-ratio", "0.1")
            read_qps.append(ro["throughput_qps"])
            write_qps.append(rw["throughput_qps"])
            reports += [ro, rw]
        # The disk's own group-commit floor on the same file system: just before and after,
        # and during the run on a file of its own (what the disk did in those seconds).
        floors = [group_commit_floor(workdir, 1000, sizes.write_s)]
        beside: list[dict[str, float]] = []
        probe = threading.Thread(
            target=lambda: beside.append(group_commit_floor(workdir, 1000, sizes.write_s + 1))
        )
        before = metrics(server)
        probe.start()
        open_loop = loadtest(
            server,
            workdir,
            "writes",
            *["--rate", "1000", "--write-ratio", "1", "--connections", "4"],
            *["--duration", str(sizes.write_s), "--warmup", "1"],
        )
        after = metrics(server)
        probe.join()
        floors.append(group_commit_floor(workdir, 1000, sizes.write_s))
    writes = open_loop["writes"]
    fsyncs = after["flasma_wal_fsyncs"] - before["flasma_wal_fsyncs"]
    records = after["flasma_wal_records"] - before["flasma_wal_records"]
    ratio = float(np.mean(write_qps) / np.mean(read_qps))
    return [
        Check(
            f"a search q/s with 10 % writes / read-only (N={sizes.n:,}, d=100)",
            ratio,
            0.8,
            True,
            {
                "read_only_qps": read_qps,
                "with_writes_qps": write_qps,
                "appendable_rows_before_ro_rw_ro_rw": appendable,
                "engine_ms_ro_rw_ro_rw": [r["mean_engine_ms"] for r in reports],
                "batch_ro_rw_ro_rw": [r["mean_batch_size"] for r in reports],
                "writes_per_s": [r["writes"]["writes_per_s"] for r in reports if r["writes"]],
                "ack_p99_ms": [r["writes"]["latency_ms"]["p99"] for r in reports if r["writes"]],
            },
        ),
        Check(
            "b write ack p99 at 1,000 upserts/s, open loop (ms)",
            writes["latency_ms"]["p99"],
            20.0,
            False,
            {
                "latency_ms": writes["latency_ms"],
                "writes_per_s": writes["writes_per_s"],
                "errors": writes["errors"],
                "records_per_fsync": records / fsyncs if fsyncs else None,
                # what no WAL can beat on this disk (benchmarks/disk_floor.py), same run
                "disk_floor_before_after_ms": floors,
                "disk_floor_during_ms": beside[0],
                "p99_over_disk_floor_during_p99": writes["latency_ms"]["p99"] / beside[0]["p99"],
            },
        ),
    ]


def c(sizes: Sizes, workdir: Path) -> list[Check]:
    frames = upsert_frames(10**9, sizes.bulk_rows, sizes.frame_rows, 100, seed=1)
    frame_bytes = sum(map(len, frames))
    with serving(workdir, *demo_args(1_000, workdir / "c", *NO_COMPACTION)) as server:
        wait_ready(server)
        before = metrics(server)
        seconds, latencies = pipelined(server.url, frames, connections=4, window=2)
        after = metrics(server)
        live = info(server)["n"]
    wal = after["flasma_wal_bytes"] - before["flasma_wal_bytes"]
    ms = np.array(latencies) * 1000
    return [
        Check(
            f"c bulk import rows/s, binary frames of {sizes.frame_rows:,} (d=100)",
            sizes.bulk_rows / seconds,
            100_000,
            True,
            {
                "rows": sizes.bulk_rows,
                "seconds": seconds,
                "wal_bytes_per_s": wal / seconds,
                "wire_bytes_per_s": frame_bytes / seconds,
                "fsyncs": after["flasma_wal_fsyncs"] - before["flasma_wal_fsyncs"],
                "frame_ack_ms_p50_p99": [
                    float(np.percentile(ms, 50)),
                    float(np.percentile(ms, 99)),
                ],
                "live_rows_after": live,
            },
        )
    ]


def d(sizes: Sizes, workdir: Path) -> list[Check]:
    data_dir = workdir / "d"
    with serving(workdir, *demo_args(sizes.recovery_n, data_dir, *NO_COMPACTION)) as server:
        wait_ready(server, timeout_s=900)
        frames = upsert_frames(10**9, sizes.log_records, 1, 100, seed=2)
        seconds, _ = pipelined(server.url, frames, connections=4, window=64)
        written = metrics(server)
        server.process.kill()  # kill -9: no drain, no final compaction
        server.process.wait()
    del frames
    log_bytes = sum(
        p.stat().st_size for p in data_dir.rglob("*") if "wal" in str(p) and p.is_file()
    )
    with serving(workdir, "--data-dir", str(data_dir), *NO_COMPACTION) as restarted:
        wait_ready(restarted, timeout_s=900)
        ready_s = time.perf_counter() - restarted.started
        live = info(restarted)["n"]
        split = re.search(r"Collection .*? live\.", restarted.log.read_text())
    return [
        Check(
            f"d recovery to ready, {sizes.recovery_n:,} x 100 + {sizes.log_records:,} records (s)",
            ready_s,
            10.0,
            False,
            {
                "live_rows": live,
                "expected_rows": sizes.recovery_n + sizes.log_records,
                "log_records_before_kill": written["flasma_wal_records"],
                "log_bytes": log_bytes,
                "writing_s": seconds,
                "server_log": split and split.group(0),
            },
        )
    ]


STEPS = {"a": a_b, "c": c, "d": d}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it works")
    parser.add_argument("--only", default="a,c,d", help="steps: a (a and b), c, d")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--workdir", type=Path, help="for temporary files (default: a temp dir)")
    args = parser.parse_args()
    steps = [s.strip() for s in args.only.split(",")]
    if unknown := [s for s in steps if s not in STEPS]:
        parser.error(f"--only: unknown step {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    sizes = SMOKE if args.smoke else Sizes()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for step in steps:
            print(f"running {step} ...", flush=True)
            checks += STEPS[step](sizes, Path(tmp))
    report(checks, sizes, args.json_out, width=58, detail=True)
    return 0  # a benchmark reports; it does not fail on a missed target


if __name__ == "__main__":
    sys.exit(main())
