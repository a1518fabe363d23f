"""The float64 numpy brute force that answers are checked against: `loadtest --verify`,
`bench --recall` and the tests all use this one.

Exact means: the reference's top-k rows (score descending, the lower row first among equal
scores), except that rows may differ where reference scores are within NEAR_TIE of each other
(float32 and float64 may order near-ties differently); and scores within SCORE_TOLERANCE of
the reference's at the same rank (float32 scores against float64).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .text import counted

NEAR_TIE = 1e-6
SCORE_TOLERANCE = 1e-5


def unit_rows(array: np.ndarray) -> np.ndarray:
    """Each row of a 1-D or 2-D array divided by its norm, in float64 (always 2-D)."""
    rows = np.atleast_2d(array).astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def scores(unit_matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Float64 cosine scores (B, N) of the normalized queries against already-unit rows."""
    return unit_rows(queries) @ unit_matrix.astype(np.float64).T


def stable_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Row numbers by score descending, the lower row first among equal scores: (B, k)."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over any (not yet normalized) matrix: (rows, scores), each (B, k)."""
    ref = scores(unit_rows(matrix), queries)
    rows = stable_top_k(ref, k)
    return rows, np.take_along_axis(ref, rows, axis=1)


def chunked_top_k(
    chunks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`brute_force` over unit rows given as (first row, block) chunks, so that a matrix far
    larger than memory in float64 is scored a block at a time: (B, k) rows and scores."""
    q = unit_rows(queries)
    rows = np.empty((q.shape[0], 0), np.int64)
    best = np.empty((q.shape[0], 0))
    for start, block in chunks:
        block_rows = np.arange(start, start + block.shape[0])
        rows = np.concatenate([rows, np.broadcast_to(block_rows, (q.shape[0], block.shape[0]))], 1)
        best = np.concatenate([best, q @ block.astype(np.float64).T], axis=1)
        if best.shape[1] > k:
            keep = np.argpartition(-best, k - 1, axis=1)[:, :k]
            rows, best = np.take_along_axis(rows, keep, 1), np.take_along_axis(best, keep, 1)
    order = stable_top_k(best, k)
    return np.take_along_axis(rows, order, 1), np.take_along_axis(best, order, 1)


def check_answer(ref: np.ndarray, ids: np.ndarray, got: np.ndarray, k: int) -> tuple[float, str]:
    """(recall@k, "" or what is wrong) for one answer against one query's reference scores."""
    want = stable_top_k(ref, k)
    recall = len(set(ids.tolist()) & set(want.tolist())) / k
    return recall, _problem(ref, want, ids, got, k)


def _problem(ref: np.ndarray, want: np.ndarray, ids: np.ndarray, got: np.ndarray, k: int) -> str:
    if ids.shape != (k,):
        return f"{counted(ids.shape[0], 'result')}, expected {k}"
    if len(set(ids.tolist())) != k:
        return "a row came back twice"
    if ids.min() < 0 or ids.max() >= len(ref):
        return "a row number is out of range"
    differ = ids != want
    gap = np.abs(ref[ids] - ref[want])[differ]
    if gap.size and gap.max() >= NEAR_TIE:
        rank = int(np.flatnonzero(differ)[0])
        return (
            f"rank {rank}: got row {ids[rank]}, expected {want[rank]} "
            f"(scores differ by {gap.max():.2e})"
        )
    error = np.abs(got.astype(np.float64) - ref[want])
    if error.max() > SCORE_TOLERANCE:
        return f"a score is off by {error.max():.2e}"
    return ""
