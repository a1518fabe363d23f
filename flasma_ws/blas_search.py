"""Small CPU batches through numpy's BLAS, over the engine's own host memory.

Why: a batch of one query is a matrix-vector product that reads the whole matrix once, so
it is bound by memory bandwidth. BLAS's GEMV streams at that bound; TensorFlow's MatMul at
one row does not, and its top-k graph adds ~1 ms of per-op cost at small batches. Whole
searches at N = 100k on a 2-core AMD EPYC Zen 5 (docs/benchmarks.md), TensorFlow against this
path: d = 100, 2.10 ms against 0.94; d = 768, 10.8 against 8.2. From two rows up TensorFlow
wins (d = 100: 2.44 against 3.45 ms; d = 768: 12.0 against 22.2), since BLAS's GEMM packs the
matrix for small row counts and the numpy top-k costs per row. So only batches of
`MAX_ROWS` rows come here.

The matrix is not copied: the engine's CPU slabs are numpy buffers that TensorFlow reads
through DLPack, and this class reads the same buffers.

Exact top-k, and the same answer as the TensorFlow path
-------------------------------------------------------
The selection is the engine's two-stage top-k (its module docstring proves it exact, ties
included): stage 1 ranks blocks by (maximum descending, block ascending) and keeps the first
kb = min(k, nb); stage 2 ranks the kept blocks' columns, in ascending column order, then the
tail, by (score descending, position ascending). Both rankings here are a *stable* argsort of
the negated scores, which orders equal values by position, exactly the tie rule of
`tf.math.top_k` that the proof relies on. Given equal scores the two paths therefore return
the same rows in the same order. Scores themselves come from a different kernel and may differ
in the last bits (|difference| <= 2 d 2^-24 for unit vectors, the float32 dot-product bound
applied to each path), as they do between TensorFlow's own kernels at different batch sizes.
"""

from __future__ import annotations

import numpy as np

MAX_ROWS = 1  # batches this small go through BLAS (see the module docstring)


class BlasSearch:
    """Exact top-k for small batches over (dim, width) float32 host buffers of the columns."""

    def __init__(
        self,
        slabs: list[tuple[int, np.ndarray]],
        n: int,
        block: int,
        n_main: int,
        max_rows: int = MAX_ROWS,
        biases: list[np.ndarray] | None = None,
    ) -> None:
        """`slabs`: (first column, (dim, width) buffer) covering columns 0..n in order, the
        blocked columns 0..n_main first (widths multiples of `block`), then the tail.
        `biases`: per slab, (width,) float32 added to its scores (a deletion mask: 0 or -inf),
        the same arrays the TensorFlow graph reads."""
        pairs = zip(slabs, biases) if biases is not None else ((s, None) for s in slabs)
        self.slabs = [(first, buffer) for (first, buffer), _ in pairs if buffer.shape[1]]
        self.biases = (
            [bias for (_, buffer), bias in zip(slabs, biases) if buffer.shape[1]]
            if biases is not None
            else None
        )
        self.n, self.block, self.n_main = n, block, n_main
        self.n_blocks = n_main // block
        self._scores = np.empty((max_rows, n), np.float32)  # reused: no page faults per call

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """(B, N) float32 scores of normalized float32 queries, B <= max_rows. The bench's
        BLAS ceiling is this call alone."""
        out = self._scores[: queries.shape[0]]
        for i, (first, buffer) in enumerate(self.slabs):
            part = out[:, first : first + buffer.shape[1]]
            np.matmul(queries, buffer, out=part)
            if self.biases is not None:
                part += self.biases[i]
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) int64 columns and float32 scores, best first; ties to the lower column."""
        scores = self.scores(queries)
        columns = self._candidates(scores, k)
        values = np.take_along_axis(scores, columns, axis=1)
        best = np.argsort(-values, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(columns, best, 1), np.take_along_axis(values, best, 1)

    def _candidates(self, scores: np.ndarray, k: int) -> np.ndarray:
        """(B, C) candidate columns in ascending order: the picked blocks' columns, then the
        tail."""
        batch = scores.shape[0]
        tail = np.broadcast_to(np.arange(self.n_main, self.n), (batch, self.n - self.n_main))
        if self.n_blocks == 0:
            return np.ascontiguousarray(tail)
        maxima = scores[:, : self.n_main].reshape(batch, self.n_blocks, self.block).max(axis=2)
        kb = min(k, self.n_blocks)
        picked = np.sort(np.argsort(-maxima, axis=1, kind="stable")[:, :kb], axis=1)
        blocked = (picked[:, :, None] * self.block + np.arange(self.block)).reshape(batch, -1)
        return np.concatenate([blocked, tail], axis=1)
