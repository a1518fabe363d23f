"""The float64 numpy brute force every result is checked against."""

from __future__ import annotations

import numpy as np

NEAR_TIE = 1e-6
SCORE_TOLERANCE = 1e-5


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in float64: (rows, scores), score descending, lower row first on ties."""
    m = matrix.astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = np.atleast_2d(queries).astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ m.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def assert_exact(
    matrix: np.ndarray, queries: np.ndarray, rows: object, scores: object, k: int
) -> None:
    """Rows equal the reference except where reference scores are near-ties; scores close."""
    ref_rows, ref_scores = brute_force(matrix, queries, k)
    rows = np.asarray(rows).reshape(ref_rows.shape)
    scores = np.asarray(scores, dtype=np.float64).reshape(ref_scores.shape)
    np.testing.assert_allclose(scores, ref_scores, atol=SCORE_TOLERANCE)
    m = matrix.astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = np.atleast_2d(queries).astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for i in np.flatnonzero((rows != ref_rows).any(axis=1)):
        # A differing row is acceptable only if its true score ties the reference's within 1e-6.
        true = m[rows[i]] @ q[i]
        assert np.all(np.abs(true - ref_scores[i]) < NEAR_TIE), (i, rows[i], ref_rows[i])


def pairs_to_arrays(pairs: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """[[index, score], ...] from the JSON protocol into (rows, scores)."""
    arr = np.asarray(pairs, dtype=np.float64)
    return arr[:, 0].astype(np.int64), arr[:, 1]
