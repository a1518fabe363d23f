"""Measure the performance targets P1-P6 in one run and print each against its target.

    python benchmarks/targets.py                 # the real sizes (minutes; ~5 GB of temp files)
    python benchmarks/targets.py --smoke         # seconds-long, tiny sizes: checks it works
    python benchmarks/targets.py --only p5,p6 --json-out targets.json

Everything runs on this machine through the real commands (`flasma-ws bench`, `serve`,
`loadtest`), each as its own process, one at a time. Ratios are taken within the same run.

  P1  engine q/s / TensorFlow matmul-only q/s, batch 128            >= 0.65
  P2  engine q/s / FAISS IndexFlatIP q/s, batch 128                  >= 5
  P3  /ws with 64 connections: q/s >= 5,000, and >= 0.6 x the engine's in-process q/s at
      the batch size that formed
  P4  one query in flight: p50 latency <= the engine's batch-1 time + 1 ms
  P5  serve a 1,000,000 x 100 legacy file: process start to first answer <= 5 s
  P6  server RSS <= 1.3 x matrix bytes + the TensorFlow baseline, 1,000,000 x 768 float32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FLASMA = [sys.executable, "-m", "flasma_ws"]


@dataclass(frozen=True)
class Sizes:
    n: int = 100_000  # P1-P4
    seconds: float = 3.0  # bench seconds per cell and method
    load_s: float = 10.0  # loadtest duration
    cold_n: int = 1_000_000  # P5
    rss_n: int = 1_000_000  # P6
    rss_dim: int = 768


SMOKE = Sizes(n=5_000, seconds=0.2, load_s=1.0, cold_n=20_000, rss_n=20_000, rss_dim=64)


@dataclass
class Check:
    name: str
    measured: float
    target: float
    higher_is_better: bool
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return (
            self.measured >= self.target if self.higher_is_better else self.measured <= self.target
        )

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "NOT met"
        return f"{self.name:<44} {self.measured:>10.3f}  target {sign} {self.target:<8g} {verdict}"


# -- processes -------------------------------------------------------------------------------


def run_json(args: list[str], out: Path) -> dict:
    subprocess.run([*FLASMA, *args, "--json-out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    started: float

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", status, re.M))
        return int(values["VmRSS"]), int(values["VmHWM"])


@contextmanager
def serving(workdir: Path, *args: str) -> Iterator[Server]:
    port = free_port()
    log = workdir / f"serve-{port}.log"
    command = [*FLASMA, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, port, log, started)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(60)


def wait_ready(server: Server, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log.read_text()[-2000:]}")
        try:
            if server.get("/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the server did not become ready")


# -- the targets -----------------------------------------------------------------------------


def engine_cell(sizes: Sizes, batch: int, workdir: Path, compare: bool = False) -> dict:
    args = ["bench", "--dims", "100", "--batches", str(batch), "--n", str(sizes.n)]
    args += ["--seconds", str(sizes.seconds)] + (["--compare"] if compare else [])
    return run_json(args, workdir / f"bench-{batch}.json")["results"][0]


def p1_p2(sizes: Sizes, workdir: Path) -> list[Check]:
    cell = engine_cell(sizes, 128, workdir, compare=True)
    checks = [
        Check(
            "P1 engine / matmul-only (batch 128)",
            cell["qps"] / cell["matmul_qps"],
            0.65,
            True,
            cell,
        )
    ]
    if cell.get("faiss_qps"):
        checks.append(
            Check(
                "P2 engine / FAISS IndexFlatIP (batch 128)",
                cell["qps"] / cell["faiss_qps"],
                5.0,
                True,
                cell,
            )
        )
    return checks


def loadtest(server: Server, sizes: Sizes, workdir: Path, name: str, *args: str) -> dict:
    common = ["loadtest", "--url", server.url, "--duration", str(sizes.load_s), "--warmup", "1"]
    return run_json([*common, *args], workdir / f"load-{name}.json")


def p3_p4(sizes: Sizes, workdir: Path) -> list[Check]:
    with serving(workdir, "--dim", "100", "--demo-size", str(sizes.n)) as server:
        wait_ready(server)
        wide = loadtest(server, sizes, workdir, "64", "--connections", "64", "--inflight", "4")
        single = loadtest(server, sizes, workdir, "1", "--connections", "1", "--inflight", "1")
    # The engine runs each batch at its real size (no padding): compare at the mean that formed.
    batch = min(max(round(wide["mean_batch_size"]), 1), 128)
    in_process = engine_cell(sizes, batch, workdir)["qps"]
    e2e = wide["throughput_qps"]
    p50, engine_ms = single["latency_ms"]["p50"], single["mean_engine_ms"]
    return [
        Check("P3 /ws q/s, 64 connections", e2e, 5000, True, {"report": wide}),
        Check(
            f"P3 /ws q/s / engine q/s at batch {batch}",
            e2e / in_process,
            0.6,
            True,
            {"engine_qps": in_process, "mean_batch": wide["mean_batch_size"]},
        ),
        Check(
            "P4 p50 - engine batch-1 ms (1 in flight)",
            p50 - engine_ms,
            1.0,
            False,
            {"p50_ms": p50, "engine_ms": engine_ms},
        ),
    ]


def legacy_file(path: Path, n: int, dim: int) -> Path:
    """A Flasma legacy file: normalized (n, dim) rows, transposed and flattened."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(dim * n,))
    view = out.reshape(dim, n)
    rng = np.random.default_rng(0)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        view[:, start : start + block.shape[0]] = block.T
    out.flush()
    return path


def standard_file(path: Path, n: int, dim: int) -> Path:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 50_000):
        out[start : start + 50_000] = rng.standard_normal((min(50_000, n - start), dim), np.float32)
    out.flush()
    return path


def first_answer_s(server: Server, dim: int, timeout_s: float = 300) -> float:
    body = json.dumps({"embedding": [1.0] * dim}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/cos", data=body)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - server.started
        except (urllib.error.HTTPError, OSError):
            time.sleep(0.01)
    raise RuntimeError("no answer from the server")


def p5(sizes: Sizes, workdir: Path) -> list[Check]:
    path = legacy_file(workdir / "legacy.npy", sizes.cold_n, 100)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
    with serving(workdir, "--npy", str(path), "--dim", "100") as server:
        seconds = first_answer_s(server, 100)
        split = re.search(r"Start-up split: (.*)", server.log.read_text())
    return [
        Check(
            f"P5 start to first answer, {sizes.cold_n:,} x 100 (s)",
            seconds,
            5.0,
            False,
            {"split": split.group(1) if split else None},
        )
    ]


def settled_rss_mib(server: Server, sizes: Sizes, workdir: Path, dim: int) -> tuple[float, float]:
    """RSS after start-up and some real load at every batch size (KiB -> MiB)."""
    wait_ready(server)
    loadtest(
        server, sizes, workdir, f"rss-{dim}-{server.port}", "--connections", "8", "--inflight", "32"
    )
    rss, hwm = server.rss_kib()
    return rss / 1024, hwm / 1024


def p6(sizes: Sizes, workdir: Path) -> list[Check]:
    dim, n = sizes.rss_dim, sizes.rss_n
    with serving(workdir, "--dim", str(dim), "--demo-size", "1000") as baseline_server:
        baseline, _ = settled_rss_mib(baseline_server, sizes, workdir, dim)
    path = standard_file(workdir / "standard.npy", n, dim)
    matrix_mib = n * dim * 4 / 2**20
    checks = []
    for label, extra in (
        ("default", []),
        ("--score-memory-mib 128", ["--score-memory-mib", "128"]),
    ):
        with serving(workdir, "--npy", str(path), *extra) as server:
            rss, hwm = settled_rss_mib(server, sizes, workdir, dim)
        detail = {
            "rss_mib": rss,
            "peak_rss_mib": hwm,
            "baseline_mib": baseline,
            "matrix_mib": matrix_mib,
        }
        checks.append(
            Check(
                f"P6 (RSS - baseline) / matrix, {n:,} x {dim}, {label}",
                (rss - baseline) / matrix_mib,
                1.3,
                False,
                detail,
            )
        )
    path.unlink()
    return checks


STEPS = {"p1": p1_p2, "p3": p3_p4, "p5": p5, "p6": p6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it works")
    parser.add_argument(
        "--only", default="p1,p3,p5,p6", help="steps: p1 (P1+P2), p3 (P3+P4), p5, p6"
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--workdir", type=Path, help="for temporary files (default: a temp dir)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for step in args.only.split(","):
            print(f"running {step} ...", flush=True)
            checks += STEPS[step.strip()](sizes, Path(tmp))
    print()
    for check in checks:
        print(check.line())
    if args.json_out:
        summary = {
            "sizes": asdict(sizes),
            "cpus": os.cpu_count(),
            "checks": [{**asdict(c), "met": c.met} for c in checks],
        }
        args.json_out.write_text(json.dumps(summary, indent=2, default=str))
    return 0  # a benchmark reports; it does not fail on a missed target


if __name__ == "__main__":
    sys.exit(main())
