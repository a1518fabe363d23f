"""The live engine (base + appendable + deletion mask, compaction) against a dict model:
every search exact against a float64 brute force over the rows live at that moment."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from reference import assert_exact_scores, reference_scores

from flasma_ws.engine import Engine, EngineConfig, unit_queries
from flasma_ws.live_engine import MISSING_INT, LiveEngine
from flasma_ws.vectors import open_targets

DIM, BASE_N, MAX_K = 8, 40, 12
CONFIG = EngineConfig(device="cpu", max_batch=8, max_k=MAX_K, top_k=5, block_size=4)
# Few distinct directions: many exact duplicates and equal scores, the hard case for ties.
DIRECTIONS = np.random.default_rng(7).standard_normal((6, DIM)).astype(np.float32)

vectors = st.one_of(
    st.integers(0, len(DIRECTIONS) - 1).map(lambda i: DIRECTIONS[i]),
    st.lists(st.floats(-1, 1, width=32), min_size=DIM, max_size=DIM)
    .map(lambda v: np.array(v, np.float32))
    .filter(lambda v: np.abs(v).max() > 1e-3),
)
keys = st.integers(0, 80)


def live_engine(base_rows: np.ndarray, masked_keys: np.ndarray) -> LiveEngine:
    from flasma_ws.vectors import Targets, source_from_array

    targets = Targets(source_from_array(base_rows, "test"))
    return LiveEngine(Engine(targets, CONFIG, masked=True), masked_keys, "int", CONFIG)


class LiveModel(RuleBasedStateMachine):
    """A dict in position order (a re-upserted key moves to the end) is the whole model."""

    @initialize()
    def load(self) -> None:
        rng = np.random.default_rng(0)
        base = rng.standard_normal((BASE_N, DIM)).astype(np.float32)
        base[5] = base[9] = base[17]  # duplicates in the base
        self.engine = live_engine(base, np.arange(BASE_N, dtype=np.int64))
        self.model: dict[int, np.ndarray] = dict(enumerate(unit_queries(base)))
        self.lsn = 0
        self.plan = None

    def _apply(self, upserts: list[tuple[int, np.ndarray]], deletes: list[int]) -> None:
        self.lsn += 1
        ukeys = [k for k, _ in upserts]
        rows = unit_queries(np.stack([v for _, v in upserts])) if upserts else np.empty((0, DIM))
        self.engine.apply(self.lsn, ukeys, rows.astype(np.float32), deletes)
        for key, row in zip(ukeys, rows.astype(np.float32)):
            self.model.pop(key, None)
            self.model[key] = row
        for key in deletes:
            self.model.pop(key, None)

    @rule(items=st.dictionaries(keys, vectors, min_size=1, max_size=5))
    def upsert(self, items: dict[int, np.ndarray]) -> None:
        self._apply(list(items.items()), [])

    @rule(doomed=st.lists(keys, min_size=1, max_size=5, unique=True))
    def delete(self, doomed: list[int]) -> None:
        self._apply([], doomed)

    @rule(wanted=st.lists(keys, min_size=1, max_size=4))
    def get(self, wanted: list[int]) -> None:
        for key, got in zip(wanted, self.engine.get(wanted)):
            if key in self.model:
                assert got is not None and np.array_equal(got, self.model[key])
            else:
                assert got is None

    @rule(
        queries=st.lists(vectors, min_size=1, max_size=10),
        k=st.integers(1, MAX_K),
    )
    def search(self, queries: list[np.ndarray], k: int) -> None:
        found, scores = self.engine.search(np.stack(queries), k)
        assert found.shape == scores.shape == (len(queries), k)
        model_keys = list(self.model)
        live = min(k, len(model_keys))
        assert (found[:, live:] == MISSING_INT).all() and np.isneginf(scores[:, live:]).all()
        if not model_keys:
            return
        matrix = np.stack(list(self.model.values()))
        index = {key: i for i, key in enumerate(model_keys)}
        assert set(found[:, :live].ravel().tolist()) <= index.keys(), "a dead key came back"
        rows = np.vectorize(index.__getitem__, otypes=[np.int64])(found[:, :live])
        ref = reference_scores(matrix, np.stack(queries))
        assert_exact_scores(ref, rows, scores[:, :live], live)

    @rule()
    def start_compaction(self) -> None:
        if self.plan is None and self.engine.n:
            self.plan = self.engine.plan_compaction()

    @rule()
    def finish_compaction(self) -> None:
        if self.plan is not None:
            plan, self.plan = self.plan, None
            self.engine.swap(plan, self.engine.build_base(plan))

    @invariant()
    def counts_agree(self) -> None:
        assert self.engine.n == len(self.model)


LiveModel.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLiveModel = LiveModel.TestCase


def test_upsert_replaces_and_delete_removes_from_results():
    rows = np.eye(DIM, dtype=np.float32)[:4]
    engine = live_engine(rows, np.arange(4, dtype=np.int64))
    query = np.eye(DIM, dtype=np.float32)[[0]]
    assert engine.search(query, 1)[0][0, 0] == 0
    engine.apply(1, [0], np.eye(DIM, dtype=np.float32)[[1]], [])  # key 0 now points along e1
    engine.apply(2, [], np.empty((0, DIM), np.float32), [1])
    found, scores = engine.search(query, 4)
    assert 0 not in found[0, :1] and 1 not in found[0].tolist()
    assert engine.n == 3 and engine.base_dead == 2


@pytest.mark.parametrize("key_type", ["str"])
def test_string_keys(key_type: str):
    rows = open_targets(None, DIM, demo_size=30).source.rows(0, 30)
    names = np.array([f"doc-{i}" for i in range(30)], object)
    from flasma_ws.vectors import Targets, source_from_array

    base = Engine(Targets(source_from_array(rows, "t")), CONFIG, masked=True)
    engine = LiveEngine(base, names, key_type, CONFIG)
    engine.apply(1, ["new"], unit_queries(rows[[3]]), ["doc-3"])
    found, _ = engine.search(rows[[3]], 2)
    assert found[0, 0] == "new" and "doc-3" not in found[0].tolist()


def test_a_retired_narrow_base_is_freed_though_start_up_objects_are_frozen():
    """The server freezes start-up objects out of the collector's sight (service.py): a
    bfloat16 base's certified search, in a reference cycle through its traced graph, must
    still let go of its float32 copy and of the narrow matrix when a compaction retires it."""
    import dataclasses
    import gc
    import weakref

    from flasma_ws.vectors import Targets, source_from_array

    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    rows = np.random.default_rng(3).standard_normal((BASE_N, DIM)).astype(np.float32)
    base = Engine(Targets(source_from_array(rows, "test")), config, masked=True)
    live = LiveEngine(base, np.arange(BASE_N), "int", config)
    queries = unit_queries(np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32))
    live.search(queries, 5)  # traces the certified graph
    assert base.certified is not None
    copy, matrix = weakref.ref(base.certified.rows32), weakref.ref(base._slab_tensors[0])
    gc.freeze()
    try:
        live.apply(1, [BASE_N], unit_queries(rows[:1] + 1), [0])
        plan = live.plan_compaction()
        live.swap(plan, live.build_base(plan))
        live.search(queries, 5)
        gc.collect()
        assert live.base is not base
        assert copy() is None, "the retired base's float32 copy is still alive"
        assert matrix() is None, "the retired base's narrow matrix is still alive"
    finally:
        gc.unfreeze()
