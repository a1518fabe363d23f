"""A live collection on the device: writes and deletes by key between searches, exact always.

TensorFlow and numpy only: no asyncio, no files. Every method but `build_base` runs in the
engine thread, between searches, so that a search sees a write entirely or not at all.

Layout
------
Rows live at *positions*: a large immutable base (an `Engine` built with a deletion mask,
positions 0..Nb-1) and a small appendable segment (positions Nb..Nb+A-1, capacity doubling
on the device). An upsert appends the new vector and kills the key's old position, if any; a
delete kills it. Killing sets the position's bias to -inf, added to its scores before any
top-k. Compaction copies the live rows, in position order, into a new base and swaps it in.

Exactness with masked rows (the engine's two-stage top-k proof, extended)
-------------------------------------------------------------------------
Scores become s'_j = s_j + b_j with b_j in {0, -inf}; scores of unit vectors are finite, so
s'_j is a real number or -inf, never NaN. The two-stage proof only uses that (score
descending, position ascending) is a total order on the values, which holds for -inf too: so
each segment's top-k of s' is its exact first k in that order. Every live position precedes
every dead one (finite > -inf), hence the first k of s' are the first min(k, live) live
positions followed by dead ones; dropping the entries of score -inf leaves exactly the top
live rows. Merging: the global first k are among the union of each segment's first k (an
element beaten by k elements of its own segment is beaten by k elements overall).
Concatenating base then appendable results (each already in order) and sorting stably by
score descending keeps, among equal scores, the lower position first: base before
appendable, and within each its own order. So the tie rule is: equal scores come out in
position order, i.e. the file's row order for loaded rows, then the order in which writes
were applied (a re-upserted key moves to its write's place). Compaction keeps position order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import (
    TF_DTYPES,
    Engine,
    _host_buffer,
    _shared_tensor,
    block_candidates,
    tf,
    unit_queries,
)
from .errors import EngineError
from .settings import EngineSettings

log = logging.getLogger(__name__)

Key = int | str
MISSING_INT = -1  # the key of an absent result (fewer live rows than k): never a real key
FIRST_CAPACITY = 1024
SEGMENT_BLOCK = 64  # slots per block of the appendable's two-stage top-k


def key_array(keys: Sequence[Key] | np.ndarray, key_type: str) -> np.ndarray:
    """Keys as an array that fancy indexing can map positions through."""
    if key_type == "int":
        return np.asarray(keys, np.int64)
    out = np.empty(len(keys), object)
    out[:] = list(keys)
    return out


class Appendable:
    """The appendable segment: (capacity, dim) rows and a (capacity,) bias on the device.
    Unused slots have bias -inf, so a search can always run over the whole capacity."""

    def __init__(self, dim: int, dtype: str, device: str, host: bool, capacity: int) -> None:
        self.dim, self.dtype, self.device, self.host = dim, dtype, device, host
        self.used = 0
        self.capacity = 0
        self.rows: Any = None  # host (capacity, dim) float32 when `host`, else a variable
        self.bias: Any = None
        self._allocate(max(capacity, 1))

    def _allocate(self, capacity: int) -> None:
        """A new capacity with the used rows copied over (growth doubles: amortized O(1)),
        whole blocks of SEGMENT_BLOCK slots (the two-stage top-k's unit)."""
        capacity = -(-capacity // SEGMENT_BLOCK) * SEGMENT_BLOCK
        with tf.device(self.device):
            if self.host:
                rows = _host_buffer((capacity, self.dim))
                bias = _host_buffer((1, capacity))[0]
                bias[:] = -np.inf
                if self.used:
                    rows[: self.used] = self.rows[: self.used]
                    bias[: self.used] = self.bias[: self.used]
                self.rows, self.bias = rows, bias
                self.rows_tensor, self.bias_tensor = _shared_tensor(rows), _shared_tensor(bias)
            else:
                dtype = TF_DTYPES[self.dtype]
                rows_v = tf.Variable(tf.zeros((capacity, self.dim), dtype), trainable=False)
                bias_v = tf.Variable(tf.fill([capacity], -np.inf), trainable=False)
                if self.used:
                    rows_v[: self.used].assign(self.rows[: self.used])
                    bias_v[: self.used].assign(self.bias[: self.used])
                self.rows, self.bias = rows_v, bias_v
                self.rows_tensor, self.bias_tensor = rows_v, bias_v
        self.capacity = capacity

    def append(self, vectors: np.ndarray) -> int:
        """Store normalized rows in the next slots; returns the first slot."""
        first, count = self.used, vectors.shape[0]
        if first + count > self.capacity:
            capacity = self.capacity
            while first + count > capacity:
                capacity *= 2
            self._allocate(capacity)
        if self.host:
            self.rows[first : first + count] = vectors
            self.bias[first : first + count] = 0.0
        else:
            slots = tf.range(first, first + count)[:, None]
            self.rows.scatter_nd_update(slots, tf.cast(vectors, self.rows.dtype))
            self.bias.scatter_nd_update(slots, tf.zeros([count], tf.float32))
        self.used += count
        return first

    def kill(self, slots: np.ndarray) -> None:
        if not slots.size:
            return
        if self.host:
            self.bias[slots] = -np.inf
        else:
            self.bias.scatter_nd_update(slots[:, None], tf.fill([slots.size], -np.inf))

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        if self.host:
            return np.array(self.rows[slots], np.float32)
        return tf.cast(tf.gather(self.rows, slots), tf.float32).numpy()


def _segment_top_k(
    queries: tf.Tensor, rows: tf.Tensor, bias: tf.Tensor, k: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, k) slots and scores over the appendable segment, best first, the lower slot first
    among equal scores (the tie rule of the module docstring): the base's exact two-stage
    top-k (engine.py's proof, with slots for columns) over blocks of SEGMENT_BLOCK slots.
    A full `top_k` over the capacity cost more than the matmul itself (capacity 8,192,
    batch 128, d = 100: 4.4 ms against 3.3 ms on an AMD EPYC Zen 4)."""
    scores = tf.matmul(tf.cast(queries, rows.dtype), rows, transpose_b=True)
    scores = tf.nn.bias_add(tf.cast(scores, tf.float32), bias)
    values, slots = block_candidates(scores, k, SEGMENT_BLOCK, 0, reduce=True)
    return slots, values


@dataclass
class CompactionPlan:
    """What compaction copies: every live position at `lsn`, in position order."""

    lsn: int
    positions: np.ndarray  # old positions, ascending
    keys: np.ndarray  # their keys
    appended: int  # appendable slots used when frozen: later ones are written after it
    touched: set[Key] = field(default_factory=set)  # keys written after the freeze
    slot_of: dict[Key, int] = field(default_factory=dict)  # key -> new base column (build)


class PlannedRows:
    """The rows of a plan read as columns from the old base and appendable (never written
    again: slots are only appended, and the base is immutable), for a new base `Engine`."""

    def __init__(self, engine: LiveEngine, plan: CompactionPlan) -> None:
        self._base, self._app = engine.base, engine.app
        self._positions = plan.positions
        self.n, self.dim = int(plan.positions.size), engine.dim

    def read(self, start: int, stop: int) -> np.ndarray:
        """(dim, stop - start) float32 rows, as columns."""
        return _stored_columns(self._base, self._app, self._positions[start:stop])

    def fill_columns(
        self, out: np.ndarray, first: int, progress: Callable[[int], None] | None = None
    ) -> None:
        step = 65_536
        for lo in range(0, out.shape[1], step):
            hi = min(lo + step, out.shape[1])
            out[:, lo:hi] = self.read(first + lo, first + hi)

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        step = chunk_rows or 65_536
        for lo in range(0, self.n, step):
            yield lo, self.read(lo, min(lo + step, self.n)).T

    def release_pages(self) -> None:
        pass

    def original_index(self, rows: np.ndarray) -> np.ndarray:
        return rows


class LiveEngine:
    """Exact top-k over a changing set of keyed rows (see the module docstring)."""

    def __init__(
        self, base: Engine, keys: np.ndarray, key_type: str, config: EngineSettings
    ) -> None:
        if keys.shape[0] != base.n:
            raise EngineError(f"{keys.shape[0]} keys for {base.n} rows.")
        self.config, self.key_type = config, key_type
        self.dim, self.device, self.max_k = base.dim, base.device, config.max_k
        self._host = bool(base.host_slabs())
        # Appended rows are kept in float32 whatever the base's dtype: the appendable is small,
        # and a narrow one would need its own certification (certified.py) to stay exact.
        self.app = Appendable(self.dim, "float32", self.device, self._host, FIRST_CAPACITY)
        self._app_keys = key_array([], key_type)
        signature = [
            tf.TensorSpec((None, self.dim), tf.float32),
            tf.TensorSpec((None, self.dim), tf.float32),
            tf.TensorSpec((None,), tf.float32),
            tf.TensorSpec((), tf.int32),
        ]  # any batch and capacity: growing the segment never retraces
        self._top_k = tf.function(
            _segment_top_k, input_signature=signature, jit_compile=False, autograph=False
        )
        self.applied_lsn = 0
        self._plan: CompactionPlan | None = None
        self._install(base, keys, _positions_of(keys), dead=0)

    def _install(self, base: Engine, keys: np.ndarray, slot_of: dict[Key, int], dead: int) -> None:
        self.base, self._base_keys, self._slot_of = base, keys, slot_of
        self.base_dead = dead

    # -- what there is ------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Live rows."""
        return len(self._slot_of)

    @property
    def base_live(self) -> int:
        return self.base.n - self.base_dead

    def has(self, key: Key) -> bool:
        return key in self._slot_of

    @property
    def warmup_batches(self) -> list[int]:
        return self.base.warmup_batches

    def warmup(self, progress: Callable[[int], None] | None = None) -> float:
        """The base's warm-up, and one appendable search so that its graph is traced."""
        seconds = self.base.warmup(progress)
        probe = np.ones((2, self.dim), np.float32)
        with tf.device(self.device):
            self._top_k(probe, self.app.rows_tensor, self.app.bias_tensor, tf.constant(1))
        return seconds

    @property
    def appended(self) -> int:
        return self.app.used

    @property
    def targets(self) -> Any:
        return self.base.targets

    def describe(self) -> dict[str, object]:
        return {**self.base.describe(), "n": self.n, "key_type": self.key_type}

    # -- searching ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) keys and float32 scores, best first. With fewer than k live rows the row
        ends with absent results: key MISSING_INT (int keys) or None, score -inf."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EngineError(f"Queries must have shape (B, {self.dim}), got {queries.shape}.")
        if not 1 <= k <= self.max_k:
            raise EngineError(f"k must be between 1 and {self.max_k}, got {k}.")
        unit = unit_queries(queries)
        nb = self.base.n
        cols, scores = self.base.search_columns(unit, min(k, self.base.max_k))
        positions, values = [cols], [scores]
        if self.app.used:
            slots, app_scores = self._search_appendable(unit, min(k, self.app.capacity))
            positions.append(slots + nb)
            values.append(app_scores)
        if sum(p.shape[1] for p in positions) < k:  # fewer rows than k: absent results
            width = k - sum(p.shape[1] for p in positions)
            positions.append(np.full((unit.shape[0], width), -1, np.int64))
            values.append(np.full((unit.shape[0], width), -np.inf, np.float32))
        position = np.concatenate(positions, axis=1)
        score = np.concatenate(values, axis=1)
        best = np.argsort(-score, axis=1, kind="stable")[:, :k]  # stable: position order
        position = np.take_along_axis(position, best, 1)
        score = np.take_along_axis(score, best, 1)
        return self._keys_of(position, score), score

    def _search_appendable(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._host and unit.shape[0] == 1:  # as the base: GEMV in numpy for one query
            scores = unit @ self.app.rows[: self.app.used].T + self.app.bias[: self.app.used]
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return best.astype(np.int64), np.take_along_axis(scores, best, 1)
        with tf.device(self.device):
            slots, values = self._top_k(
                tf.constant(unit), self.app.rows_tensor, self.app.bias_tensor, tf.constant(k)
            )
        return slots.numpy().astype(np.int64), values.numpy()

    def _keys_of(self, position: np.ndarray, score: np.ndarray) -> np.ndarray:
        keys = self._key_at(position)
        keys[np.isneginf(score)] = MISSING_INT if self.key_type == "int" else None
        return keys

    # -- writing ------------------------------------------------------------------------
    def apply(
        self, lsn: int, upsert_keys: Sequence[Key], vectors: np.ndarray, delete_keys: Sequence[Key]
    ) -> tuple[int, int]:
        """One record: upserts (normalized float32 rows), then deletes. Returns (upserted,
        deleted that existed)."""
        if upsert_keys:
            self._upsert(upsert_keys, vectors)
        deleted = self._delete(delete_keys) if delete_keys else 0
        self.applied_lsn = lsn
        if self._plan is not None:
            self._plan.touched.update(upsert_keys)
            self._plan.touched.update(delete_keys)
        return len(upsert_keys), deleted

    def _upsert(self, keys: Sequence[Key], vectors: np.ndarray) -> None:
        old = [p for p in map(self._slot_of.get, keys) if p is not None]
        self._kill(np.asarray(old, np.int64))
        first = self.app.append(vectors)
        self._app_keys = _grow_keys(self._app_keys, first, keys, self.key_type)
        nb = self.base.n
        for i, key in enumerate(keys):
            self._slot_of[key] = nb + first + i

    def _delete(self, keys: Sequence[Key]) -> int:
        dead = [p for p in (self._slot_of.pop(key, None) for key in keys) if p is not None]
        self._kill(np.asarray(dead, np.int64))
        return len(dead)

    def _kill(self, positions: np.ndarray) -> None:
        if not positions.size:
            return
        nb = self.base.n
        in_base = positions[positions < nb]
        if in_base.size:
            self.base.mask_columns(in_base)
            self.base_dead += int(in_base.size)
        self.app.kill(positions[positions >= nb] - nb)

    def get(self, keys: Sequence[Key]) -> list[np.ndarray | None]:
        """The stored (normalized) vector of each key, None for a key that is not live."""
        positions = [self._slot_of.get(key) for key in keys]
        found = np.asarray([p for p in positions if p is not None], np.int64)
        vectors = iter(self._vectors(found))
        return [None if p is None else next(vectors) for p in positions]

    def _vectors(self, positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_stored_columns(self.base, self.app, positions).T)

    # -- compaction: plan (engine thread), build (any thread), swap (engine thread) -------
    def plan_compaction(self) -> CompactionPlan:
        """Freeze the live set as of `applied_lsn`; later writes are replayed at the swap."""
        positions = np.fromiter(self._slot_of.values(), np.int64, len(self._slot_of))
        positions.sort()
        plan = CompactionPlan(
            self.applied_lsn, positions, self._key_at(positions), appended=self.app.used
        )
        self._plan = plan
        return plan

    def _key_at(self, positions: np.ndarray) -> np.ndarray:
        """Keys at positions (-1, an absent result, reads some key: the caller overwrites)."""
        nb = self.base.n
        in_base = positions < nb
        keys = np.empty(positions.shape, self._base_keys.dtype)
        keys[in_base] = self._base_keys[positions[in_base]]
        keys[~in_base] = self._app_keys[positions[~in_base] - nb]
        return keys

    def planned_rows(self, plan: CompactionPlan) -> PlannedRows:
        return PlannedRows(self, plan)

    def build_base(self, plan: CompactionPlan) -> Engine:
        """The new base engine over the plan's rows, warmed up, and its key index (slow:
        any thread; the rows it reads are never written again)."""
        engine = Engine(self.planned_rows(plan), self.config, masked=True)
        # Traced and run at small batches only: warming at max_batch while the old base
        # serves full batches would need two score matrices at once, and TensorFlow's CPU
        # pool never gives memory back (measured at 1M x 100: +512 MiB of RSS for good).
        engine.warmup(sizes=[2, 8])
        plan.slot_of = _positions_of(plan.keys)
        return engine

    def swap(self, plan: CompactionPlan, base: Engine) -> None:
        """Install the new base; rows written after the freeze move to a new appendable.
        Costs O(writes since the freeze), not O(N): the engine thread's pause is short."""
        self._plan = None
        slot_of = plan.slot_of
        stale = [slot_of.pop(key) for key in plan.touched if key in slot_of]
        if stale:
            base.mask_columns(np.asarray(stale, np.int64))
        nb = self.base.n
        later = [
            s
            for s in range(plan.appended, self.app.used)
            if self._slot_of.get(self._app_keys[s]) == nb + s
        ]  # still live, in write order
        keys = [self._app_keys[s] for s in later]
        vectors = self.app.vectors(np.asarray(later, np.int64))
        capacity = max(FIRST_CAPACITY, self.app.used - plan.appended)
        self.app = Appendable(self.dim, "float32", self.device, self._host, capacity)
        self._app_keys = key_array([], self.key_type)
        retired = self.base
        self._install(base, plan.keys, slot_of, dead=len(stale))
        retired.release()
        if later:
            self._upsert(keys, vectors)


def _grow_keys(keys: np.ndarray, first: int, new: Sequence[Key], key_type: str) -> np.ndarray:
    """The appendable's keys with `new` at first..: amortized doubling like its rows."""
    need = first + len(new)
    if need > keys.shape[0]:
        dtype = np.int64 if key_type == "int" else object
        grown = np.empty(max(need, 2 * keys.shape[0]), dtype)
        grown[:first] = keys[:first]
        keys = grown
    keys[first:need] = list(new)
    return keys


def _stored_columns(base: Engine, app: Appendable, positions: np.ndarray) -> np.ndarray:
    """(dim, m) float32 stored vectors at positions of `base` then `app`, as columns."""
    nb = base.n
    out = np.empty((base.dim, positions.size), np.float32)
    in_base = positions < nb
    if in_base.any():
        out[:, in_base] = base.column_vectors(positions[in_base])
    if (~in_base).any():
        out[:, ~in_base] = app.vectors(positions[~in_base] - nb).T
    return out


def _positions_of(keys: np.ndarray) -> dict[Key, int]:
    return dict(zip(keys.tolist(), range(keys.shape[0])))
