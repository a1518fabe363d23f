"""Certified narrow precision: exact top-k at bfloat16 / float16 / TF32 speed.

The engine scores every row in the narrow type, keeps each query's *certified candidates*,
rescores those in float32 against a float32 copy of the rows, and returns the float32 top k
of that set: the answer of a float32 search (up to the last-bit differences every two float32
kernels have). A query whose candidates exceed the cap is recomputed in float32 in full. No
answer is ever left uncertified.

Notation
--------
q, x: a query and a row as float32 unit vectors (the host's `unit_queries`, and the row of
the float32 copy, `Targets.chunks`), dimension d. s = q.x in exact real arithmetic.
q^, x^: the narrow vectors the matmul reads (q^ rounded on the host with ml_dtypes, x^ read
back from the engine's own narrow matrix; for TF32, rounded inside the tensor cores, see
(5)), u the narrow type's unit roundoff (bfloat16 2^-8, float16 2^-11, TF32 2^-11).
s^: the narrow score the graph sees (the matmul's narrow output, widened to float32
exactly). s': a float32 score of q.x computed in any order, as the
rescore (or any float32 search) computes it; gamma = d 2^-23 / (1 - d 2^-23).

What TensorFlow's kernels do (checked against the source and by measurement)
-----------------------------------------------------------------------------
MatMul of two bfloat16 or float16 tensors returns that type (no float32 output exists:
BatchMatMulV3 with Tout=float has no CPU kernel). Accumulation is float32 everywhere it runs:
- CPU, oneDNN on (the default): oneDNN's matmul accumulates bf16/f16 products in f32
  (AVX512_BF16 `vdpbf16ps`: products exact in f32, sums rounded to nearest, denormals
  flushed), then rounds the result to the narrow type to nearest.
- CPU, oneDNN off (Eigen): `BaseBatchMatMulOp` (core/kernels/matmul_op_impl.h) widens both
  inputs to float, runs the float32 matmul, and narrows the output with
  `FastConvertFromFloat`: for bfloat16 that is `FloatToBFloat16`, which *truncates* (it
  keeps the high 16 bits; measured: 1 + 2^-8 + 2^-10 comes out as 1, against 1.0078125
  with oneDNN).
- GPU: cuBLAS with a float32 compute type for bf16, and for f16 as long as
  TF_FP16_MATMUL_USE_FP32_COMPUTE is not set false (`check_device_setting` refuses that).
The weakest output step is truncation: |s^ - a| <= 2u|s^| + alpha, where a is the float32
accumulator and alpha covers the subnormal range (float16: 2^-24, its subnormal spacing;
bfloat16: 2^-126, a flushed denormal). A start-up probe (`probe_accumulator`) checks on the
serving device that the accumulator is not narrow (a narrow one misses by ~0.5 there).

The bound
---------
(1) |s^ - s'| <= E + 2u|s^|, with, per query,
        E = |q^| R + |q^ - q| X + gamma |q^| X^ + gamma |q| X + d 2^-120 + alpha,
    R = max_j |x^_j - x_j|, X = max_j |x_j|, X^ = max_j |x^_j| (measured at load, float64).
Proof: q^.x^ - q.x = q^.(x^ - x) + (q^ - q).x exactly, so by Cauchy-Schwarz the exact dot of
the narrow vectors is within |q^| R + |q^ - q| X of s. Products of two bfloat16 (8+8 bits)
or float16 (11+11 bits) values are exact in float32, and summing d of them in float32 in any
order errs by at most gamma sum|q^_i x^_i| <= gamma |q^| X^ (the standard bound, FMA or
not; gamma is taken with 2^-23 per addition, not 2^-24, because NVIDIA's tensor cores align
and add with truncation, Fasi et al. 2021, which at most doubles it); flushed denormals
add at most 2d 2^-126 <= d 2^-120. The output step adds
2u|s^| + alpha (above), and a float32 evaluation s' of q.x is within gamma |q| X of s.
This assumes nothing about TensorFlow's casts: R and |q^ - q| are measured from the
very values the matmul reads. E is computed in float64 and rounded up to float32.

(2) Let L be the k-th largest s^ of a query and lo(v) = v - E - 2u|v|,
hi(v) = v + E + 2u|v|; both increase with v (2u < 1). Keep row j iff hi(s^_j) >= lo(L).
Then the float32 top k of the kept rows, in the engine's order (score descending, the
lower row first), is the top k of all rows under s', for the s' the rescore computes.
Proof: the k rows a with s^_a >= L have s'_a >= lo(s^_a) >= lo(L). A dropped row j has
s'_j <= hi(s^_j) < lo(L) <= s'_a for those k rows, so k rows beat it strictly, whatever the
tie rule: j is in no top k. So the top k under s' lies among the kept rows, and a top k
taken over a superset of it, with the same order, is that top k.
hi(s^) >= lo(L) is s^ >= tau with tau = (lo(L) - E) / (1 + 2u) when lo(L) >= E, else
(lo(L) - E) / (1 - 2u) (hi is v(1 +- 2u) + E on either side of 0). The graph computes tau in
float32 and subtracts 2^-19, more than the few roundings of that arithmetic on |values| <= 2
can move it, so it keeps a superset. tau <= L (hi(L) >= L >= lo(L)), so the k best are
always kept.

(3) Collection: the graph takes the exact narrow top K' (the engine's two-stage top-k,
proven exact in its docstring), in descending order, so the kept rows are a prefix of that
list. If its last entry is still >= tau (and K' < N), rows beyond the list may be kept rows:
the query *overflows*. K' is first the width the last batch needed (1.5x its largest count;
2k + 16 for a new k), then an overflowing query is rerun at K' = min(cap, N), cap = 8k + 64,
and one that overflows that is recomputed in full float32 (exact as the float32 engine is).
Otherwise all kept rows are in the list. The kept columns are sorted ascending before the
rescore, so `top_k`'s lower-position-first rule is the lower-row-first rule.

(4) With a deletion mask: set masked rows' s^ to -inf before the top K' and their rescored
s' to -inf too; every statement above then ranges over live rows (a masked row is never
kept while at least k rows are live, and never returned).

(5) TF32 (`--tf32`, float32 storage, NVIDIA Ampere or newer). The matmul reads float32
rows and queries and the tensor cores round each component to TF32 (10 stored mantissa
bits) themselves: q^ and x^ are never visible, so R and |q^ - q| are bounded a priori
instead of measured: truncation (the weaker of truncation and round to nearest) errs by
less than 2^-10 relative per component, so |x^ - x| <= 2^-10 |x|, and a flushed subnormal
by 2^-126, so R <= 2^-10 X + sqrt(d) 2^-126, X^ <= (1 + 2^-10) X + sqrt(d) 2^-126, and the
same for q. Products of two 11-bit values are exact in float32, accumulation is float32
(checked by the probe) and the output *is* the float32 accumulator: the output term
2u|s^| + alpha of (1) is 0. (1)-(4) then hold unchanged. On a CPU TensorFlow has no TF32
(float32 matmuls stay float32), so the same bound holds with room to spare.

Measured (AMD EPYC Zen 5, N = 100k, k = 10; docs/benchmarks.md): bfloat16, d = 768 gives
E ~ 5.9e-3 (1.5u; rows within 1.9e-3 of their float32 values) and ~27 candidates per query on
Gaussian rows, ~100 on clustered near-duplicates; no query reached the cap 8k + 64.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from .blas_search import BlasSearch
from .errors import ConfigError
from .vectors import ColumnSource, chunk_rows_for

log = logging.getLogger(__name__)

SAFETY = 1 + 2**-30  # float64 norms of float32 data err by ~d 2^-53: round every term up
TAU_MARGIN = 2.0**-19
FALLBACK_ROWS = 16  # fallback queries scored at a time: (16, N) float32 of working memory


@dataclass(frozen=True)
class Narrow:
    name: str
    u: float  # unit roundoff
    alpha: float  # absolute output error in the subnormal range (weakest kernel)
    host: Any  # numpy dtype the host rounds queries to (ml_dtypes); float32 for TF32
    output_u: float  # unit roundoff of the output step: 0 where the output is float32
    # Relative error bound of the rounding the matmul does itself (TF32: (5)), or 0 where
    # the host and the stored matrix hold the narrow values and they are measured.
    inside: float = 0.0

    @property
    def handed(self) -> str:
        """The dtype of the values the matmul is handed (TF32 is handed float32)."""
        return "float32" if self.inside else self.name

    def rounded_inside(self, norm: Any, d: int) -> Any:
        """(5): a bound on |v^ - v| for a d-vector of norm `norm` that the matmul rounds
        itself (relative `inside` per component, plus flushed subnormals)."""
        return self.inside * norm + np.sqrt(d) * TINY


NARROW = {
    "bfloat16": Narrow("bfloat16", 2.0**-8, 2.0**-126, ml_dtypes.bfloat16, 2.0**-8),
    "float16": Narrow("float16", 2.0**-11, 2.0**-24, np.float16, 2.0**-11),
}
# TensorFloat-32 on NVIDIA tensor cores: float32 storage, inputs rounded inside, (5).
TF32 = Narrow("tfloat32", 2.0**-11, 0.0, np.float32, 0.0, inside=2.0**-10)
TINY = 2.0**-126  # a flushed subnormal input component


def scheme(dtype: str, tf32: bool) -> Narrow | None:
    """The narrow arithmetic a search with this storage dtype runs in, or None (float32)."""
    if dtype in NARROW:
        return NARROW[dtype]
    return TF32 if tf32 else None


def candidate_cap(k: int) -> int:
    """Most certified candidates a query may have before it is recomputed in float32."""
    return 8 * k + 64


def first_width(k: int) -> int:
    """The narrow top K' tried first for a new k (then it follows the counts seen)."""
    return 2 * k + 16


def gamma(d: int) -> float:
    """The float32 dot-product error factor for d terms, any summation order, additions
    rounded to nearest or truncated (tensor cores): (1)."""
    return d * 2.0**-23 / (1 - d * 2.0**-23)


@dataclass(frozen=True)
class RowBound:
    """The measured row terms of (1): R, X and X^ (see the module docstring)."""

    residual: float  # R = max |x^_j - x_j|
    norm: float  # X = max |x_j|
    narrow_norm: float  # X^ = max |x^_j|

    @classmethod
    def measure(cls, exact: np.ndarray, narrow: np.ndarray) -> RowBound:
        """From (rows, d) float32 rows and the narrow values stored for them."""
        wide = narrow.astype(np.float64)
        exact64 = exact.astype(np.float64)
        return cls(
            residual=_max_norm(wide - exact64),
            norm=_max_norm(exact64),
            narrow_norm=_max_norm(wide),
        )

    @classmethod
    def a_priori(cls, exact: np.ndarray, narrow: Narrow) -> RowBound:
        """(5): rows the matmul rounds itself, so R and X^ follow from X."""
        norm = _max_norm(exact.astype(np.float64))
        residual = float(narrow.rounded_inside(norm, exact.shape[1]))
        return cls(residual=residual, norm=norm, narrow_norm=norm + residual)

    def merge(self, other: RowBound) -> RowBound:
        return RowBound(
            max(self.residual, other.residual),
            max(self.norm, other.norm),
            max(self.narrow_norm, other.narrow_norm),
        )


def _max_norm(rows: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max(initial=0.0))) * SAFETY


def slack(narrow: Narrow, rows: RowBound, q: np.ndarray, qn: np.ndarray) -> np.ndarray:
    """E of (1) for each query, float64 rounded up to float32: (B,)."""
    d = q.shape[1]
    q64, qn64 = q.astype(np.float64), qn.astype(np.float64)
    norm_q = np.linalg.norm(q64, axis=1) * SAFETY
    if narrow.inside:  # (5): q^ is made inside the matmul, bounded a priori
        norm_dq = narrow.rounded_inside(norm_q, d)
        norm_qn = norm_q + norm_dq
    else:
        norm_qn = np.linalg.norm(qn64, axis=1) * SAFETY
        norm_dq = np.linalg.norm(qn64 - q64, axis=1) * SAFETY
    g = gamma(d)
    e = (
        norm_qn * rows.residual
        + norm_dq * rows.norm
        + g * norm_qn * rows.narrow_norm
        + g * norm_q * rows.norm
        + d * 2.0**-120
        + narrow.alpha
    ) * SAFETY
    return np.nextafter(e.astype(np.float32), np.float32(np.inf))


def worst_slack(narrow: Narrow, rows: RowBound, d: int) -> float:
    """E of (1) for the worst unit query (|q^ - q| <= u|q| + sqrt(d) alpha, round to nearest;
    TF32: (5))."""
    dq = narrow.rounded_inside(1.0, d) if narrow.inside else narrow.u + np.sqrt(d) * narrow.alpha
    g = gamma(d)
    return float(
        (1 + dq) * rows.residual
        + dq * rows.norm
        + g * (1 + dq) * rows.narrow_norm
        + g * rows.norm
        + d * 2.0**-120
        + narrow.alpha
    )


def check_device_setting(narrow: Narrow, device: str) -> None:
    """Refuse a GPU float16 matmul that TensorFlow was told to accumulate in float16."""
    flag = os.environ.get("TF_FP16_MATMUL_USE_FP32_COMPUTE", "1").strip().lower()
    if narrow.name == "float16" and "GPU" in device and flag in ("0", "false"):
        raise ConfigError(
            "TF_FP16_MATMUL_USE_FP32_COMPUTE=0 makes float16 matmuls accumulate in float16, "
            "which the certified bound does not cover; unset it, or add --approximate."
        )


def speed_note(
    dtype: str, device: str, cpu_flags: list[str], onednn: bool, tf32: bool = False
) -> str | None:
    """Why float32 is faster than this narrow dtype on this CPU, or None where it is not."""
    if "CPU" not in device:
        return None
    if tf32 and dtype == "float32":
        return (
            "--tf32 gains nothing on a CPU: TensorFloat-32 exists only on NVIDIA GPUs "
            "(Ampere and newer), and CPU float32 matmuls are full float32 already, so here "
            "it only adds the certified rescore; plain float32 is faster."
        )
    if dtype not in NARROW:
        return None
    if dtype == "float16":
        # oneDNN's float16 matmul is fast on AMX-FP16 tiles: 2.0x float32 at d = 768, batch
        # 128, on an Intel Xeon whose VM hid amx_fp16 from /proc/cpuinfo (CPUID had it) but
        # showed amx_bf16 and avx512_fp16; capped to AMX-BF16 or AVX512-FP16 it ran at float32's
        # speed, and on AMD Zen 4 (neither) 2-5x slower. So AMX with AVX512-FP16 counts too:
        # a Xeon that has them and lacks AMX-FP16 gets no note, and float16 there is as fast.
        if onednn and ("amx_fp16" in cpu_flags or {"amx_bf16", "avx512_fp16"} <= set(cpu_flags)):
            return None
        return (
            "float16 matmul is fast on a CPU only through oneDNN on AMX with AVX512-FP16 "
            "(Intel Xeon); here it runs no faster than float32, and 2-5x slower without "
            "AVX512-FP16, so --dtype float32 is faster; float16 only halves the memory."
        )
    if not onednn:
        return (
            "bfloat16 without oneDNN is slower than float32 here: TensorFlow's Eigen matmul "
            "widens the whole bfloat16 matrix to float32 on every call; use --dtype float32 "
            "or leave TF_ENABLE_ONEDNN_OPTS unset."
        )
    if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags):
        return (
            "this CPU has no bfloat16 arithmetic (no AVX512_BF16 or AMX): oneDNN widens "
            "every bfloat16 product to float32, so --dtype float32 is faster here; bfloat16 "
            "only halves the memory."
        )
    return None


@dataclass
class Stats:
    """Counts since start-up (read by /metrics and the bench)."""

    queries: int = 0
    fallbacks: int = 0  # recomputed in float32 in full: more candidates than the cap
    candidates: int = 0  # certified candidates summed over the queries that did not fall back
    widened: int = 0  # rerun at K' = cap: more candidates than the batch's first K'

    def snapshot(self) -> Stats:
        return Stats(self.queries, self.fallbacks, self.candidates, self.widened)


@dataclass
class CertifiedSearch:
    """Narrow scoring, certified candidates, float32 rescore; float32 in full on overflow.

    `top_k(narrow_queries, k, *inputs) -> (columns, values)` is the engine's exact narrow
    top-k graph (descending, float32 values) over `inputs()`, the engine's matrix (and masks)
    as `input_specs()` describe them; `rows32` the (N, d) float32 copy in host memory, shared
    with TensorFlow as `rows_tensor`. Matrix, masks and copy enter the traced graph as
    arguments, never as captures: a capture lives as long as the traced function, and that
    sits in reference cycles the frozen collector never frees (engine.py), so a retired base
    would stay in memory.
    """

    narrow: Narrow
    rows: RowBound
    rows32: np.ndarray
    top_k: Any
    inputs: Any  # () -> list of the engine's graph inputs
    input_specs: Any  # () -> their TensorSpecs
    device: str
    block: int
    biases: list[Any] = field(default_factory=list)  # a masked engine's, per piece: (4)
    stats: Stats = field(default_factory=Stats)
    widths: dict[int, int] = field(default_factory=dict)  # k -> the K' to try first

    def __post_init__(self) -> None:
        import tensorflow as tf

        self._tf = tf
        self.n, self.dim = self.rows32.shape
        # A view of the host array through DLPack: the float32 copy exists once.
        self.rows_tensor = tf.experimental.dlpack.from_dlpack(self.rows32.__dlpack__())
        self._fallback = self._full_float32()
        self._trace = tf.function(self._graph, jit_compile=False, autograph=False)
        self._fn: Any = None

    # -- the graph -------------------------------------------------------------------------
    def _graph(
        self, q32: Any, qn: Any, e: Any, k: Any, kp: Any, rows32: Any, *inputs: Any
    ) -> tuple[Any, Any, Any, Any]:
        tf = self._tf
        columns, values = self.top_k(qn, kp, *inputs)  # exact narrow top K', descending
        biases = inputs[len(inputs) - len(self.biases) :]  # Engine._graph_inputs puts them last
        tau = self._threshold(values[:, k - 1], e)
        keep = values >= tau[:, None]  # a prefix of each row
        count = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
        overflow = tf.logical_and(kp < self.n, values[:, kp - 1] >= tau)
        width = tf.reduce_max(count)
        kept = tf.where(keep[:, :width], columns[:, :width], self.n)
        kept = tf.sort(kept, axis=1)  # ascending rows: top_k's ties go to the lower row
        with tf.device("/device:CPU:0"):  # the float32 copy lives in host memory
            rows = tf.gather(rows32, tf.minimum(kept, self.n - 1))  # (B, m, d)
            scores = tf.linalg.matmul(q32[:, None, :], rows, transpose_b=True)[:, 0, :]
            if biases:  # (4): masked rows score -inf in float32 too
                bias = tf.concat(list(biases), axis=0)
                scores += tf.gather(bias, tf.minimum(kept, self.n - 1))
            scores = tf.where(kept < self.n, scores, float("-inf"))
            best, positions = tf.math.top_k(scores, k)
            return tf.gather(kept, positions, batch_dims=1), best, overflow, count

    def _threshold(self, kth: Any, e: Any) -> Any:
        """tau of (2): the least narrow score whose hi() reaches lo(L), less the margin."""
        tf = self._tf
        two_u = 2 * self.narrow.output_u
        low = kth - e - e
        if two_u:  # (5): none for TF32, and 0 * |-inf| (a masked k-th) would be NaN
            low -= two_u * tf.abs(kth)
        tau = tf.where(low >= 0, low / (1 + two_u), low / (1 - two_u))
        return tau - TAU_MARGIN

    # -- host side ---------------------------------------------------------------------------
    def search(self, q32: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) int64 rows and float32 scores for unit float32 queries (one piece).

        The narrow top K' costs more the wider it is (d = 768, batch 128: ~8 ms at
        K' = 144 against 48), so K' starts narrow and follows the candidate counts seen;
        queries that overflow it are rerun at the cap, and those that overflow the cap are
        recomputed in float32 in full."""
        cap = min(candidate_cap(k), self.n)
        width = min(self.widths.get(k, first_width(k)), cap)
        rows, scores, over, count = self._certified(q32, k, width)
        if over.size and width < cap:
            self.stats.widened += int(over.size)
            wide = self._certified(q32[over], k, cap)
            rows[over], scores[over], count[over] = wide[0], wide[1], wide[3]
            over = over[wide[2]]
        if over.size:
            rows[over], scores[over] = self.full_float32(q32[over], k)
        counted = np.delete(count, over)
        # 1.5x the largest count seen: the next batch rarely needs the rerun.
        seen = int(counted.max(initial=0))
        self.widths[k] = max(first_width(k), min(cap, seen + seen // 2))
        self.stats.queries += len(q32)
        self.stats.fallbacks += int(over.size)
        self.stats.candidates += int(counted.sum())
        return rows, scores

    def _certified(
        self, q32: np.ndarray, k: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One run of the graph: rows, scores, the overflowing queries' indices, counts."""
        tf = self._tf
        qn = q32.astype(self.narrow.host)
        e = slack(self.narrow, self.rows, q32, qn)
        if self._fn is None:
            spec = tf.TensorSpec((None, self.dim), tf.float32)
            narrow = tf.TensorSpec((None, self.dim), tf.as_dtype(self.narrow.handed))
            scalar = tf.TensorSpec((), tf.int32)
            rows32 = tf.TensorSpec(self.rows_tensor.shape, tf.float32)
            with tf.device(self.device):
                self._fn = self._trace.get_concrete_function(
                    spec,
                    narrow,
                    tf.TensorSpec((None,), tf.float32),
                    scalar,
                    scalar,
                    rows32,
                    *self.input_specs(),
                )
        columns, scores, overflow, count = self._fn(
            tf.constant(q32),
            tf.constant(qn),
            tf.constant(e),
            tf.constant(k, tf.int32),
            tf.constant(width, tf.int32),
            self.rows_tensor,
            *self.inputs(),
        )
        over = np.flatnonzero(overflow.numpy())
        return columns.numpy().astype(np.int64), scores.numpy(), over, count.numpy()

    def full_float32(self, q32: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact float32 answer over every row (numpy BLAS, the engine's two-stage top-k
        and tie rule: blas_search's proof), FALLBACK_ROWS queries at a time."""
        fallback = self._full_float32() if self.biases else self._fallback  # today's mask
        pieces = [
            fallback.search(q32[i : i + FALLBACK_ROWS], k)
            for i in range(0, len(q32), FALLBACK_ROWS)
        ]
        return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])

    def _full_float32(self) -> BlasSearch:
        biases = None
        if self.biases:
            wide = [b if isinstance(b, np.ndarray) else b.numpy() for b in self.biases]
            biases = [np.concatenate(wide).astype(np.float32)]
        n_main = self.n // self.block * self.block
        return BlasSearch(
            [(0, self.rows32.T)], self.n, self.block, n_main, FALLBACK_ROWS, biases=biases
        )

    def release(self) -> None:
        """Drop the float32 copy, the traced graph and every reference to the engine's
        matrix now (see the class docstring): a retired base must not wait for the
        collector. No search runs afterwards."""
        self._fn = self._trace = None
        self.top_k = self.inputs = self.input_specs = None
        self.rows32 = self.rows_tensor = self._fallback = None  # type: ignore[assignment]
        self.biases = []

    def describe(self) -> dict[str, object]:
        return {
            "mode": "certified",
            "unit_roundoff": self.narrow.u,
            "epsilon": worst_slack(self.narrow, self.rows, self.dim),
            "arithmetic": self.narrow.name,
            "epsilon_per_score": 2 * self.narrow.output_u,
            "bound": "|narrow - float32 score| <= epsilon + epsilon_per_score * |narrow score|",
            "row_residual": self.rows.residual,
            "candidate_cap": "8k + 64",
            "float32_copy_bytes": int(self.rows32.nbytes),
        }


def probe_accumulator(tf: Any, narrow: Narrow, device: str, dim: int) -> None:
    """Refuse certification where the narrow matmul does not accumulate in float32.

    q = x = (1/sqrt(m), ...): the exact dot is ~1 and every product ~1/m; a narrow
    accumulator stalls once 1/m is below half its spacing (bfloat16 near 0.5, float16 near
    2) and misses by far more than the bound. For TF32, m = 4^j >= 4096 makes 1/sqrt(m) a
    power of two (no input rounding) and 1/m small enough to stall an 11-bit accumulator."""
    m = 4 ** max(6, math.ceil(math.log(dim, 4))) if narrow.inside else max(dim, 256)
    dtype = tf.as_dtype(narrow.handed)
    with tf.device(device):
        q = tf.cast(tf.fill((1, m), 1 / np.sqrt(m)), dtype)
        got = float(tf.cast(tf.matmul(q, q, transpose_b=True), tf.float32)[0, 0])
    exact = m * float(tf.cast(q, tf.float64)[0, 0]) ** 2
    if abs(got - exact) > 2 * narrow.output_u * abs(got) + gamma(m) + narrow.alpha:
        raise ConfigError(
            f"TensorFlow's {narrow.name} matmul on {device} does not accumulate in float32 "
            f"(probe: {got} against {exact:.6f}), so its answers cannot be certified; add "
            "--approximate or use --dtype float32."
        )


def build(
    targets: ColumnSource,
    columns: list[tuple[int, Any]],
    narrow: Narrow,
    device: str,
    block: int,
    top_k: Any,
    inputs: Any,
    input_specs: Any,
    biases: list[Any] | None = None,
) -> CertifiedSearch:
    """The float32 copy of the rows and the row bound: measured from the engine's narrow
    matrix, given as (first column, (dim, width) tensor) pieces, or a priori for TF32 (5)."""
    import tensorflow as tf

    check_device_setting(narrow, device)
    probe_accumulator(tf, narrow, device, targets.dim)
    rows32 = _aligned((targets.n, targets.dim))
    for start, chunk in targets.chunks():
        rows32[start : start + chunk.shape[0]] = chunk
    # (5): TF32 rows are stored in float32 and rounded by the tensor cores themselves.
    if narrow.inside:
        bound = RowBound.a_priori(rows32, narrow)
    else:
        bound = _measured_bound(columns, rows32, targets.dim)
    log.info(
        "Certified %s: rows within %.3g of their float32 values (max norm); worst-query "
        "epsilon %.3g + %g|score|.",
        narrow.name,
        bound.residual,
        worst_slack(narrow, bound, targets.dim),
        2 * narrow.output_u,
    )
    return CertifiedSearch(
        narrow, bound, rows32, top_k, inputs, input_specs, device, block, biases or []
    )


def _measured_bound(columns: list[tuple[int, Any]], rows32: np.ndarray, dim: int) -> RowBound:
    """R, X and X^ of (1) from the narrow values the matmul reads, piece by piece."""
    import tensorflow as tf

    bound = RowBound(0.0, 0.0, 0.0)
    step = chunk_rows_for(dim)
    for first, tensor in columns:
        for lo in range(0, int(tensor.shape[1]), step):
            stored = tf.transpose(tensor[:, lo : lo + step]).numpy()  # what the matmul reads
            exact = rows32[first + lo : first + lo + stored.shape[0]]
            bound = bound.merge(RowBound.measure(exact, stored))
    return bound


def _aligned(shape: tuple[int, int]) -> np.ndarray:
    """A page-aligned float32 array (TensorFlow checks the alignment of memory it shares)."""
    size = max(shape[0] * shape[1] * 4, 1)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, np.float32, shape[0] * shape[1]).reshape(shape)
