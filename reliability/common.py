"""Helpers shared by the reliability scripts: a server subprocess whose memory we can read,
/metrics scraping, percentiles, file-descriptor limits."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (capped by the hard limit); returns it.

    A child process started afterwards inherits it, so one call covers clients and server.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class ServerProcess:
    """`python -m flasma_ws serve` on a loopback port, so its RSS and fds can be read."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        return status_kib(self.process.pid, "VmRSS") / 1024

    def hwm_mib(self) -> float:
        """Peak RSS since start (VmHWM)."""
        return status_kib(self.process.pid, "VmHWM") / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM (the server drains), then wait; (exit status, seconds it took). -9: killed."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode), time.monotonic() - started


def spawn_server(args: Sequence[str], log: Path, ready_timeout_s: float = 180.0) -> ServerProcess:
    """Start a server subprocess and wait for /healthz 200; its output goes to `log`."""
    # SIGTERM to this script runs its `finally: server.stop()` rather than orphaning the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    port = free_port()
    command = [sys.executable, "-m", "flasma_ws", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", *args]
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(process, port, log)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited early:\n{log.read_text()[-3000:]}")
        if healthz(server.http_url) == 200:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"The server was not ready in {ready_timeout_s} s; see {log}.")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def healthz(http_url: str) -> int | None:
    """The /healthz status code, or None when nothing answers."""
    try:
        return httpx.get(f"{http_url}/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def metrics(http_url: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value}; comments dropped."""
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


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
