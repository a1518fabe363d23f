"""Helpers shared by the reliability scripts: a server subprocess whose memory we can read
(flasma_ws.testing's), /metrics scraping, percentiles, file-descriptor limits."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from flasma_ws.metrics import read_samples
from flasma_ws.testing import ServerProcess, healthz, launch, wait_ready

__all__ = [  # ServerProcess and healthz are flasma_ws.testing's, re-exported for the scripts
    "ServerProcess",
    "healthz",
    "metrics",
    "open_connections",
    "other_benchmarks",
    "percentiles_ms",
    "raise_nofile",
    "run_against_server",
    "spawn_server",
    "wait_open_connections",
    "warn_if_busy",
]


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (capped by the hard limit); returns it.

    A child process started afterwards inherits it, so one call covers clients and server.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def spawn_server(args: Sequence[str], log: Path, ready_timeout_s: float = 180.0) -> ServerProcess:
    """Start a server subprocess and wait for /healthz 200; its output goes to `log`."""
    # SIGTERM to this script runs its `finally: server.stop()` rather than orphaning the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return wait_ready(launch(log, "--log-level", "warning", *args), ready_timeout_s)


def metrics(http_url: str) -> dict[str, float]:
    """The server's /metrics as {"name{labels}": value}."""
    return read_samples(httpx.get(f"{http_url}/metrics", timeout=10).text)


def open_connections(http_url: str) -> float:
    return metrics(http_url)["flasma_open_connections"]


def wait_open_connections(http_url: str, target: float, timeout_s: float = 10.0) -> float:
    """Poll flasma_open_connections until it reaches `target` or the timeout; returns the last."""
    deadline = time.monotonic() + timeout_s
    value = open_connections(http_url)
    while value != target and time.monotonic() < deadline:
        time.sleep(0.1)
        value = open_connections(http_url)
    return value


def percentiles_ms(latencies_s: Sequence[float], points: Sequence[float]) -> list[float]:
    if not latencies_s:
        return [float("nan")] * len(points)
    return [float(v) * 1000 for v in np.percentile(np.asarray(latencies_s), points)]


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark or load-test processes (the machine is shared)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in command for word in ("flasma-ws bench", "loadtest", "reliability.")):
            found.append(command.strip())
    return found


def warn_if_busy() -> None:
    busy = other_benchmarks()
    if busy:
        print(f"warning: other benchmarks are running; figures will be noisy: {busy[:3]}")


def run_against_server(
    name: str, server_args: Sequence[str], scenario: Callable[[ServerProcess], Awaitable[bool]]
) -> int:
    """Start a server subprocess, run the scenario against it, stop it with SIGTERM: exit code
    0 only when the scenario passed and the server exited 0."""
    log = Path(tempfile.mkdtemp(prefix=f"flasma-{name}-")) / "server.log"
    server = spawn_server(list(server_args), log)
    try:
        ok = asyncio.run(scenario(server))
    finally:
        code, seconds = server.stop()
    print(f"server exit status after SIGTERM: {code} ({seconds:.1f} s; log: {log})")
    return 0 if ok and code == 0 else 1
