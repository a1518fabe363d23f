"""Real `flasma-ws serve` processes on loopback ports, for the tests, `benchmarks/` and
`reliability/` (one harness for all three): start one, wait until it is ready, read its memory,
stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVE = [sys.executable, "-m", "flasma_ws", "serve", "--host", "127.0.0.1"]


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """`python -m flasma_ws serve` on a loopback port, its output in `log`."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    started: float  # time.perf_counter() just before the process was started

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status_kib(self, field: str) -> int:
        """A KiB field of /proc/PID/status: VmRSS, VmHWM (the peak RSS), ..."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def hwm_mib(self) -> float:
        """Peak RSS since start (VmHWM)."""
        return self.status_kib("VmHWM") / 1024

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


def launch(log: Path, *args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Start `flasma-ws serve ARGS` on a free loopback port; it is not ready yet."""
    port = free_port()
    command = [*SERVE, "--port", str(port), *args]
    environment = {**os.environ, **(env or {})}
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    return ServerProcess(process, port, log, started)


def healthz(http_url: str) -> int | None:
    """The /healthz status code, or None when nothing answers."""
    try:
        return httpx.get(f"{http_url}/healthz", timeout=5, trust_env=False).status_code
    except httpx.HTTPError:
        return None


def wait_ready(server: ServerProcess, timeout_s: float = 300.0) -> ServerProcess:
    """Wait for /healthz 200; a RuntimeError (the server stopped) if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"The server exited early:\n{server.log.read_text()[-3000:]}")
        if healthz(server.http_url) == 200:
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"The server was not ready in {timeout_s:g} s; see {server.log}.")
