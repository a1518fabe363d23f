"""`flasma-ws serve` as a real process: Flasma's own request on its legacy file, and SIGTERM."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import websockets
from reference import assert_exact, pairs_to_arrays

from flasma_ws import testing
from flasma_ws.testing import free_port

LEGACY = Path(__file__).resolve().parents[1].parent / "shared/fixtures/flasma-legacy-10000x100.npy"


def launch(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`flasma-ws serve` on a free loopback port, logging to a file; (process, base URL)."""
    server = testing.launch(log, *args, env=env)
    return server.process, server.http_url


def start(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """launch(), then wait until /healthz says ready."""
    server = testing.wait_ready(testing.launch(log, *args, env=env), timeout_s=120)
    return server.process, server.http_url


@pytest.mark.skipif(not LEGACY.exists(), reason="the shared legacy fixture is not present")
def test_flasma_request_on_legacy_file_matches_reference(tmp_path):
    process, base = start(tmp_path / "serve.log", "--npy", str(LEGACY), "--dim", "100")
    try:
        embedding = [float(f"{i}.{i}") for i in range(100)]  # element i is the number "i.i"
        body = '{"embedding":[' + ",".join(f"{i}.{i}" for i in range(100)) + "]}"
        if shutil.which("curl"):
            out = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-X",
                    "POST",
                    f"{base}/cos",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    body,
                ],
                capture_output=True,
                check=True,
                timeout=30,
            ).stdout
        else:
            out = httpx.post(f"{base}/cos", content=body).content
        result = orjson.loads(out)["result"]
        assert len(result) == 10
        raw = np.load(LEGACY)
        matrix = raw.reshape(100, -1).T
        assert_exact(matrix, np.array([embedding]), *pairs_to_arrays(result), k=10)
    finally:
        process.terminate()
        process.wait(30)


def test_sigterm_answers_everything_in_flight_then_closes_1001_and_exits_0(tmp_path):
    process, base = start(
        tmp_path / "serve.log",
        "--dim",
        "64",
        "--max-batch",
        "32",
        env={"FLASMA_DEMO_SIZE": "50000"},  # every flag can also come from FLASMA_<NAME>
    )
    assert httpx.get(f"{base}/info").json()["n"] == 50000
    url = base.replace("http", "ws") + "/ws"

    async def scenario() -> tuple[list[dict], int | None]:
        async with websockets.connect(url) as ws:
            rng = np.random.default_rng(0)
            for i in range(20):  # 20 x 64 rows: many batches still queued at SIGTERM
                frame = {"id": i, "embeddings": rng.standard_normal((64, 64)).tolist()}
                await ws.send(orjson.dumps(frame).decode())
            await asyncio.sleep(0.05)
            os.kill(process.pid, signal.SIGTERM)
            answers = []
            try:
                while True:
                    answers.append(orjson.loads(await ws.recv()))
            except websockets.ConnectionClosed as closed:
                return answers, closed.rcvd.code if closed.rcvd else None

    try:
        answers, close_code = asyncio.run(scenario())
        assert sorted(a["id"] for a in answers) == list(range(20))
        assert all(len(a["results"]) == 64 for a in answers)
        assert close_code == 1001
        assert process.wait(30) == 0
        assert "Draining" in (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_a_bad_file_with_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "nan.npy"
    matrix = np.ones((100, 4), np.float32)
    matrix[42, 1] = np.nan
    np.save(bad, matrix)
    result = subprocess.run(
        [sys.executable, "-m", "flasma_ws", "serve", "--npy", str(bad), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "NaN" in errors[0] and "row 42" in errors[0]


def test_serve_help_states_units():
    result = subprocess.run(
        [sys.executable, "-m", "flasma_ws", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0
    for words in ("milliseconds", "bytes", "Seconds", "FLASMA_PORT"):
        assert words in result.stdout


def test_serve_flags_reach_the_server(tmp_path):
    process, base = start(
        tmp_path / "serve.log",
        "--dim",
        "8",
        "--demo-size",
        "100",
        "--token",
        "abc",
        "--allowed-origins",
        "https://app.example",
        "--max-connections",
        "1",
    )
    try:
        body = {"embedding": [1.0] * 8}
        assert httpx.post(f"{base}/cos", json=body).status_code == 401
        auth = {"Authorization": "Bearer abc"}
        assert httpx.post(f"{base}/cos", json=body, headers=auth).status_code == 200
        evil = {**auth, "Origin": "https://evil.example"}
        assert httpx.post(f"{base}/cos", json=body, headers=evil).status_code == 403
    finally:
        process.terminate()
        process.wait(30)


def test_every_serve_option_is_a_setting():
    from flasma_ws.cli.serve import build_settings, serve

    names = inspect.signature(serve).parameters
    options = {name: p.default for name, p in names.items()}
    settings = build_settings({**options, "dim": 4, "token": "t", "max_connections": 3})
    assert (settings.token, settings.max_connections) == ("t", 3)


def test_sigterm_while_loading_exits_promptly(tmp_path):
    log = tmp_path / "serve.log"
    # ~3 GB of demo vectors: loads for a while
    process, base = launch(log, "--dim", "2048", "--demo-size", "400000")
    try:
        deadline = time.monotonic() + 60
        while "demo set" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        healthz = httpx.get(f"{base}/healthz", timeout=60)
        assert healthz.status_code == 503  # still loading
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
