"""The batcher's queue, fair across flows. Pure data structure: no asyncio, no engine.

A *flow* is one client connection (a WebSocket, or one keep-alive HTTP connection to /cos).
Queries are counted in rows: a multi-query frame of 50 rows weighs 50.

Batch formation: deficit round-robin over the flows that have work
------------------------------------------------------------------
`take(room)` visits the active flows in a ring, in rounds. A round visits each of the F
flows active at its start once and gives each a quantum of max(1, room_left // F) rows, taken
from its oldest request first (a request may be split across batches, as before). A flow
with less work than its quantum takes what it has and leaves the ring; what is left unused
goes to the next round, among the flows still active.
The ring keeps its position between calls, so the flow cut short by a full batch is first
in the next one. Consequences: a lone flow still gets whole batches (its quantum is the whole
room); with F active flows each gets at least floor(room / F) rows of every batch it has
work for, whatever the others hold; and within a flow the order stays first-in, first-out.

Admission: refuse the heaviest flow, not the newcomer
-----------------------------------------------------
The queue holds at most `capacity` rows. A request of c rows from flow f that does not fit
is admitted if f stays within its fair share S = capacity / A, where A counts the flows
holding queued rows, f included: rows(f) + c <= S. Room is then made by evicting the newest
not-yet-started requests of the heaviest flow, repeatedly. Why the heaviest flow is never f,
and always has rows to give: while total + c > capacity = A S, the other flows together hold
total - rows(f) > A S - c - rows(f) >= (A - 1) S rows, spread over at most A - 1 flows, so
one of them holds more than S >= rows(f) + c rows: it is heavier than f. (Evictions only
lower A, which raises S, so the condition on f keeps holding.) A request over its flow's
share that does not fit is refused itself. Hence: a flow within its fair share is never
refused because of another's backlog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Request(Protocol):
    count: int  # query rows in all
    started: int  # rows already handed to a batch


R = TypeVar("R", bound=Request)


@dataclass(slots=True)
class Slice(Generic[R]):
    request: R
    start: int
    stop: int


@dataclass(eq=False)
class _Flow(Generic[R]):
    key: Hashable
    requests: deque[R] = field(default_factory=deque)
    rows: int = 0  # rows queued and not yet handed out


class FairQueue(Generic[R]):
    """Requests queued per flow; batches formed by deficit round-robin over query rows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows = 0  # all flows' queued rows
        self._flows: dict[Hashable, _Flow[R]] = {}
        self._ring: deque[_Flow[R]] = deque()  # the flows with queued rows, in visiting order

    @property
    def active_flows(self) -> int:
        return len(self._ring)

    def rows_of(self, key: Hashable) -> int:
        flow = self._flows.get(key)
        return flow.rows if flow is not None else 0

    def requests(self) -> Iterator[R]:
        for flow in self._ring:
            yield from flow.requests

    # -- admission -----------------------------------------------------------------------
    def within_share(self, key: Hashable, count: int) -> bool:
        """Whether `count` more rows keep the flow within capacity / active flows."""
        active = self.active_flows + (0 if self.rows_of(key) else 1)
        return (self.rows_of(key) + count) * active <= self.capacity

    def make_room(self, key: Hashable, count: int) -> list[R] | None:
        """Room for `count` more rows of flow `key`: [] where they fit; else the heaviest
        flows' newest unstarted requests, evicted (see the module docstring) for the caller
        to refuse; None (and nothing evicted) when the flow is over its share or no room can
        be made."""
        if self.rows + count <= self.capacity:
            return []
        if not self.within_share(key, count):
            return None
        evicted: list[tuple[Hashable, R]] = []
        while self.rows + count > self.capacity:
            victim = self._heaviest_evictable(key)
            if victim is None:  # only started requests left to others: undo, refuse
                for victim_key, request in reversed(evicted):
                    self.push(victim_key, request)
                return None
            request = victim.requests.pop()
            self._forget(victim, request.count)
            evicted.append((victim.key, request))
        return [request for _, request in evicted]

    def _heaviest_evictable(self, key: Hashable) -> _Flow[R] | None:
        """The heaviest other flow whose newest request has not started (its first rows
        computed, a request can no longer be refused)."""
        others = [f for f in self._ring if f.key != key and not f.requests[-1].started]
        return max(others, key=lambda flow: flow.rows, default=None)

    # -- queueing --------------------------------------------------------------------------
    def push(self, key: Hashable, request: R) -> None:
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(key)
        if not flow.requests:
            self._ring.append(flow)
        flow.requests.append(request)
        flow.rows += request.count - request.started
        self.rows += request.count - request.started

    def take(self, room: int, keep: Callable[[R], bool]) -> list[Slice[R]]:
        """Up to `room` rows by deficit round-robin over the active flows. `keep` is asked
        once about each request before its first row is taken; one it declines is dropped
        (the caller has answered it)."""
        slices: list[Slice[R]] = []
        while room > 0 and self._ring:
            visits = len(self._ring)  # one round: every active flow once, the same quantum
            quantum = max(1, room // visits)
            for _ in range(visits):
                if room == 0 or not self._ring:
                    break
                flow = self._ring[0]
                room -= self._take_from(flow, min(quantum, room), keep, slices)
                if flow.requests:
                    self._ring.rotate(-1)
        return slices

    def _take_from(
        self, flow: _Flow[R], quantum: int, keep: Callable[[R], bool], into: list[Slice[R]]
    ) -> int:
        """Up to `quantum` rows from one flow, oldest request first; rows taken."""
        taken = 0
        while taken < quantum and flow.requests:
            request = flow.requests[0]
            if request.started == 0 and not keep(request):
                flow.requests.popleft()
                self._forget(flow, request.count)
                continue
            width = min(request.count - request.started, quantum - taken)
            into.append(Slice(request, request.started, request.started + width))
            request.started += width
            taken += width
            if request.started == request.count:
                flow.requests.popleft()
            self._forget(flow, width)
        return taken

    def _forget(self, flow: _Flow[R], rows: int) -> None:
        """`rows` of the flow left the queue; a flow with nothing queued leaves the ring."""
        flow.rows -= rows
        self.rows -= rows
        if not flow.requests:
            if self._ring[0] is flow:  # the usual case, in take(): O(1)
                self._ring.popleft()
            else:
                self._ring.remove(flow)
            del self._flows[flow.key]
