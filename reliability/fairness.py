"""A heavy client beside a light one: what the fair batcher buys, and what it costs.

    python -m reliability.fairness                       # this checkout's server
    python -m reliability.fairness --server-src OLD_DIR  # another checkout's, for before/after

One server (`serve --dim 100 --demo-size 100000`), then, through the real `flasma-ws
loadtest` (one process per client fleet):
  wide    64 connections x 16 in flight, JSON: the end-to-end benchmark's throughput;
  heavy   8 connections x 1,024 in flight, alone: the heavy client's throughput;
  mixed   the heavy client and, started a second later, a light one (1 connection, 1 in
          flight): the light client's p50/p99 and errors, the mean engine batch time (from
          /metrics, through loadtest), the heavy client's throughput.
Targets (issue 13): light p99 <= 4 x the mean engine batch time + 25 ms with 0 errors; heavy
throughput mixed >= 0.8 x alone. It reports; it exits 0 whatever it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flasma_ws.testing import ServerProcess, launch, wait_ready

LOADTEST = [sys.executable, "-m", "flasma_ws", "loadtest"]
WIDE = ("--connections", "64", "--inflight", "16")
HEAVY = ("--connections", "8", "--inflight", "1024")
LIGHT = ("--connections", "1", "--inflight", "1")
SERVE_ARGS = ("--dim", "100", "--demo-size", "100000")
KEPT = ("throughput_qps", "latency_ms", "errors", "mean_batch_size", "mean_engine_ms")


def loadtest(url: str, out: Path, seconds: float, *fleet: str) -> subprocess.Popen[bytes]:
    command = [*LOADTEST, "--url", url, "--warmup", "1", "--json-out", str(out)]
    # cwd: out's folder, so that `-m flasma_ws` is the installed package, not a checkout's
    return subprocess.Popen(
        [*command, *fleet, "--duration", str(seconds)], stdout=subprocess.DEVNULL, cwd=out.parent
    )


def finished(process: subprocess.Popen[bytes], out: Path) -> dict:
    if process.wait() != 0:
        raise RuntimeError(f"loadtest exited {process.returncode}")
    report = json.loads(out.read_text())
    return {key: report.get(key) for key in KEPT}


def alone(url: str, out: Path, seconds: float, *fleet: str) -> dict:
    return finished(loadtest(url, out, seconds, *fleet), out)


def measure(url: str, workdir: Path, seconds: float) -> dict[str, dict]:
    results = {
        "wide": alone(url, workdir / "wide.json", seconds, *WIDE),
        "heavy_alone": alone(url, workdir / "heavy-alone.json", seconds, *HEAVY),
    }
    # The heavy fleet outlasts the light one at both ends: the light client measures only
    # while the heavy one saturates the server.
    heavy = loadtest(url, workdir / "heavy.json", seconds + 4, *HEAVY)
    time.sleep(1.5)
    results["mixed_light"] = alone(url, workdir / "light.json", seconds, *LIGHT)
    results["mixed_heavy"] = finished(heavy, workdir / "heavy.json")
    return results


def verdicts(results: dict[str, dict]) -> list[str]:
    light, heavy = results["mixed_light"], results["mixed_heavy"]
    bound = 4 * heavy["mean_engine_ms"] + 25
    ratio = heavy["throughput_qps"] / results["heavy_alone"]["throughput_qps"]
    p50, p99 = light["latency_ms"]["p50"], light["latency_ms"]["p99"]
    errors = sum(light["errors"].values())
    light_met = "met" if p99 <= bound and errors == 0 else "NOT met"
    return [
        f"light client: p50 {p50:.1f} ms, p99 {p99:.1f} ms, {errors} errors; target p99 <= "
        f"4 x {heavy['mean_engine_ms']:.1f} ms + 25 ms = {bound:.1f} ms: {light_met}",
        f"heavy client: {heavy['throughput_qps']:,.0f} q/s beside the light one, "
        f"{results['heavy_alone']['throughput_qps']:,.0f} alone: {ratio:.3f}; target >= 0.8: "
        + ("met" if ratio >= 0.8 else "NOT met"),
        f"64 connections x 16 in flight: {results['wide']['throughput_qps']:,.0f} q/s",
    ]


def start_server(workdir: Path, source: Path | None) -> ServerProcess:
    """`serve` from this package, or from the checkout `source` (`-m` puts the working
    directory first on sys.path, so that server starts in that checkout)."""
    if source is None:
        return launch(workdir / "serve.log", *SERVE_ARGS)
    here = os.getcwd()
    source = source.resolve()
    os.chdir(source)
    try:
        return launch(workdir / "serve.log", *SERVE_ARGS, env={"PYTHONPATH": str(source)})
    finally:
        os.chdir(here)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-src", type=Path, help="run the server from this checkout")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = wait_ready(start_server(workdir, args.server_src))
        try:
            results = measure(server.url, workdir, args.seconds)
        finally:
            server.stop()
    print("\n".join(verdicts(results)))
    if args.json_out:
        document = {"server_src": str(args.server_src or "."), **results}
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
