"""`flasma-ws bench` smoke test: seconds long, tiny data, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flasma_ws.bench import (
    FLASMA_RTX3090,
    BenchConfig,
    Result,
    engine_cell,
    parse_int_list,
    time_calls,
)
from flasma_ws.cli import app
from flasma_ws.errors import ConfigError


def test_bench_compare_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--n", "500", "--dims", "100", "--batches", "1,4", "--k", "5"]
    args += [
        "--device",
        "cpu",
        "--seconds",
        "0.02",
        "--compare",
        "--recall",
        "--json-out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "d=100" in result.output and "3090:" not in result.output  # Flasma's N was 100k
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and "CPU" in report["device"]
    cells = report["results"]
    assert [(c["batch"], c["dim"], c["n"], c["k"]) for c in cells] == [
        (1, 100, 500, 5),
        (4, 100, 500, 5),
    ]
    for cell in cells:
        assert cell["qps"] > 0 and cell["matmul_qps"] > 0 and cell["faiss_qps"] > 0
        assert cell["blas_qps"] > 0 and cell["scann_qps"] > 0
        assert cell["engine_over_matmul"] == pytest.approx(cell["qps"] / cell["matmul_qps"])
        assert cell["engine_over_faiss"] == pytest.approx(cell["qps"] / cell["faiss_qps"])
        assert cell["engine_over_blas"] == pytest.approx(cell["qps"] / cell["blas_qps"])
        assert cell["engine_over_scann"] == pytest.approx(cell["qps"] / cell["scann_qps"])
        assert cell["dtype"] == "float32" and cell["device"] == report["device"]
        assert cell["recall"] == 1.0 and cell["max_score_error"] < 1e-5
    assert "BLAS GEMM-only" in result.output and "ScaNN brute force" in result.output
    machine = report["machine"]
    assert machine["blas"] and machine["blas"][0]["threads"] >= 1  # numpy's BLAS, named
    assert machine["onednn"]["enabled"] in (True, False) and machine["cpu"]["model"]
    assert result.output.lstrip().startswith("CPU: ") and "TensorFlow oneDNN: " in result.output


def test_bench_markdown_without_compare() -> None:
    args = ["bench", "--n", "300", "--dims", "8,16", "--batches", "2", "--dtype", "bfloat16"]
    result = CliRunner().invoke(app, [*args, "--seconds", "0.01", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| batch | d=8 | d=16 |" in result.output
    assert "FAISS" not in result.output


def test_bench_bad_option_is_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "--n", "10", "--k", "11"])
    assert result.exit_code == 1
    assert "--k must be between 1 and --n" in result.output


def test_flasma_figures_sit_beside_ours() -> None:
    result = Result(batch=1, dim=100, n=100_000, k=10, device="cpu", dtype="float32", qps=512.3)
    result.flasma_rtx3090_qps = FLASMA_RTX3090[(1, 100)]
    assert engine_cell(result) == "512 (3090: 393)"
    assert "flasma_rtx3090_qps" in result.to_json() and "matmul_qps" not in result.to_json()


def test_parse_int_list() -> None:
    assert parse_int_list("1,2,4,...,128", "--batches") == (1, 2, 4, 8, 16, 32, 64, 128)
    assert parse_int_list("1,...,8", "--batches") == (1, 2, 4, 8)
    assert parse_int_list(" 100, 768 ", "--dims") == (100, 768)
    with pytest.raises(ConfigError, match="--dims"):
        parse_int_list("100,x", "--dims")
    with pytest.raises(ConfigError):
        BenchConfig(batches=(0,))


def test_time_calls_takes_turns() -> None:
    order: list[str] = []
    medians = time_calls(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, seconds=0.0, rounds=2
    )
    assert set(medians) == {"a", "b"} and min(medians.values()) >= 0
    assert order[:2] == ["a", "b"]  # the untimed calls
    assert order.count("a") == order.count("b") == 4  # one untimed, at least three timed


def test_compare_without_faiss_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import flasma_ws.bench

    monkeypatch.setattr(flasma_ws.bench, "load_faiss", lambda: None)
    args = ["bench", "--n", "200", "--dims", "4", "--batches", "1", "--seconds", "0.01"]
    result = CliRunner().invoke(app, [*args, "--compare"])
    assert result.exit_code == 0, result.output
    assert "flasma-ws[bench]" in result.output and "matmul-only" in result.output
    assert "FAISS IndexFlatIP q/s" not in result.output


def test_blas_ceiling_scores_the_same_memory() -> None:
    """The BLAS column reads the engine's own host buffers and gives the float64 scores."""
    from flasma_ws.bench import blas_ceiling
    from flasma_ws.engine import Engine, EngineConfig, unit_queries
    from flasma_ws.vectors import load_matrix, open_targets

    targets = open_targets(None, 12, demo_size=700, demo_seed=2)
    engine = Engine(targets, EngineConfig(device="cpu", max_batch=8, block_size=64))
    ceiling = blas_ceiling(engine, 8)
    shared = {id(buffer) for _, buffer in engine.host_slabs()}
    assert {id(buffer) for _, buffer in ceiling.slabs} == shared  # no copy of the matrix
    queries = unit_queries(np.random.default_rng(1).standard_normal((5, 12), dtype=np.float32))
    want = queries.astype(np.float64) @ load_matrix(targets).astype(np.float64).T
    np.testing.assert_allclose(ceiling.scores(queries), want, rtol=0, atol=1e-6)
