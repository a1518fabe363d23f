"""Test assertions on the one float64 brute force (flasma_ws.reference) every result is
checked against."""

from __future__ import annotations

import numpy as np

from flasma_ws import reference as oracle
from flasma_ws.reference import NEAR_TIE, SCORE_TOLERANCE, brute_force, stable_top_k

__all__ = [
    "NEAR_TIE",
    "SCORE_TOLERANCE",
    "assert_exact",
    "assert_exact_scores",
    "brute_force",
    "pairs_to_arrays",
    "reference_scores",
    "stable_top_k",
]


def reference_scores(unit_matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Float64 cosine scores (B, N) of normalized queries against already-unit rows."""
    return oracle.scores(unit_matrix, queries)


def assert_exact(
    matrix: np.ndarray, queries: np.ndarray, rows: object, scores: object, k: int
) -> None:
    """Rows equal the reference except where reference scores are near-ties; scores close."""
    assert_exact_scores(oracle.scores(oracle.unit_rows(matrix), queries), rows, scores, k)


def assert_exact_scores(ref: np.ndarray, rows: object, scores: object, k: int) -> None:
    """As assert_exact, against given (B, N) reference scores (-inf for rows not served)."""
    k = min(k, ref.shape[1])
    rows = np.asarray(rows).reshape(len(ref), -1)
    scores = np.asarray(scores).reshape(len(ref), -1)
    for b in range(len(ref)):
        _, problem = oracle.check_answer(ref[b], rows[b], scores[b], k)
        assert not problem, f"query {b}: {problem}"


def pairs_to_arrays(pairs: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """[[index, score], ...] from the JSON protocol into (rows, scores)."""
    arr = np.asarray(pairs, dtype=np.float64)
    return arr[:, 0].astype(np.int64), arr[:, 1]
