"""`--verify`: the server's matrix rebuilt on this host, and sampled answers checked against
its float64 brute force (flasma_ws.reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..client import TopK
from ..errors import ConfigError
from ..reference import check_answer, unit_rows
from .report import Verification
from .run import Run

VERIFY_BLOCK = 256  # queries scored at once: bounded memory, 256 x N float64


class ServerMatrix:
    """The server's matrix in float64 on this host, to check answers exactly."""

    def __init__(self, targets: Any) -> None:
        from ..vectors import load_matrix

        self.matrix = load_matrix(targets).astype(np.float64)
        self.rows = targets.source.n  # row numbers in answers are those of the file
        self.keep: np.ndarray | None = targets.keep

    @classmethod
    def for_server(cls, info: dict[str, Any], npy: Path | None) -> ServerMatrix:
        """The demo set /info describes, or `npy` (legacy files need /info's dim)."""
        targets = _server_targets(info, npy)
        if info.get("writable") and targets.dim == info["dim"] and targets.n != info["n"]:
            raise ConfigError(
                f"The server holds {info['n']} live rows, but the reference has {targets.n}: "
                "--verify on a live collection needs its rows to be exactly the --npy file or "
                "demo set (rows written since, or left by an interrupted load test from key "
                "2^52 up, cannot be checked)."
            )
        if (targets.n, targets.dim) != (info["n"], info["dim"]):
            raise ConfigError(
                f"The reference has {targets.n} vectors of dim {targets.dim}, but the server "
                f"serves {info['n']} of dim {info['dim']}; pass the server's own file to --npy."
            )
        return cls(targets)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Float64 cosine scores (B, rows); rows the server skipped score -inf."""
        q = unit_rows(queries)
        kept = q @ self.matrix.T
        if self.keep is None:
            return kept
        full = np.full((len(q), self.rows), -np.inf)
        full[:, self.keep] = kept
        return full

    def check(self, run: Run, k: int) -> Verification:
        workload = run.workload
        count = min(run.config.verify, len(workload.queries))
        ids, scores = _gather_answers(run.captured, workload.verify_frames, workload.multi)
        k = min(k, len(self.matrix))
        problems: list[str] = []
        recalls: list[float] = []
        for start in range(0, count, VERIFY_BLOCK):
            ref = self.scores(workload.queries[start : min(start + VERIFY_BLOCK, count)])
            for row in range(start, start + len(ref)):
                recall, problem = check_answer(ref[row - start], ids[row], scores[row], k)
                recalls.append(recall)
                if problem:
                    problems.append(f"query {row}: {problem}")
        mean = float(np.mean(recalls)) if recalls else None
        return Verification(count, mean, not problems, len(problems), problems[:5])


def _server_targets(info: dict[str, Any], npy: Path | None) -> Any:
    from ..vectors import open_npy, open_targets, prepare

    drop_zero = bool(info.get("drop_zero", False))
    if npy is not None:
        # /info's dim reads a legacy file; an (N, dim) file keeps its own, compared after.
        return prepare(open_npy(npy, int(info["dim"]), dim_for_legacy_only=True), drop_zero)
    demo = info.get("demo")
    if not demo:
        raise ConfigError(
            f"--verify needs --npy FILE: the server serves {info.get('source')}, not a demo set."
        )
    return open_targets(None, demo["dim"], demo["size"], demo["seed"], drop_zero)


def _gather_answers(
    captured: dict[int, TopK], frames: int, multi: int
) -> tuple[np.ndarray, np.ndarray]:
    if multi == 1:
        return (
            np.stack([captured[f].ids for f in range(frames)]),
            np.stack([captured[f].scores for f in range(frames)]),
        )
    return (
        np.concatenate([captured[f].ids for f in range(frames)]),
        np.concatenate([captured[f].scores for f in range(frames)]),
    )
