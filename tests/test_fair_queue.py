"""The fair queue with plain objects: batch formation by deficit round-robin over rows, and
admission that refuses the heaviest flow, not a newcomer within its share."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from flasma_ws.fair_queue import FairQueue, Slice


@dataclass(eq=False)
class Req:
    flow: int
    count: int
    serial: int
    started: int = 0
    slices: list[tuple[int, int]] = field(default_factory=list)


def keep_all(_: Req) -> bool:
    return True


def record(slices: list[Slice[Req]]) -> int:
    for s in slices:
        s.request.slices.append((s.start, s.stop))
    return sum(s.stop - s.start for s in slices)


def test_a_lone_flow_gets_whole_batches_in_order() -> None:
    queue: FairQueue[Req] = FairQueue(1000)
    requests = [Req(0, 50, i) for i in range(5)]
    for r in requests:
        queue.push(0, r)
    first = queue.take(128, keep_all)
    assert [(s.request.serial, s.start, s.stop) for s in first] == [
        (0, 0, 50),
        (1, 0, 50),
        (2, 0, 28),
    ]
    assert record(queue.take(128, keep_all)) == 122 and queue.rows == 0


def test_a_light_flow_is_served_in_the_next_batch_behind_a_heavy_one() -> None:
    queue: FairQueue[Req] = FairQueue(100_000)
    for i in range(80):  # a heavy flow: 80 frames of 128 rows
        queue.push("heavy", Req(0, 128, i))
    queue.take(128, keep_all)  # a batch is running
    light = Req(1, 1, 0)
    queue.push("light", light)
    batch = queue.take(128, keep_all)
    assert any(s.request is light for s in batch)  # not after 80 batches: now
    assert sum(s.stop - s.start for s in batch) == 128  # and the batch is still full


def test_a_skipped_request_is_dropped_and_the_next_one_taken() -> None:
    queue: FairQueue[Req] = FairQueue(100)
    gone, live = Req(0, 3, 0), Req(0, 2, 1)
    queue.push(0, gone)
    queue.push(0, live)
    slices = queue.take(10, lambda r: r is not gone)
    assert [(s.request, s.start, s.stop) for s in slices] == [(live, 0, 2)]
    assert queue.rows == 0 and queue.active_flows == 0


flows_and_sizes = st.lists(
    st.tuples(st.integers(0, 4), st.integers(1, 40)), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(flows_and_sizes, st.integers(1, 64))
def test_every_row_is_taken_once_in_order_within_each_flow(pushes, room) -> None:
    queue: FairQueue[Req] = FairQueue(10**9)
    requests = [Req(flow, count, i) for i, (flow, count) in enumerate(pushes)]
    for r in requests:
        queue.push(r.flow, r)
    order: list[Req] = []
    while queue.rows:
        before = queue.rows
        active = {r.flow: queue.rows_of(r.flow) for r in requests if queue.rows_of(r.flow)}
        slices = queue.take(room, keep_all)
        got: dict[int, int] = {}
        for s in slices:
            got[s.request.flow] = got.get(s.request.flow, 0) + s.stop - s.start
            if s.start == 0:
                order.append(s.request)
        assert record(slices) == min(room, before)
        for flow, queued in active.items():  # each flow gets its share of every batch
            assert got.get(flow, 0) >= min(queued, room // len(active))
    for r in requests:  # each request's rows once, in order, contiguous
        assert r.slices[0][0] == 0 and r.slices[-1][1] == r.count
        assert all(a[1] == b[0] for a, b in zip(r.slices, r.slices[1:]))
    for flow in {r.flow for r in requests}:  # first-in, first-out within a flow
        serials = [r.serial for r in order if r.flow == flow]
        assert serials == sorted(serials)


@settings(max_examples=300, deadline=None)
@given(flows_and_sizes, st.integers(10, 200))
def test_admission_never_refuses_a_flow_within_its_share(pushes, capacity) -> None:
    queue: FairQueue[Req] = FairQueue(capacity)
    for i, (flow, count) in enumerate(pushes):
        request = Req(flow, count, i)
        within = queue.within_share(flow, count)
        own = queue.rows_of(flow)
        before = {r.flow: queue.rows_of(r.flow) for r in queue.requests()}
        if queue.rows + count <= capacity:
            queue.push(flow, request)
            continue
        evicted = queue.make_room(flow, count)
        if within:
            assert evicted is not None  # never refused because of another's backlog
            assert all(r.flow != flow for r in evicted)
        if evicted is None:
            assert not within
            continue
        assert all(r.started == 0 for r in evicted)
        assert all(before[r.flow] > own + count for r in evicted)  # only heavier flows pay
        queue.push(flow, request)
        assert queue.rows <= capacity
