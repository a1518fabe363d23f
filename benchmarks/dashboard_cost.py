"""What open dashboards cost the query path: `flasma-ws loadtest` q/s with 5 dashboards open
against none, alternating in one run (issue 16's target: >= 0.97 x).

    flock /tmp/flasma-cpu.lock python benchmarks/dashboard_cost.py              # 3 rounds
    python benchmarks/dashboard_cost.py --rounds 1 --duration 2 --dim 16       # a smoke run
    python benchmarks/dashboard_cost.py --browser                              # real tabs too

A dashboard is what the page does to the server: load its files once, then GET
/stats?since=<last t> once a second. By default each is a poller thread in this process, so
that only the server's cost is measured; --browser opens headless chromium tabs instead,
whose rendering also competes for this machine's cores. One server serves every round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from flasma_ws.machine import cpu_flags, cpu_model
from flasma_ws.testing import launch, wait_ready

FLASMA = [sys.executable, "-m", "flasma_ws"]
FILES = ("/", "/dashboard/app.js", "/dashboard/client.js", "/dashboard/style.css")


def poll_like_a_dashboard(http_url: str, stop: threading.Event, polls: list[int]) -> None:
    with httpx.Client(base_url=http_url, timeout=10, trust_env=False) as client:
        for path in FILES:
            client.get(path).raise_for_status()
        since: float | None = None
        while not stop.wait(1.0):
            params = {} if since is None else {"since": since}
            feed = client.get("/stats", params=params).json()
            if feed["series"]["t"]:
                since = feed["series"]["t"][-1]
            polls.append(1)


@contextmanager
def pollers(http_url: str, count: int) -> Iterator[list[int]]:
    stop, polls = threading.Event(), []
    threads = [
        threading.Thread(target=poll_like_a_dashboard, args=(http_url, stop, polls), daemon=True)
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    try:
        yield polls
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)


@contextmanager
def browser_tabs(http_url: str, count: int) -> Iterator[list[int]]:
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        pages = [browser.new_page() for _ in range(count)]
        for page in pages:
            page.goto(f"{http_url}/")
            page.wait_for_selector("#main", state="visible")
        try:
            yield []
        finally:
            browser.close()


def loadtest(url: str, args: argparse.Namespace) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            *FLASMA,
            "loadtest",
            "--url",
            url,
            "--connections",
            str(args.connections),
            "--inflight",
            str(args.inflight),
            "--duration",
            str(args.duration),
            "--warmup",
            "1",
            "--json-out",
            out.name,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=args.duration * 10 + 120)
        report = json.loads(Path(out.name).read_text())
    runs = report.get("runs", [report])
    return float(runs[0]["throughput_qps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--dashboards", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--browser", action="store_true", help="headless chromium tabs")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; flags: {' '.join(cpu_flags())}")
    opened = browser_tabs if args.browser else pollers
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        server = wait_ready(
            launch(
                log, "--dim", str(args.dim), "--demo-size", str(args.n), "--log-level", "warning"
            )
        )
        try:
            none, some = [], []
            for round_ in range(args.rounds):
                none.append(loadtest(server.url, args))
                with opened(server.http_url, args.dashboards) as polls:
                    some.append(loadtest(server.url, args))
                print(
                    f"round {round_ + 1}: none {none[-1]:,.0f} q/s, {args.dashboards} dashboards "
                    f"{some[-1]:,.0f} q/s ({some[-1] / none[-1]:.3f} x; {len(polls)} polls)"
                )
                time.sleep(0.5)
        finally:
            server.stop()
    ratio = sum(some) / sum(none)
    print(
        f"mean: none {sum(none) / len(none):,.0f} q/s, with {args.dashboards} dashboards "
        f"{sum(some) / len(some):,.0f} q/s: {ratio:.3f} x (target >= 0.97)"
    )


if __name__ == "__main__":
    main()
