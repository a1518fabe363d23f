"""ScaNN's exact brute force, timed in a process of its own: `python -m flasma_ws.bench_scann`.

Why a subprocess: `import scann` fails beside TensorFlow 2.21 (its package init loads optional
TensorFlow ops built against another TensorFlow), while its pybind searcher needs no
TensorFlow at all. So TensorFlow is blocked before the import, which only a fresh process can
do once the bench has loaded it.

Reads one JSON request on stdin: {"n", "dim", "seed", "k", "seconds", "batches", "queries"
(path of a float32 .npy of normalized queries)}; writes {"qps": {batch: q/s}, "version"} or
{"error": message} on stdout. The matrix is the demo set of that seed, as the bench's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np


def load_scann() -> Any:
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # see the module docstring
    from scann.scann_ops.py import scann_ops_pybind  # type: ignore[import-not-found]

    return scann_ops_pybind


def searcher_calls(searcher: Any, queries: np.ndarray, k: int) -> dict[str, Callable[[], Any]]:
    """ScaNN's ways to answer a batch; the bench keeps the fastest for each batch size."""
    calls: dict[str, Callable[[], Any]] = {
        "batched": lambda: searcher.search_batched(queries, final_num_neighbors=k),
    }
    if len(queries) == 1:
        calls["single"] = lambda: searcher.search(queries[0], final_num_neighbors=k)
    else:  # its thread pool, half the batch per thread on two cores
        half = max(len(queries) // 2, 1)
        calls["parallel"] = lambda: searcher.search_batched_parallel(
            queries, final_num_neighbors=k, batch_size=half
        )
    return calls


def run(request: dict[str, Any]) -> dict[str, Any]:
    from .timing import time_calls
    from .vectors import load_matrix, open_targets

    pybind = load_scann()
    targets = open_targets(None, request["dim"], demo_size=request["n"], demo_seed=request["seed"])
    k = request["k"]
    searcher = pybind.builder(load_matrix(targets), k, "dot_product").score_brute_force().build()
    queries = np.load(request["queries"])
    qps = {}
    for batch in request["batches"]:
        times = time_calls(searcher_calls(searcher, queries[:batch], k), request["seconds"])
        qps[batch] = batch / min(times.values())
    return {"qps": qps, "version": _version()}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scann")
    except PackageNotFoundError:
        return None


def main() -> None:
    try:
        answer = run(json.load(sys.stdin))
    except ImportError as exc:
        answer = {"error": f"ScaNN is not installed ({exc}): pip install 'flasma-ws[bench]'"}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
