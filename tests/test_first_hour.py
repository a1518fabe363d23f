"""A new user's first hour (issue 12): every mistake gets one clear line, and nothing misleads.

CLI items run `flasma-ws` as a subprocess; server items run a real server on a loopback port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from reference import assert_exact, pairs_to_arrays
from test_serve_process import LEGACY, free_port, start

import flasma_ws
from flasma_ws.client import AuthError, server_info

README = Path(__file__).resolve().parents[1] / "README.md"
needs_legacy = pytest.mark.skipif(not LEGACY.exists(), reason="the shared legacy fixture is absent")


def user_env() -> dict[str, str]:
    """This environment as a user's shell has it: without the TensorFlow log level that the
    tests' conftest sets (through the engine's defaults) for this process."""
    return {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flasma_ws", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**user_env(), "COLUMNS": "200", **(env or {})},
    )


def error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one `Error:` line of a failed command: exit `code`, no traceback, no second report."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "ERROR" not in result.stderr, result.stderr  # not also logged
    return errors[0]


def only_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """Like error_line, for errors found before TensorFlow loads: stderr is that line alone."""
    line = error_line(result, code)
    assert result.stderr.strip() == line, result.stderr
    return line


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(30)


# -- 1. a wrong --dim on a legacy file -------------------------------------------------------
@needs_legacy
@pytest.mark.parametrize("dim", ["64", "1000"])
def test_serve_refuses_a_wrong_legacy_dim_and_names_the_right_one(dim):
    line = only_line(cli("serve", "--npy", str(LEGACY), "--dim", dim, "--port", "0"))
    assert f"--dim {dim} is wrong; pass --dim 100" in line and "unit-norm" in line


@needs_legacy
def test_convert_refuses_a_wrong_legacy_dim(tmp_path):
    line = only_line(cli("convert", str(LEGACY), str(tmp_path / "out.npy"), "--dim", "1000"))
    assert "norm 3.16" in line and "pass --dim 100" in line
    assert not (tmp_path / "out.npy").exists()


# -- 2. ports and hosts that cannot be listened on; 7e. the one negative value is named -------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "99999"], "--port must be from 0 to 65535"),
        (["--port", "-1"], "--port must be from 0 to 65535"),
        (["--host", "999.1.1.1"], "--host 999.1.1.1 is not an IP address"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must not be negative, got -1."),
        (["--drain-timeout", "-2"], "--drain-timeout must not be negative, got -2."),
    ],
)
def test_bad_addresses_and_values_are_one_line_up_front(args, expected):
    line = only_line(cli("serve", "--dim", "8", *args))
    assert expected in line
    assert "--max-wait-ms and" not in line


# -- 3. a port already in use --------------------------------------------------------------
def test_a_port_in_use_is_one_line_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        result = cli("serve", "--dim", "8", "--host", "127.0.0.1", "--port", str(port))
        elapsed = time.monotonic() - began
    line = only_line(result)
    assert f"127.0.0.1:{port} is already in use" in line and "--port" in line
    assert elapsed < 5  # before TensorFlow's import, not after it


# -- 4. fewer rows than --top-k ------------------------------------------------------------
def test_fewer_rows_than_top_k_answers_n_results_and_says_so_once(tmp_path):
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "five.npy", matrix)
    log = tmp_path / "serve.log"
    process, base = start(log, "--npy", str(tmp_path / "five.npy"))  # --top-k is 10
    try:
        query = rng.standard_normal(8)
        response = httpx.post(f"{base}/cos", json={"embedding": query.tolist()})
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert len(result) == 5
        assert_exact(matrix, query[None], *pairs_to_arrays(result), k=5)
        assert httpx.get(f"{base}/info").json()["top_k"] == 5
        assert log.read_text().count("--top-k 10 is more than the 5 vectors served") == 1
    finally:
        stop(process)


# -- 5. tracebacks instead of one line -----------------------------------------------------
@pytest.mark.parametrize("env", [False, True])
def test_an_unknown_log_level_is_one_line(env):
    if env:
        result = cli("serve", "--dim", "8", env={"FLASMA_LOG_LEVEL": "loud"})
    else:
        result = cli("serve", "--dim", "8", "--log-level", "loud")
    assert "--log-level must be one of debug, info, warning, error" in only_line(result)


def test_a_garbage_certificate_is_one_line(tmp_path):
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    result = cli("serve", "--dim", "8", "--certfile", str(garbage), "--keyfile", str(garbage))
    assert "Cannot load the TLS certificate" in only_line(result)


@pytest.mark.parametrize("flag", ["--json-out", "--plot"])
def test_loadtest_outputs_are_checked_before_the_run(tmp_path, flag):
    # No server listens there: the output is refused before any connection is tried.
    url = f"ws://127.0.0.1:{free_port()}/ws"
    line = only_line(cli("loadtest", "--url", url, flag, str(tmp_path / "missing" / "out")))
    assert f"the folder {tmp_path / 'missing'} does not exist; create it first" in line


def test_bench_json_out_is_checked_before_the_run(tmp_path):
    out = tmp_path / "missing" / "bench.json"
    result = cli("bench", "--batches", "1", "--dims", "8", "--n", "100", "--json-out", str(out))
    assert "does not exist; create it first" in error_line(result)
    assert "q/s" not in result.stdout  # refused before measuring


# -- 6. a client's invalid UTF-8 never puts a traceback into the log -------------------------
def test_invalid_utf8_text_frame_closes_1007_with_no_traceback(tmp_path):
    log = tmp_path / "serve.log"
    process, base = start(log, "--dim", "8", "--demo-size", "100", "--log-level", "debug")

    async def send_bad_text() -> int | None:
        async with websockets.connect(base.replace("http", "ws") + "/ws") as ws:
            await ws.send(b"\xff\xfe{", text=True)  # a text frame that is not UTF-8
            try:
                await ws.recv()
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    try:
        assert asyncio.run(send_bad_text()) == 1007
        time.sleep(0.2)
        assert httpx.get(f"{base}/healthz").status_code == 200  # the server carries on
        text = log.read_text()
        assert "Traceback" not in text and "UnicodeDecodeError" not in text
        assert "not valid UTF-8; closed its connection (1007)" in text
    finally:
        stop(process)


# -- 7. misleading messages ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["base.fvecs", "base.hdf5", "notes.txt"])
def test_serve_points_a_file_that_is_not_npy_to_convert(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x04\x00\x00\x00 some bytes that are not .npy\n")
    line = only_line(cli("serve", "--npy", str(tmp_path / name), "--port", "0"))
    assert "is not a readable .npy file" in line and "flasma-ws convert" in line
    assert "pickle" not in line


def test_convert_does_not_send_the_user_to_convert(tmp_path):
    (tmp_path / "x.npy").write_text("hello, not numpy\n")
    line = only_line(cli("convert", str(tmp_path / "x.npy"), str(tmp_path / "out.npy")))
    assert "is not a readable .npy file" in line and "flasma-ws convert" not in line
    assert "pickle" not in line


def test_plain_http_to_ws_is_426_and_a_bad_body_is_called_a_body(tmp_path):
    process, base = start(tmp_path / "serve.log", "--dim", "8", "--demo-size", "100")
    try:
        plain = httpx.get(f"{base}/ws")
        assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
        assert "WebSocket endpoint" in plain.json()["error"]["message"]
        bad = httpx.post(f"{base}/cos", content=b"{not json")
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("The body is not valid JSON")
    finally:
        stop(process)


def test_loadtest_npy_of_the_wrong_dim_does_not_mention_dim_flags(tmp_path):
    np.save(tmp_path / "other.npy", np.ones((100, 6), np.float32))
    process, base = start(tmp_path / "serve.log", "--dim", "8", "--demo-size", "100")
    try:
        url = base.replace("http", "ws") + "/ws"
        args = ["--count", "5", "--verify", "5", "--npy", str(tmp_path / "other.npy")]
        line = error_line(cli("loadtest", "--url", url, *args))
        assert "--dim" not in line
        assert "100 vectors of dim 6" in line and "pass the server's own file" in line
    finally:
        stop(process)


def test_a_bad_command_line_value_is_not_blamed_on_the_environment():
    line = only_line(cli("serve", "--port", "abc"), code=2)
    assert "'--port'" in line and "FLASMA_PORT" not in line
    line = only_line(cli("serve", env={"FLASMA_PORT": "abc"}), code=2)
    assert "FLASMA_PORT (environment variable)" in line


# -- 8. errors found while loading: once, and without waiting for TensorFlow ------------------
def test_nan_and_zero_rows_are_reported_once_and_promptly(tmp_path):
    nan = np.ones((100, 4), np.float32)
    nan[42, 1] = np.nan
    zero = np.ones((100, 4), np.float32)
    zero[3] = 0
    for name, matrix, expected in (
        ("nan.npy", nan, "(first in row 42)"),
        ("zero.npy", zero, "has 1 zero-norm row (first at row 3)"),  # 15: singular
    ):
        np.save(tmp_path / name, matrix)
        line = error_line(cli("serve", "--npy", str(tmp_path / name), "--port", "0"))
        assert expected in line


def test_a_device_that_cannot_be_is_refused_before_tensorflow():
    line = only_line(cli("serve", "--dim", "8", "--device", "tpu"))
    assert "--device must be auto, cpu or gpu:N" in line


def test_a_missing_gpu_is_reported_once():
    result = cli("serve", "--dim", "8", "--demo-size", "100", "--port", "0", "--device", "gpu:7")
    assert "TensorFlow sees no device 'gpu:7'" in error_line(result)


# -- 9. loadtest --help keeps its brackets ---------------------------------------------------
def test_loadtest_help_shows_the_plot_extra():
    result = cli("loadtest", "--help")
    assert result.returncode == 0
    assert "flasma-ws[plot]" in result.stdout


# -- 10. usage errors: one line, exit 2, as the README says -----------------------------------
@pytest.mark.parametrize("args", [["serve", "--bogus"], ["convert"], ["nope"]])
def test_usage_errors_are_one_line_and_exit_2(args):
    line = only_line(cli(*args), code=2)
    assert "--help" in line
    assert "exits 2" in README.read_text()


# -- 11. integer files ---------------------------------------------------------------------
def test_an_integer_file_is_served_exactly_with_one_note(tmp_path):
    rng = np.random.default_rng(11)
    matrix = rng.integers(-50, 50, (200, 8)).astype(np.int32)
    np.save(tmp_path / "ints.npy", matrix)
    log = tmp_path / "serve.log"
    process, base = start(log, "--npy", str(tmp_path / "ints.npy"))
    try:
        query = rng.standard_normal(8)
        result = httpx.post(f"{base}/cos", json={"embedding": query.tolist()}).json()["result"]
        assert_exact(matrix.astype(np.float64), query[None], *pairs_to_arrays(result), k=10)
        assert log.read_text().count("holds int32 values; serving them as float32") == 1
    finally:
        stop(process)
    assert "integer" in README.read_text()


def test_convert_notes_integer_input(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(1, 13, dtype=np.int64).reshape(4, 3))
    result = cli("convert", str(tmp_path / "ints.npy"), str(tmp_path / "out.npy"))
    assert result.returncode == 0, result.stderr
    assert "Note: int64 values are written as float32." in result.stdout


# -- 12. TensorFlow's C++ chatter ------------------------------------------------------------
def test_tensorflow_error_chatter_stays_out_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # as in a user's shell
    quiet, loud = tmp_path / "quiet.log", tmp_path / "loud.log"
    stop(start(quiet, "--dim", "8", "--demo-size", "100")[0])
    assert "cuInit" not in quiet.read_text() and "E0000" not in quiet.read_text()
    if "Could not find cuda drivers" not in quiet.read_text():
        return  # a machine with CUDA: no probe error to let through
    stop(start(loud, "--dim", "8", "--demo-size", "100", "--log-level", "debug")[0])
    assert "cuInit" in loud.read_text()  # --log-level debug lets TensorFlow's log through


# -- 13. server_info() with a wrong token ----------------------------------------------------
def test_server_info_raises_auth_error_in_one_line(tmp_path):
    process, base = start(
        tmp_path / "serve.log", "--dim", "8", "--demo-size", "100", "--token", "t"
    )
    try:
        url = base.replace("http", "ws") + "/ws"
        with pytest.raises(AuthError) as refused:
            server_info(url, token="wrong")
        assert "\n" not in str(refused.value) and "HTTP 401" in str(refused.value)
        assert "developer.mozilla.org" not in str(refused.value)
        assert server_info(url, token="t")["n"] == 100
    finally:
        stop(process)


# -- 14. --version -------------------------------------------------------------------------
def test_version_names_package_tensorflow_and_device():
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"flasma-ws {flasma_ws.__version__}, TensorFlow 2.")
    assert "/device:CPU:0" in line


# -- 15. plurals ---------------------------------------------------------------------------
def test_counts_of_one_are_singular(tmp_path):
    matrix = np.ones((4, 3))
    matrix[2] = 0
    np.save(tmp_path / "in.npy", matrix)
    out = tmp_path / "out.npy"
    result = cli("convert", str(tmp_path / "in.npy"), str(out), "--drop-zero")
    assert result.returncode == 0, result.stderr
    assert "1 zero-norm row." in result.stdout and "Dropped 1 zero-norm row:" in result.stdout
    assert "1 zero-norm rows" not in result.stdout


# -- 16. an idle server exits at once --------------------------------------------------------
def test_an_idle_server_exits_within_a_second_of_sigterm(tmp_path):
    process, base = start(tmp_path / "serve.log", "--dim", "8", "--demo-size", "100")
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    # The issue asks for under 1 s; 0.2-0.3 s here, against 1.1-2.5 s before the fix.
    assert time.monotonic() - began < 0.7


# -- 17. the README says where the demo listens ---------------------------------------------
def test_readme_says_the_default_host_and_how_to_stay_local():
    text = README.read_text()
    assert "0.0.0.0" in text and "--host 127.0.0.1" in text
    assert "CPU is enough" not in text
