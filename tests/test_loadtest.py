"""`flasma-ws loadtest` against a real server on loopback (BackgroundServer), through the CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from flasma_ws.cli import app
from flasma_ws.client import TopK
from flasma_ws.errors import ConfigError
from flasma_ws.loadtest import check_answer, http_base, parse_sweep
from flasma_ws.loadtest.live_verify import LiveCheck
from flasma_ws.loadtest.run import TimedAnswer
from flasma_ws.loadtest.verify import ServerMatrix
from flasma_ws.loadtest.writes import KEY_BASE, WriteLog
from flasma_ws.reference import unit_rows
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings
from flasma_ws.vectors import open_targets

SETTINGS = Settings(dim=16, demo_size=2000, demo_seed=7, port=0)
LATENCY_KEYS = {"p50", "p90", "p95", "p99", "max"}
REPORT_KEYS = {"throughput_qps", "latency_ms", "errors", "sent", "answered", "mean_batch_size"}


def loadtest(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["loadtest", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def loadtest_report(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """A successful run's --json-out report, and what it printed."""
    out = tmp_path / "report.json"
    code, output = loadtest(*args, "--json-out", str(out))
    assert code == 0, output
    return json.loads(out.read_text()), output


def assert_report(point: dict, sent: int | None = None) -> None:
    assert point.keys() >= REPORT_KEYS
    assert point["latency_ms"].keys() >= LATENCY_KEYS
    assert point["throughput_qps"] > 0
    assert point["errors"] == {}
    assert point["answered"] == point["sent"]
    if sent is not None:
        assert point["sent"] == sent
    assert point["mean_batch_size"] >= 1


def test_count_with_verify_writes_the_report(server: BackgroundServer, tmp_path: Path) -> None:
    report, output = loadtest_report(
        tmp_path, "--url", server.url, "--count", "200", "--verify", "50", "--inflight", "4"
    )
    assert_report(report, sent=200)
    assert report["recall"] == 1.0 and report["exact"] and report["verified"] == 50
    assert report["mode"] == "ws-json" and report["loop"] == "closed"
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert "q/s" in output and "1.0000" in output


def test_binary_multi_open_loop_with_warmup(server: BackgroundServer, tmp_path: Path) -> None:
    report, _ = loadtest_report(
        tmp_path,
        "--url",
        server.url,
        "--binary",
        "--multi",
        "4",
        "--rate",
        "400",
        "--arrival",
        "poisson",
        "--connections",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--k",
        "3",
        "--verify",
        "10",
    )
    assert_report(report)
    assert report["mode"] == "ws-binary" and report["loop"] == "open" and report["multi"] == 4
    assert report["sent"] % 4 == 0 and report["exact"]


def test_http_mode(server: BackgroundServer, tmp_path: Path) -> None:
    report, _ = loadtest_report(
        tmp_path,
        "--url",
        server.url,
        "--http",
        "--connections",
        "2",
        "--inflight",
        "2",
        "--count",
        "60",
        "--verify",
        "10",
    )
    assert_report(report, sent=60)
    assert report["mode"] == "http" and report["exact"]


def test_sweep_writes_one_point_per_value(server: BackgroundServer, tmp_path: Path) -> None:
    report, _ = loadtest_report(
        tmp_path,
        "--url",
        server.url,
        "--sweep",
        "connections=1,3",
        "--count",
        "40",
        "--binary",
    )
    assert report["sweep"] == "connections" and report["values"] == [1, 3]
    assert [p["connections"] for p in report["points"]] == [1, 3]
    for point in report["points"]:
        assert_report(point, sent=40)


def test_queries_file(server: BackgroundServer, tmp_path: Path) -> None:
    path = tmp_path / "q.npy"
    np.save(path, np.random.default_rng(0).standard_normal((5, SETTINGS.dim)))
    code, output = loadtest(
        "--url", server.url, "--queries", str(path), "--count", "12", "--verify", "5"
    )
    assert code == 0, output
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((5, SETTINGS.dim + 1)))
    code, output = loadtest("--url", server.url, "--queries", str(wrong), "--count", "1")
    assert code == 1 and "(Q, 16)" in output


def test_verify_against_other_data_exits_1(server: BackgroundServer, tmp_path: Path) -> None:
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(99).standard_normal((SETTINGS.demo_size, SETTINGS.dim)))
    code, output = loadtest(
        "--url", server.url, "--count", "10", "--verify", "5", "--npy", str(other)
    )
    assert code == 1
    assert "NOT EXACT" in output and "not exact" in output


def test_unreachable_url_exits_1_with_one_line() -> None:
    code, output = loadtest("--url", "ws://127.0.0.1:1/ws", "--count", "10")
    assert code == 1
    assert output.strip().count("\n") == 0 and "Cannot reach http://127.0.0.1:1/info" in output
    assert "Traceback" not in output


def test_every_request_failing_exits_1(server: BackgroundServer) -> None:
    code, output = loadtest("--url", server.url, "--count", "5", "--k", "1000")
    assert code == 1
    assert "bad_k 5" in output and "No query was answered" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--binary", "--http"], "WebSocket only"),
        (["--sweep", "threads=1,2"], "--sweep must look like"),
        (["--sweep", "connections=1,x"], "must be numbers"),
        (["--connections", "0"], "--connections must be at least 1"),
    ],
)
def test_bad_flags_exit_1_with_one_line(args: list[str], message: str) -> None:
    code, output = loadtest("--url", "ws://127.0.0.1:1/ws", *args)
    assert code == 1 and message in output and output.strip().count("\n") == 0


def test_plot_without_matplotlib_says_how_to_install(
    server: BackgroundServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, output = loadtest("--url", server.url, "--count", "5", "--plot", str(tmp_path / "p.png"))
    assert code == 1 and "flasma-ws[plot]" in output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot(server: BackgroundServer, tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    code, output = loadtest(
        "--url", server.url, "--sweep", "inflight=1,2", "--count", "20", "--plot", str(png)
    )
    assert code == 0, output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_check_answer_allows_near_ties_only() -> None:
    ref = np.array([0.9, 0.5, 0.5 - 1e-8, 0.1, -0.2])
    exact = np.array([0.9, 0.5], np.float32)
    assert check_answer(ref, np.array([0, 1]), exact, 2) == (1.0, "")
    assert check_answer(ref, np.array([0, 2]), exact, 2)[1] == ""  # a near-tie swapped in
    recall, problem = check_answer(ref, np.array([0, 3]), exact, 2)
    assert recall == 0.5 and "rank 1" in problem
    assert "twice" in check_answer(ref, np.array([0, 0]), exact, 2)[1]
    assert "off by" in check_answer(ref, np.array([0, 1]), exact + 1e-3, 2)[1]


def test_url_and_sweep_parsing() -> None:
    assert http_base("ws://h:8090/ws") == "http://h:8090"
    assert http_base("wss://h/ws") == "https://h"
    assert parse_sweep("inflight=1,8") == ("inflight", [1, 8])
    assert parse_sweep("rate=100,2.5e3") == ("rate", [100.0, 2500.0])
    with pytest.raises(ConfigError):
        http_base("http://h:8090")


def test_token(tmp_path: Path) -> None:
    with BackgroundServer(SETTINGS.replace(token="s3cret")) as guarded:
        code, output = loadtest("--url", guarded.url, "--count", "5")
        assert code == 1 and "pass the server's --token" in output
        for mode in ([], ["--http"]):
            code, output = loadtest(
                "--url", guarded.url, "--count", "5", "--token", "s3cret", "--verify", "3", *mode
            )
            assert code == 0, output


# -- --write-ratio: a live collection ----------------------------------------------------------
LIVE = Settings(dim=16, demo_size=2000, demo_seed=7, port=0, compact_min_rows=1_000_000)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """A writable server: the demo set imported into a fresh --data-dir."""
    data_dir = tmp_path_factory.mktemp("live") / "data"
    with BackgroundServer(LIVE.replace(data_dir=data_dir)) as running:
        yield running


def live_rows(server: BackgroundServer) -> int:
    return int(httpx.get(f"{http_base(server.url)}/info", trust_env=False).json()["n"])


@pytest.mark.parametrize("mode", [[], ["--binary", "--multi", "2"], ["--http"]])
def test_write_ratio_verify_stays_exact(
    live: BackgroundServer, tmp_path: Path, mode: list[str]
) -> None:
    report, output = loadtest_report(
        tmp_path,
        "--url",
        live.url,
        "--write-ratio",
        "0.2",
        "--connections",
        "2",
        "--inflight",
        "4",
        "--count",
        "600",
        "--verify",
        "200",
        *mode,
    )
    writes = report["writes"]
    assert writes["sent"] > 0 and writes["acknowledged"] == writes["sent"]
    assert writes["errors"] == {} and writes["keys_written"] < writes["sent"]  # re-upserts too
    assert 0 < writes["latency_ms"]["p50"] <= writes["latency_ms"]["p99"]
    assert writes["latency_ms"]["p99"] <= writes["latency_ms"]["max"]
    assert report["exact"] and report["verified"] == 200 and report["recall"] == 1.0
    assert report["answered"] == report["sent"] > 0 and report["errors"] == {}
    assert "writes/s" in output and "ack p99" in output
    assert live_rows(live) == LIVE.demo_size  # the run's keys were deleted after it


def test_write_ratio_open_loop(live: BackgroundServer, tmp_path: Path) -> None:
    report, _ = loadtest_report(
        tmp_path,
        "--url",
        live.url,
        "--write-ratio",
        "0.5",
        "--rate",
        "300",
        "--duration",
        "0.5",
        "--verify",
        "50",
    )
    assert report["loop"] == "open" and report["exact"]
    assert report["writes"]["acknowledged"] == report["writes"]["sent"] > 0


def test_write_ratio_against_a_read_only_server_exits_1(server: BackgroundServer) -> None:
    code, output = loadtest("--url", server.url, "--write-ratio", "0.1", "--count", "5")
    assert code == 1 and output.strip().count("\n") == 0
    assert "read-only" in output and "--data-dir" in output


def test_verify_under_writes_catches_a_wrong_reference(
    live: BackgroundServer, tmp_path: Path
) -> None:
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(99).standard_normal((LIVE.demo_size, LIVE.dim)))
    code, output = loadtest(
        "--url",
        live.url,
        "--write-ratio",
        "0.3",
        "--count",
        "50",
        "--verify",
        "20",
        "--npy",
        str(other),
    )
    assert code == 1 and "not exact" in output


def _timed(check: LiveCheck, sent: float, answered: float, ids: list[int], scores: list[float]):
    """One answer to query 0 of `query`, sent at `sent` and answered by `answered`."""
    result = TopK(np.array(ids, np.int64), np.array(scores, np.float32))
    answer = TimedAnswer(0, sent, answered, result)
    return check.check([answer], QUERY, 1)


def _reference(v: np.ndarray) -> float:
    return float(unit_rows(QUERY)[0] @ unit_rows(v)[0])


DIM, ROWS = 8, 50
QUERY = np.random.default_rng(5).standard_normal((1, DIM)).astype(np.float32)


def _live_check() -> tuple[LiveCheck, np.ndarray, np.ndarray, np.ndarray]:
    """Our key written twice: v1 sent at 1, acknowledged at 2; v2 sent at 3, never acknowledged
    (in flight, or lost). v2 is the query itself, v1 its opposite."""
    matrix = ServerMatrix(open_targets(None, DIM, ROWS, 1))
    v1, v2 = -QUERY[0], QUERY[0].copy()
    log = WriteLog([0, 0], [v1, v2], [1.0, 3.0], [2.0, float("inf")])
    base = matrix.scores(QUERY)[0]
    return LiveCheck(matrix, log, 3), base, v1, v2


def test_live_check_accepts_every_possible_state_and_nothing_else() -> None:
    check, base, v1, v2 = _live_check()
    top = np.argsort(-base, kind="stable")
    own = KEY_BASE
    # While v2 is in flight (3.5 .. 4), the key holds v1 or v2: both answers are right.
    with_v2 = [own, int(top[0]), int(top[1])], [_reference(v2), base[top[0]], base[top[1]]]
    assert _timed(check, 3.5, 4.0, *with_v2).exact
    without = [int(r) for r in top[:3]], [float(base[r]) for r in top[:3]]
    assert _timed(check, 3.5, 4.0, *without).exact  # v1 scores -1: not in the top 3
    # Between the acknowledgement of v1 and the send of v2 it holds v1 only.
    verdict = _timed(check, 2.5, 2.8, *with_v2)
    assert not verdict.exact and "matches none" in verdict.examples[0]
    # Before v1 was sent, the key did not exist.
    verdict = _timed(check, 0.1, 0.5, *with_v2)
    assert not verdict.exact and "matches none" in verdict.examples[0]
    # A score no state explains, and a server row's wrong score.
    bad = [own, int(top[0]), int(top[1])], [0.123, base[top[0]], base[top[1]]]
    assert not _timed(check, 3.5, 4.0, *bad).exact
    off = (
        [int(r) for r in top[:3]],
        [float(base[r]) for r in top[:2]] + [float(base[top[2]]) - 1e-3],
    )
    assert not _timed(check, 3.5, 4.0, *off).exact


def test_live_check_misses_no_certain_row() -> None:
    check, base, _, _ = _live_check()
    top = np.argsort(-base, kind="stable")
    skipped = [int(r) for r in (top[0], top[1], top[3])], [float(base[r]) for r in top[[0, 1, 3]]]
    verdict = _timed(check, 3.5, 4.0, *skipped)
    assert not verdict.exact and "missing" in verdict.examples[0] and verdict.recall < 1
    twice = [int(top[0]), int(top[0]), int(top[1])], [float(base[r]) for r in top[[0, 0, 1]]]
    assert "twice" in _timed(check, 3.5, 4.0, *twice).examples[0]
    unordered = [int(r) for r in top[[1, 0, 2]]], [float(base[r]) for r in top[[1, 0, 2]]]
    assert "descending" in _timed(check, 3.5, 4.0, *unordered).examples[0]
    stranger = [KEY_BASE + 7, int(top[0]), int(top[1])], [0.9, base[top[0]], base[top[1]]]
    assert "neither" in _timed(check, 3.5, 4.0, *stranger).examples[0]
