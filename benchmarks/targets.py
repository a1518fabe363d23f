"""Measure the performance targets P1-P6 in one run and print each against its target.

    python benchmarks/targets.py                 # the real sizes (minutes; ~5 GB of temp files)
    python benchmarks/targets.py --smoke         # seconds-long, tiny sizes: checks it works
    python benchmarks/targets.py --only p5,p6 --json-out targets.json

Everything runs on this machine through the real commands (`flasma-ws bench`, `serve`,
`loadtest`), each as its own process, one at a time. Every target is a ratio to something
measured in the same run, because absolute figures differ 3x between the team's CPUs:
BLAS is numpy's float32 GEMM, scores only (the machine's ceiling), ScaNN its brute force.
N = 100k, k = 10, d = 100 and 768.

  P1  engine / BLAS GEMM-only: >= 1.0 at batch 16 and 128, >= 0.9 at batch 1
  P2  engine / ScaNN: >= 1.25 at batch 128, >= 1.5 at batch 1; engine / FAISS >= 5 at 128
  P3  /ws, 64 connections x 16 in flight, JSON, d = 100: q/s >= 0.8 x BLAS GEMM-only q/s at
      batch 128, and >= 0.8 x ScaNN's in-process q/s at batch 128
  P4  one query in flight, d = 100: p50 latency <= BLAS's batch-1 time + 1 ms
  P5  serve a 1,000,000 x 100 legacy file: process start to first answer <= the bare
      `python -c "import tensorflow"` time + 1.5 s
  P6  server RSS <= 1.3 x matrix bytes + the TensorFlow baseline, 1,000,000 x 768 float32
  P7  certified bfloat16 (exact) / float32 engine q/s >= 1.3 at batch 128, d = 768 (on a CPU
      with AVX512_BF16; `bench --dtype bfloat16 --compare` times both in one run), with
      recall 1.0 and max score error <= 1e-5 against float64
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

from flasma_ws.testing import ServerProcess, launch, wait_ready

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

    def line(self, width: int = 44) -> str:
        """One table row; `width`: the name column (benchmarks/live_targets.py's are longer)."""
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "NOT met"
        return (
            f"{self.name:<{width}} {self.measured:>10,.3f}  target {sign} {self.target:<8,g} "
            f"{verdict}"
        )


# -- processes -------------------------------------------------------------------------------


def run_json(args: list[str], out: Path) -> dict:
    subprocess.run([*FLASMA, *args, "--json-out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


@contextmanager
def serving(workdir: Path, *args: str) -> Iterator[ServerProcess]:
    server = launch(workdir / f"serve-{len(list(workdir.glob('serve-*.log')))}.log", *args)
    try:
        yield server
    finally:
        server.stop()


# -- the targets -----------------------------------------------------------------------------


DIMS = (100, 768)
BATCHES = (1, 16, 128)
P1_TARGETS = {1: 0.9, 16: 1.0, 128: 1.0}  # engine / BLAS by batch
P2_SCANN_TARGETS = {1: 1.5, 128: 1.25}  # engine / ScaNN by batch


def bench_cells(sizes: Sizes, workdir: Path) -> dict[tuple[int, int], dict]:
    """One `bench --compare` over DIMS x BATCHES: {(dim, batch): cell}. P1-P4 all read it."""
    args = ["bench", "--dims", ",".join(map(str, DIMS)), "--n", str(sizes.n), "--compare"]
    args += ["--batches", ",".join(map(str, BATCHES)), "--seconds", str(sizes.seconds)]
    report = run_json(args, workdir / "bench.json")
    return {(cell["dim"], cell["batch"]): cell for cell in report["results"]}


def ratio_check(name: str, cell: dict, over: str, target: float) -> Check | None:
    """engine q/s / `over` q/s in one bench cell, or None where that column did not run."""
    if not cell.get(over):
        return None
    return Check(name, cell["qps"] / cell[over], target, True, cell)


def p1_p2(sizes: Sizes, workdir: Path, cells: dict[tuple[int, int], dict]) -> list[Check]:
    checks = []
    for (dim, batch), cell in sorted(cells.items()):
        where = f"d={dim}, batch {batch}"
        checks.append(
            ratio_check(f"P1 engine / BLAS ({where})", cell, "blas_qps", P1_TARGETS[batch])
        )
        if batch in P2_SCANN_TARGETS:
            target = P2_SCANN_TARGETS[batch]
            checks.append(ratio_check(f"P2 engine / ScaNN ({where})", cell, "scann_qps", target))
        if batch == 128:
            checks.append(ratio_check(f"P2 engine / FAISS ({where})", cell, "faiss_qps", 5.0))
    return [check for check in checks if check is not None]


def loadtest(server: ServerProcess, sizes: Sizes, workdir: Path, name: str, *args: str) -> dict:
    common = ["loadtest", "--url", server.url, "--duration", str(sizes.load_s), "--warmup", "1"]
    return run_json([*common, *args], workdir / f"load-{name}.json")


def p3_p4(sizes: Sizes, workdir: Path, cells: dict[tuple[int, int], dict]) -> list[Check]:
    with serving(workdir, "--dim", "100", "--demo-size", str(sizes.n)) as server:
        wait_ready(server)
        wide = loadtest(server, sizes, workdir, "64", "--connections", "64", "--inflight", "16")
        single = loadtest(server, sizes, workdir, "1", "--connections", "1", "--inflight", "1")
    e2e, full, one = wide["throughput_qps"], cells[(100, 128)], cells[(100, 1)]
    detail = {"report": wide, "bench_d100_b128": full}
    checks = [
        Check("P3 /ws q/s / BLAS q/s at batch 128", e2e / full["blas_qps"], 0.8, True, detail)
    ]
    if full.get("scann_qps"):
        checks.append(
            Check("P3 /ws q/s / ScaNN q/s at batch 128", e2e / full["scann_qps"], 0.8, True, detail)
        )
    blas_ms = 1000 / one["blas_qps"]
    p50 = single["latency_ms"]["p50"]
    detail = {"p50_ms": p50, "blas_batch1_ms": blas_ms, "engine_ms": single["mean_engine_ms"]}
    checks.append(
        Check("P4 p50 - BLAS batch-1 ms (1 in flight)", p50 - blas_ms, 1.0, False, detail)
    )
    return checks


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


def first_answer_s(server: ServerProcess, dim: int, timeout_s: float = 300) -> float:
    body = json.dumps({"embedding": [1.0] * dim}).encode()
    request = urllib.request.Request(f"{server.http_url}/cos", data=body)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - server.started
        except (urllib.error.HTTPError, OSError):
            time.sleep(0.01)
    raise RuntimeError("no answer from the server")


def bare_import_s(runs: int = 3) -> float:
    """The fastest of a few `python -c "import tensorflow"`: what any TensorFlow server pays."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def p5(sizes: Sizes, workdir: Path, _cells: object = None) -> list[Check]:
    path = legacy_file(workdir / "legacy.npy", sizes.cold_n, 100)
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
    bare = bare_import_s()
    with serving(workdir, "--npy", str(path), "--dim", "100") as server:
        seconds = first_answer_s(server, 100)
        split = re.search(r"Start-up split: (.*)", server.log.read_text())
    return [
        Check(
            f"P5 start to first answer - bare TF import, {sizes.cold_n:,} x 100 (s)",
            seconds - bare,
            1.5,
            False,
            {"first_answer_s": seconds, "bare_import_s": bare, "split": split and split.group(1)},
        )
    ]


def settled_rss_mib(
    server: ServerProcess, sizes: Sizes, workdir: Path, dim: int
) -> tuple[float, float]:
    """RSS after start-up and some real load at every batch size (KiB -> MiB)."""
    wait_ready(server)
    loadtest(
        server, sizes, workdir, f"rss-{dim}-{server.port}", "--connections", "8", "--inflight", "32"
    )
    return server.rss_mib(), server.hwm_mib()


def p6(sizes: Sizes, workdir: Path, _cells: object = None) -> list[Check]:
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


def p7(sizes: Sizes, workdir: Path, _cells: object = None) -> list[Check]:
    args = ["bench", "--dtype", "bfloat16", "--dims", "768", "--batches", "128", "--compare"]
    args += ["--recall", "--n", str(sizes.n), "--seconds", str(sizes.seconds)]
    cell = run_json(args, workdir / "bench-bf16.json")["results"][0]
    detail = {key: cell.get(key) for key in ("qps", "float32_qps", "fallback_fraction")}
    detail["mean_candidates"] = cell.get("mean_candidates")
    return [
        Check(
            "P7 bfloat16 exact / float32 q/s (d=768, b=128)",
            cell["engine_over_float32"],
            1.3,
            True,
            detail,
        ),
        Check("P7 bfloat16 exact recall@10", cell["recall"], 1.0, True, detail),
        Check("P7 bfloat16 exact max score error", cell["max_score_error"], 1e-5, False, detail),
    ]


STEPS = {"p1": p1_p2, "p3": p3_p4, "p5": p5, "p6": p6, "p7": p7}
NEEDS_BENCH = {"p1", "p3"}


def machine_line() -> str:
    """The CPU, its flags, numpy's BLAS and oneDNN, from the package (no TensorFlow import)."""
    from flasma_ws.machine import summary_line
    from flasma_ws.tf_runtime import onednn_state

    return summary_line(onednn_state().enabled)


def report(
    checks: list[Check], sizes: object, json_out: Path | None, width: int = 44, detail: bool = False
) -> None:
    """The table (with each check's detail when asked) and the --json-out summary."""
    print()
    print(machine_line())
    for check in checks:
        print(check.line(width))
        if detail:
            print(f"    {json.dumps(check.detail, default=str)}")
    if json_out:
        summary = {
            "sizes": asdict(sizes),  # type: ignore[call-overload]
            "cpus": os.cpu_count(),
            "machine": machine_line(),
            "checks": [{**asdict(c), "met": c.met} for c in checks],
        }
        json_out.write_text(json.dumps(summary, indent=2, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it works")
    parser.add_argument(
        "--only", default="p1,p3,p5,p6,p7", help="steps: p1 (P1+P2), p3 (P3+P4), p5, p6, p7"
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--workdir", type=Path, help="for temporary files (default: a temp dir)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    checks: list[Check] = []
    steps = [step.strip() for step in args.only.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cells = None
        if NEEDS_BENCH & set(steps):
            print("running bench --compare ...", flush=True)
            cells = bench_cells(sizes, Path(tmp))
        for step in steps:
            print(f"running {step} ...", flush=True)
            checks += STEPS[step](sizes, Path(tmp), cells)
    report(checks, sizes, args.json_out)
    return 0  # a benchmark reports; it does not fail on a missed target


if __name__ == "__main__":
    sys.exit(main())
