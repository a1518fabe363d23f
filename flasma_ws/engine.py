"""Exact cosine top-k on TensorFlow. No asyncio, no sockets: arrays in, arrays out.

The matrix lives on one device, stored transposed as (dim, N) variables. Each batch is one
matmul followed by an exact two-stage top-k, which is about twice as fast on CPU as
`tf.math.top_k` over all N columns; on CPU the whole search costs 0-14 % more than the bare
matmul (docs/benchmarks.md). With --dtype bfloat16 or float16 this graph selects a narrow top
K' and `flasma_ws/certified.py` turns it into the exact answer (its docstring has the proof).

Two-stage top-k, and why it is exact (ties included)
----------------------------------------------------
Scores S (B x F) are cut into nb blocks of C consecutive columns (F = nb*C; the last N - F
columns, the "tail", are always candidates). Stage 1 takes each block's maximum and picks
kb = min(k, nb) blocks with `top_k`; stage 2 runs `top_k` over the picked blocks' columns
plus the tail.

Order elements by (score descending, column ascending): this is the order `tf.math.top_k`
returns, since it puts the lower index first among equal values. Let T be the first k
elements in this order. Suppose x in T lies in a block b that was not picked. Each of the kb
picked blocks b' was ranked ahead of b by stage 1, so max(b') > max(b) >= s(x), or
max(b') == max(b) >= s(x) with b' < b. Either way the element y holding max(b') comes
strictly before x in the order (a higher score, or an equal score at a lower column, since
every column of b' is below every column of b). If kb == k that is k elements before x, so
x is not in T: a contradiction. If kb == nb < k every block is picked. Hence T lies inside
the candidates.
Stage 2 must also break ties the way a full `top_k` would: the picked block numbers are
sorted ascending before gathering, and the tail comes last, so candidate position grows with
column number and `top_k`'s lower-position-first rule is the lower-column-first rule.
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import tf_runtime  # first: it sets oneDNN and the log level before TensorFlow loads

with tf_runtime.quiet_import():
    import tensorflow as tf

from . import certified as certification
from .blas_search import MAX_ROWS as BLAS_MAX_ROWS
from .blas_search import BlasSearch
from .errors import ConfigError, EngineError, EngineOutOfMemory
from .machine import cpu_flags
from .settings import TF32_NEEDS_FLOAT32, EngineSettings
from .vectors import ColumnSource, chunk_rows_for

log = logging.getLogger(__name__)

TF_DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}


# The engine's part of the settings tree, whose fields are the one set of defaults (top_k,
# the k most calls use, picks the block size).
EngineConfig = EngineSettings


def warmup_batches(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, plus max_batch itself: the batch sizes run at start-up."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return [*sizes, max_batch]


def choose_block_size(n: int, k: int) -> int:
    """About sqrt(N/k) columns per block balances stage 1 (N/C maxima) against stage 2 (k*C)."""
    c = 2 ** round(math.log2(max(math.sqrt(n / max(k, 1)), 1)))
    return int(min(max(c, 16), 4096))


SLAB_SCORE_BYTES = 512 * 1024 * 1024  # scores of one slab for a full batch (see below)


def column_slabs(
    n_main: int, block: int, max_batch: int, budget_bytes: int | None = None
) -> list[tuple[int, int]]:
    """Cut the blocked columns into slabs whose (max_batch, width) float32 score matrix fits
    SLAB_SCORE_BYTES: the working memory of a search stays bounded whatever N is. Each slab
    is its own tensor (a column slice of one tensor would be copied on every call).
    Slabs cost time: at N = 1M, d = 100, batch 128, four 128 MiB slabs ran ~20 % slower than
    one 512 MiB score matrix, so the budget is 512 MiB: one slab up to 1M rows at batch 128,
    and bounded working memory beyond. At 1M x 768, 128 MiB slabs cut RSS by ~400 MiB for
    ~17 % fewer q/s: `--score-memory-mib` lets a deployment choose."""
    if n_main == 0:
        return []
    budget = budget_bytes or SLAB_SCORE_BYTES
    width = max(budget // (4 * max_batch) // block, 1) * block
    return [(lo, min(lo + width, n_main)) for lo in range(0, n_main, width)]


def configure_threads(inter_op: int) -> bool:
    """Set TensorFlow's inter-op pool size (0 = TensorFlow's default). It must happen before
    TensorFlow's first op; returns False when it is too late (another engine in this process).

    The server runs one graph at a time, whose ops form a chain: a second inter-op thread
    mostly competes for the cores with the event loop. Measured end to end (64 connections,
    2 cores): ~5,100 q/s with one thread against ~4,870 with TensorFlow's default."""
    if inter_op <= 0:
        return True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        return True
    except RuntimeError:
        return False


def resolve_device(device: str) -> str:
    """'auto' -> first GPU if TensorFlow sees one, else CPU; 'cpu', 'gpu', 'gpu:1' accepted."""
    if device == "auto":
        return "/device:GPU:0" if tf.config.list_logical_devices("GPU") else "/device:CPU:0"
    name = device.upper().removeprefix("/DEVICE:").removeprefix("/")
    if ":" not in name:
        name += ":0"
    wanted = f"/device:{name}"
    known = [d.name for d in tf.config.list_logical_devices()]
    if wanted not in known:
        raise ConfigError(
            f"TensorFlow sees no device {device!r} (it sees {', '.join(known)}); "
            "use --device auto, cpu or gpu:N."
        )
    return wanted


def _host_buffer(shape: tuple[int, int]) -> np.ndarray:
    """A page-aligned float32 array from an anonymous mapping, its pages populated up front:
    on this VM that is ~3x faster than faulting in np.empty's pages one by one, and page
    alignment satisfies TensorFlow's alignment check on memory it did not allocate."""
    size = max(shape[0] * shape[1] * 4, 1)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), np.float32, shape[0] * shape[1]).reshape(
        shape
    )


def unit_queries(queries: np.ndarray) -> np.ndarray:
    """Each row divided by its norm, computed in float64 and rounded once to float32.

    On the host rather than in the graph, so that every path (TensorFlow on any device, the
    BLAS path for small batches) scores the very same normalized query; float64 also cannot
    overflow on squares of float32 components. Rows must be finite and non-zero."""
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)


def _float32_matmuls(tf32: bool) -> bool:
    """TensorFloat-32 off, unless `--tf32` asked for it (and certification then makes it
    exact: certified.py (5)): on NVIDIA Ampere and newer GPUs TensorFlow otherwise runs
    float32 matmuls with 10-bit mantissas (relative error ~5e-4), which breaks exact top-k.
    The switch is process-wide and read when a kernel runs, so each engine sets it before
    each of its searches (two engines in one process, as in the bench, may differ).
    Returns whether TF32 is on."""
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


def _shared_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor over the array's memory (the tensor keeps the array alive)."""
    if array.size == 0:
        return tf.zeros(array.shape, tf.float32)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def block_candidates(
    scores: tf.Tensor, k: tf.Tensor, block: int, first: int, reduce: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Stage 1 and the gather of stage 2 (module docstring) over (B, W) float32 scores, W a
    multiple of `block`: the columns (numbered from `first`) of the k best blocks, in
    ascending order, and their scores; with `reduce`, already cut to the exact top k, best
    first, the lower column first among equal scores."""
    batch = tf.shape(scores)[0]
    width = scores.shape[1]  # static for a slab, unknown for the growing appendable
    n_blocks = width // block if width is not None else tf.shape(scores)[1] // block
    blocks = tf.reshape(scores, (batch, n_blocks, block))
    _, picked = tf.math.top_k(tf.reduce_max(blocks, axis=2), tf.minimum(k, n_blocks))
    picked = tf.sort(picked, axis=1)  # candidate order must follow column order
    values = tf.reshape(tf.gather(blocks, picked, batch_dims=1), (batch, -1))
    offsets = tf.range(block, dtype=tf.int32)
    cols = tf.reshape(picked[:, :, None] * block + offsets + first, (batch, -1))
    if not reduce:
        return values, cols
    # top_k keeps equal values in position order, i.e. column order: still exact.
    values, positions = tf.math.top_k(values, tf.minimum(k, tf.shape(values)[1]))
    return values, tf.gather(cols, positions, batch_dims=1)


class Engine:
    """The target matrix resident on a device, and exact top-k search against it.

    `search` may be called from any one thread at a time (the batcher's engine thread).
    """

    def __init__(
        self,
        targets: ColumnSource,
        config: EngineConfig,
        progress: Callable[[int], None] | None = None,
        masked: bool = False,
    ) -> None:
        """`masked`: keep a per-column bias (0 live, -inf deleted) that is added to the scores
        before the top-k, for a live collection (`mask_columns`); off, the graph is today's."""
        if config.max_k < 1 or config.max_batch < 1:
            raise ConfigError("max_k and max_batch must be at least 1.")
        if config.tf32 and config.dtype != "float32":
            raise ConfigError(TF32_NEEDS_FLOAT32)
        self.targets = targets
        self.config = config
        self.n, self.dim = targets.n, targets.dim
        self.max_k = min(config.max_k, self.n)
        self.device = resolve_device(config.device)
        self.dtype = TF_DTYPES[config.dtype]
        self.onednn = tf_runtime.onednn_state()
        self.tf32 = _float32_matmuls(config.tf32)
        self._blas: BlasSearch | None = None  # set by _load_shared_host
        self.masked = masked
        self._bias: list[Any] = []  # per slab, then the tail: host arrays or variables
        self._bias_tensors: list[Any] = []
        # Certified narrow scoring selects a top K' (about first_width(k)), not a top k.
        self.narrow = certification.scheme(config.dtype, config.tf32)
        self.certify = self.narrow is not None and not config.approximate
        selected = certification.first_width(config.top_k) if self.certify else config.top_k
        self.block = config.block_size or choose_block_size(self.n, selected)
        self.n_blocks = self.n // self.block
        self.n_main = self.n_blocks * self.block
        budget = config.score_memory_mib and config.score_memory_mib * 1024 * 1024
        self.slabs = column_slabs(self.n_main, self.block, config.max_batch, budget)
        self.warmup_batches = warmup_batches(config.max_batch)
        note = certification.speed_note(
            config.dtype, self.device, cpu_flags(), self.onednn.enabled, config.tf32
        )
        if note is not None:
            log.warning(note[0].upper() + note[1:])
        self._load(progress)
        self.certified: certification.CertifiedSearch | None = None
        if self.narrow is not None and self.certify:  # narrow scores certified, rescored
            self.certified = certification.build(
                targets,
                self._narrow_columns(),
                self.narrow,
                self.device,
                self.block,
                # The narrow candidates come from the engine's own two-stage top-k, with the
                # matrix passed in as arguments as to the engine's own graphs.
                self._search_graph,
                self._graph_inputs,
                self._input_specs,
                self._bias_tensors,
            )
        self._reserve_working_memory()
        self._functions: dict[int, Callable[..., Any]] = {}  # id(trace) -> concrete function
        self._trace = tf.function(self._search_graph, jit_compile=False, autograph=False)
        self._matmul_trace = tf.function(self._matmul_graph, jit_compile=False, autograph=False)

    # -- loading -----------------------------------------------------------------------
    def _load(self, progress: Callable[[int], None] | None) -> None:
        """Put the normalized matrix on the device without ever holding two full copies.

        The matrix is stored transposed, (dim, N): TensorFlow's CPU matmul runs 1.3-2x faster
        on q @ M than on q @ M^T with M stored (N, dim) (docs/benchmarks.md).
        """
        try:
            with tf.device(self.device):
                if self.device.endswith("CPU:0") and self.dtype == tf.float32:
                    self._load_shared_host(progress)
                else:
                    self._load_variables(progress)
        except tf.errors.ResourceExhaustedError as exc:
            raise EngineOutOfMemory(
                f"The {self.n}x{self.dim} matrix does not fit on {self.device}; "
                "try --dtype bfloat16 or float16, or --device cpu."
            ) from exc
        finally:
            # The file's pages were read once; keep them out of this process's RSS.
            self.targets.release_pages()

    def _load_shared_host(self, progress: Callable[[int], None] | None) -> None:
        """CPU: fill aligned host arrays and hand them to TensorFlow through DLPack, which
        shares the memory instead of copying it: the matrix exists exactly once."""
        buffers = []
        for lo, hi in [*self.slabs, (self.n_main, self.n)]:
            buffer = _host_buffer((self.dim, hi - lo))
            self.targets.fill_columns(buffer, lo, progress)
            buffers.append((lo, buffer))
        *slabs, (_, tail) = buffers
        self._slab_tensors = [_shared_tensor(buffer) for _, buffer in slabs]
        self._tail = _shared_tensor(tail)
        biases = None
        if self.masked:  # host arrays that TensorFlow reads in place, as the slabs
            biases = [_host_buffer((1, b.shape[1]))[0] for _, b in buffers]  # zero-filled
            self._bias = biases
            self._bias_tensors = [_shared_tensor(b) for b in biases]
        self._blas = BlasSearch(buffers, self.n, self.block, self.n_main, biases=biases)

    def _load_variables(self, progress: Callable[[int], None] | None) -> None:
        """GPU or a narrower dtype: copy chunk by chunk into device variables."""
        self._slab_tensors = [self._variable(lo, hi, progress) for lo, hi in self.slabs]
        self._tail = self._variable(self.n_main, self.n, progress)
        if self.masked:
            widths = [hi - lo for lo, hi in [*self.slabs, (self.n_main, self.n)]]
            self._bias = [tf.Variable(tf.zeros((w,), tf.float32), trainable=False) for w in widths]
            self._bias_tensors = self._bias

    def _variable(self, lo: int, hi: int, progress: Callable[[int], None] | None) -> tf.Variable:
        variable = tf.Variable(tf.zeros((self.dim, hi - lo), self.dtype), trainable=False)
        step = chunk_rows_for(self.dim)
        for start in range(lo, hi, step):
            chunk = np.empty((self.dim, min(step, hi - start)), np.float32)
            self.targets.fill_columns(chunk, start, progress)
            variable[:, start - lo : start - lo + chunk.shape[1]].assign(tf.cast(chunk, self.dtype))
        # Slice assignment put the variable in copy-on-read mode, where every read in the
        # graph copies it whole; loading is over, so turn that off.
        tf.raw_ops.DisableCopyOnRead(resource=variable.handle)
        return variable

    def _narrow_columns(self) -> list[tuple[int, Any]]:
        """(first column, (dim, width) tensor) of the stored matrix, slabs then tail."""
        firsts = [lo for lo, _ in self.slabs] + [self.n_main]
        return list(zip(firsts, [*self._slab_tensors, self._tail], strict=True))

    def _reserve_working_memory(self) -> None:
        """Reserve one contiguous block of TensorFlow's CPU memory pool, big enough for the
        largest search, before any search runs.

        TensorFlow's CPU allocator (a BFC pool under oneDNN) never returns memory, and grows
        in separate regions. Left to itself, searches at mixed batch sizes settled at about
        twice the largest score matrix (1M x 768: RSS 1.34x the matrix above TensorFlow's
        baseline); with one region reserved up front every search fits in it (1.19x), at
        unchanged speed. `Empty` does not write the block, so no page is touched here.
        The system allocator was also tried: as small in memory, but 4-20 % slower.
        Without oneDNN TensorFlow's CPU allocator is not that pool (it frees to the system),
        so there is nothing to reserve."""
        if "CPU" not in self.device or not self.slabs or not self.onednn.enabled:
            return
        width = max(hi - lo for lo, hi in self.slabs)
        per_score = 4 + (self.dtype.size if self.dtype != tf.float32 else 0)  # + cast input
        scores = self.config.max_batch * width * per_score
        # Twice the scores: the pool splits a free block only when it is at least twice the
        # request (or 128 MiB over it), and the split-off half is where the top-k's and the
        # matmul's smaller buffers go. Pages the searches never touch cost no memory.
        reserve = 2 * scores + 64 * 1024 * 1024
        try:
            with tf.device(self.device):
                block = tf.raw_ops.Empty(shape=[reserve], dtype=tf.uint8, init=False)
            del block
        except tf.errors.ResourceExhaustedError:  # only an optimization: search still works
            log.warning("Could not reserve %d MiB for searches up front.", reserve >> 20)

    # -- the graph ---------------------------------------------------------------------
    def _in_dtype(self, queries: tf.Tensor) -> tf.Tensor:
        return tf.cast(queries, self.dtype)  # normalized on the host: `unit_queries`

    # The matrix and mask enter the traced functions as arguments, not captures: a captured
    # tensor lives as long as the function, which sits in reference cycles that the frozen
    # collector never breaks (service.py), so a retired base would never be freed.
    def _graph_inputs(self) -> list[Any]:
        return [*self._slab_tensors, self._tail, *self._bias_tensors]

    def _input_specs(self) -> list[tf.TensorSpec]:
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in (*self._slab_tensors, self._tail)]
        return specs + [tf.TensorSpec(b.shape, tf.float32) for b in self._bias_tensors]

    def _unpack(self, inputs: tuple[Any, ...]) -> tuple[list[Any], Any, list[Any]]:
        """(slabs, tail, biases per slab then the tail) from `_graph_inputs`' order."""
        count = len(self.slabs)
        biases = list(inputs[count + 1 :]) or [None] * (count + 1)
        return list(inputs[:count]), inputs[count], biases

    def _matmul_graph(self, queries: tf.Tensor, *inputs: tf.Tensor) -> tf.Tensor:
        """Score against every row like `_search_graph`, then only a row max."""
        slabs, tail, _ = self._unpack(inputs)
        q = self._in_dtype(queries)
        best = [tf.reduce_max(tf.matmul(q, slab), axis=1) for slab in slabs]
        if self.n > self.n_main:
            best.append(tf.reduce_max(tf.matmul(q, tail), axis=1))
        return tf.cast(tf.reduce_max(tf.stack(best), axis=0), tf.float32)

    def _search_graph(
        self, queries: tf.Tensor, k: tf.Tensor, *inputs: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        slabs, tail, biases = self._unpack(inputs)
        batch = tf.shape(queries)[0]
        q = self._in_dtype(queries)
        # Candidates from every slab, then the tail, in ascending column order (see the
        # module docstring: that order is what makes ties come out as a full top_k would).
        scores, columns = [], []
        alone = len(self.slabs) == 1
        for (lo, _), slab, bias in zip(self.slabs, slabs, biases):
            # With several slabs each is cut to its own exact top k at once, so that only
            # (B, k) per slab outlives the slab's score matrix.
            slab_scores = self._scores(q, slab, bias)
            values, cols = block_candidates(slab_scores, k, self.block, lo, reduce=not alone)
            scores.append(values)
            columns.append(cols)
        if self.n > self.n_main:
            scores.append(self._scores(q, tail, biases[-1]))
            tail = tf.range(self.n_main, self.n, dtype=tf.int32)
            columns.append(tf.broadcast_to(tail, (batch, self.n - self.n_main)))
        candidates = scores[0] if len(scores) == 1 else tf.concat(scores, axis=1)
        candidate_columns = columns[0] if len(columns) == 1 else tf.concat(columns, axis=1)
        values, positions = tf.math.top_k(candidates, k)
        return tf.gather(candidate_columns, positions, batch_dims=1), values

    @staticmethod
    def _scores(q: tf.Tensor, slab: tf.Tensor, bias: tf.Tensor | None) -> tf.Tensor:
        """float32 scores against one slab, plus its deletion bias (a masked engine)."""
        s = tf.cast(tf.matmul(q, slab), tf.float32)
        return s if bias is None else tf.nn.bias_add(s, bias)

    def _concrete(self, trace: Any, *more: tf.TensorSpec) -> Callable[..., Any]:
        """The traced function, traced once for every batch size and kept.

        The batch dimension is left unknown rather than padded to a few fixed sizes: the
        graph's cost then follows the real batch (65 queries took 8.3 ms against 15.5 ms
        padded to 128, at N = 100k, d = 100), and a batch size seen for the first time costs
        no more than later ones (docs/benchmarks.md)."""
        fn = self._functions.get(id(trace))
        if fn is None:
            with tf.device(self.device):
                queries = tf.TensorSpec((None, self.dim), tf.float32)
                fn = trace.get_concrete_function(queries, *more, *self._input_specs())
            self._functions[id(trace)] = fn
        return fn

    # -- public API --------------------------------------------------------------------
    def warmup(
        self, progress: Callable[[int], None] | None = None, sizes: list[int] | None = None
    ) -> float:
        """Trace the search and run it at each warm-up batch size (`sizes`, default all), so
        that no request pays for tracing or for TensorFlow's first run of a shape. Returns
        seconds. `progress` is called with each batch size once it has run."""
        started = time.perf_counter()
        k = min(self.config.top_k, self.max_k)
        for batch in sizes or self.warmup_batches:
            self.search(np.ones((batch, self.dim), np.float32), k)
            if progress is not None:
                progress(batch)
        return time.perf_counter() - started

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query: (B, k) int64 row numbers and (B, k) float32 scores.

        `queries` is (B, dim) float32 with finite, non-zero rows (normalized here); B of any
        size (split into max_batch pieces). Rows are numbered as in the vector file.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EngineError(f"Queries must have shape (B, {self.dim}), got {queries.shape}.")
        if not 1 <= k <= self.max_k:
            raise EngineError(f"k must be between 1 and {self.max_k}, got {k}.")
        rows, scores = self.search_columns(unit_queries(queries), k)
        return self.targets.original_index(rows), scores

    def search_columns(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` for already normalized queries, answering engine column numbers (deleted
        columns of a masked engine come last, with score -inf)."""
        pieces = [
            self._search_piece(queries[i : i + self.config.max_batch], k)
            for i in range(0, max(queries.shape[0], 1), self.config.max_batch)
        ]
        rows = np.concatenate([p[0] for p in pieces]) if len(pieces) > 1 else pieces[0][0]
        scores = np.concatenate([p[1] for p in pieces]) if len(pieces) > 1 else pieces[0][1]
        return rows, scores

    def _search_piece(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        batch = queries.shape[0]
        if self._blas is not None and 0 < batch <= BLAS_MAX_ROWS:
            return self._blas.search(queries, k)
        _float32_matmuls(self.config.tf32)
        try:
            if self.certified is not None:
                return self.certified.search(queries, k)
            search = self._concrete(self._trace, tf.TensorSpec((), tf.int32))
            q, k_t = tf.constant(queries, tf.float32), tf.constant(k, tf.int32)
            rows, scores = search(q, k_t, *self._graph_inputs())
            return rows.numpy().astype(np.int64), scores.numpy()
        except tf.errors.ResourceExhaustedError as exc:
            raise EngineOutOfMemory(
                f"{self.device} ran out of memory for a batch of {batch}; lower --max-batch."
            ) from exc
        except tf.errors.OpError as exc:
            raise EngineError(f"TensorFlow failed on a batch of {batch}: {exc.message}") from exc

    def matmul_only(self, queries: np.ndarray) -> np.ndarray:
        """Each query's best score, from the same normalize-and-matmul as `search` but no top-k.

        The bench's ceiling: every call pays what `search` pays (conversion, the call,
        scoring all N rows, a fetch to the host) except selecting the top k.
        `queries` is one piece, at most max_batch rows.
        """
        matmul = self._concrete(self._matmul_trace)
        _float32_matmuls(self.config.tf32)
        best = matmul(tf.constant(unit_queries(queries)), *self._graph_inputs())
        return best.numpy()

    # -- a live collection's deletions (engine thread, between searches) ----------------
    def _pieces(self) -> list[tuple[int, int]]:
        return [*self.slabs, (self.n_main, self.n)]

    def mask_columns(self, columns: np.ndarray, dead: bool = True) -> None:
        """Give `columns` a bias of -inf (dead) or 0 (live again) for every later search."""
        if not self.masked:
            raise EngineError("This engine was built without a deletion mask.")
        value = -np.inf if dead else 0.0
        columns = np.asarray(columns, np.int64)
        for index, (lo, hi) in enumerate(self._pieces()):
            inside = columns[(columns >= lo) & (columns < hi)] - lo
            if not inside.size:
                continue
            bias = self._bias[index]
            if isinstance(bias, np.ndarray):
                bias[inside] = value
            else:
                updates = tf.fill([inside.size], tf.constant(value, tf.float32))
                bias.scatter_nd_update(inside[:, None], updates)

    def column_vectors(self, columns: np.ndarray) -> np.ndarray:
        """(dim, m) float32 stored (normalized) vectors of engine columns, as columns.

        Host slabs are read with numpy in the calling thread, not with a TensorFlow op: a
        compaction reads the whole old base this way, and an op would take the threads of
        TensorFlow's one intra-op pool, where the searches' own ops then wait."""
        columns = np.asarray(columns, np.int64)
        out = np.empty((self.dim, columns.size), np.float32)
        host = [(lo, lo + buffer.shape[1], buffer) for lo, buffer in self.host_slabs()]
        stored = [*self._slab_tensors, self._tail]
        parts = host or [(lo, hi, t) for (lo, hi), t in zip(self._pieces(), stored, strict=True)]
        for lo, hi, slab in parts:
            picked = np.flatnonzero((columns >= lo) & (columns < hi))
            if not picked.size:
                continue
            if isinstance(slab, np.ndarray):
                out[:, picked] = np.take(slab, columns[picked] - lo, axis=1)
            else:
                gathered = tf.gather(slab, columns[picked] - lo, axis=1)
                out[:, picked] = tf.cast(gathered, tf.float32).numpy()
        return out

    def release(self) -> None:
        """Drop the matrix and the traced functions now. A retired base must not wait for
        the garbage collector: its tf.function holds it in a reference cycle, and the server
        freezes start-up objects out of the collector's sight (service.py), so it would
        never be freed. The engine cannot search afterwards."""
        self._functions.clear()
        self._trace = self._matmul_trace = None
        if self.certified is not None:
            self.certified.release()
        self.certified = None
        self._slab_tensors, self._tail, self._blas = [], None, None
        self._bias, self._bias_tensors = [], []

    def host_slabs(self) -> list[tuple[int, np.ndarray]]:
        """(first column, (dim, width) float32 buffer) of the matrix where it lives in host
        memory (CPU, float32), else []: what BLAS can read without a copy."""
        return list(self._blas.slabs) if self._blas is not None else []

    def host_rows(self) -> Callable[[int, int], np.ndarray] | None:
        """Where the matrix lives in host slabs: rows lo..hi of its whole (dim, n) float32
        layout as a (hi - lo, n) array, joined from the slabs (what a snapshot's file holds,
        in file order). Else None."""
        slabs = self.host_slabs()
        if not slabs:
            return None
        return lambda lo, hi: np.concatenate([buffer[lo:hi] for _, buffer in slabs], axis=1)

    def describe(self) -> dict[str, object]:
        return {
            "n": self.n,
            "dim": self.dim,
            "device": self.device,
            "dtype": self.config.dtype,
            "block_size": self.block,
            "warmup_batches": self.warmup_batches,
            "onednn": self.onednn.describe(),
            "tf32": self.tf32,
            "blas_max_batch": BLAS_MAX_ROWS if self._blas is not None else 0,
            "precision": self.precision(),
        }

    def precision(self) -> dict[str, object]:
        """Which answers the dtype gives: exact float32, certified narrow, or approximate."""
        if self.certified is not None:
            return self.certified.describe()
        if self.narrow is not None:
            return {"mode": "approximate", "unit_roundoff": self.narrow.u}
        return {"mode": "float32"}
