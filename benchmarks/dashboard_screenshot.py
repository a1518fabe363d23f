"""Take docs/dashboard.png: the dashboard in headless chromium while `flasma-ws loadtest` runs.

    flock /tmp/flasma-cpu.lock python benchmarks/dashboard_screenshot.py [--out docs/dashboard.png]

A demo server of 100,000 x 100 serves three loads in turn (1, 8 and 32 connections with
requests in flight) and a few bad requests, so that every chart and the errors table have
something to show; the page, opened when the server was ready, is photographed half-way
through the last load, after a console query.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from flasma_ws.testing import launch, wait_ready

FLASMA = [sys.executable, "-m", "flasma_ws"]


def load(url: str, connections: int, inflight: int, seconds: float) -> subprocess.Popen[bytes]:
    command = [*FLASMA, "loadtest", "--url", url, "--connections", str(connections)]
    command += ["--inflight", str(inflight), "--duration", str(seconds)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=20.0, help="per load step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = wait_ready(
            launch(
                Path(folder) / "server.log",
                "--dim",
                "100",
                "--demo-size",
                "100000",
                "--log-level",
                "warning",
            )
        )
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{server.http_url}/")
                page.wait_for_selector("#main", state="visible")
                for connections, inflight in ((1, 1), (8, 4)):
                    load(server.url, connections, inflight, args.seconds).wait()
                last = load(server.url, 32, 8, args.seconds)  # photographed while it runs
                for _ in range(3):  # a few refusals for the errors table
                    httpx.post(f"{server.http_url}/cos", json={"embedding": [1.0, 2.0]})
                page.wait_for_timeout(args.seconds * 500)
                page.click("#random")
                page.click("#search")
                page.wait_for_function("() => window.flasmaDashboard.lastResult !== null")
                page.wait_for_timeout(2500)  # two more polls
                page.screenshot(path=str(args.out), full_page=True)
                last.wait()
                browser.close()
        finally:
            server.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
