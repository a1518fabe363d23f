"""A heavy client beside a light one, and throughput alone: what the fair batcher costs and buys.

    python benchmarks/fairness.py                       # this checkout's server
    python benchmarks/fairness.py --server-src OLD_DIR  # another checkout's, for before/after

One server (`serve --dim 100 --demo-size 100000`), then, through the real `flasma-ws
loadtest`, one process at a time except where two run at once:
  alone   64 connections x 16 in flight, JSON: throughput with no contention for fairness;
  mixed   a heavy client (8 connections x 1,024 in flight) and, started a second later, a
          light one (1 connection, 1 in flight): the light client's latency and errors, the
          heavy client's throughput.
It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flasma_ws.testing import launch, wait_ready

LOADTEST = [sys.executable, "-m", "flasma_ws", "loadtest"]


def loadtest(url: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [*LOADTEST, "--url", url, "--warmup", "1", "--json-out", str(out), *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def finished(process: subprocess.Popen[bytes], out: Path) -> dict:
    if process.wait() != 0:
        raise RuntimeError(f"loadtest exited {process.returncode}")
    return json.loads(out.read_text())


def summary(report: dict) -> dict:
    keys = ("throughput_qps", "latency_ms", "errors", "mean_batch_size", "answered")
    return {key: report.get(key) for key in keys}


def measure(url: str, workdir: Path, seconds: float) -> dict[str, dict]:
    alone = loadtest(
        url,
        workdir / "alone.json",
        "--connections",
        "64",
        "--inflight",
        "16",
        "--duration",
        str(seconds),
    )
    results = {"alone": summary(finished(alone, workdir / "alone.json"))}
    heavy = loadtest(
        url,
        workdir / "heavy.json",
        "--connections",
        "8",
        "--inflight",
        "1024",
        "--duration",
        str(seconds + 2),
    )
    time.sleep(1.0)
    light = loadtest(
        url,
        workdir / "light.json",
        "--connections",
        "1",
        "--inflight",
        "1",
        "--duration",
        str(seconds),
    )
    results["mixed_light"] = summary(finished(light, workdir / "light.json"))
    results["mixed_heavy"] = summary(finished(heavy, workdir / "heavy.json"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-src", type=Path, help="run the server from this checkout")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    env = {"PYTHONPATH": str(args.server_src.resolve())} if args.server_src else None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = wait_ready(
            launch(workdir / "serve.log", "--dim", "100", "--demo-size", "100000", env=env)
        )
        try:
            results = measure(server.url, workdir, args.seconds)
        finally:
            server.stop()
    text = json.dumps({"server_src": str(args.server_src or "."), **results}, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
