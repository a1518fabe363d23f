"""`--write-ratio R`: upserts mixed into the load, their acknowledgements timed, and (for
--verify) every write's vector and times kept.

A fraction R of the frames sent are upserts of one row each. Half of them (when there is one)
re-upsert a key this run wrote earlier whose last write is acknowledged and none is in flight,
the others write a new key. The load test owns the keys KEY_BASE + 0, 1, 2, ...: far above the
row numbers of any --npy file or demo set, and below 2^53, so a JSON answer (which the client
reads as float64) carries them exactly. It never writes a key of the server's own rows, never has
two writes to one key in flight, and never writes a key again once a write to it failed: so the
writes to a key took effect in the order they were sent (`live_verify` relies on all three).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

KEY_BASE = 1 << 52
REUSE_SHARE = 0.5  # of the upserts, when an idle key of ours exists: re-upserts of it
NEVER = float("inf")  # the ack time of a write not (or never) acknowledged


@dataclass(frozen=True, slots=True)
class Upsert:
    """One upsert frame being sent: its key (number `slot` of ours), vector and log entry."""

    slot: int
    vector: np.ndarray  # (dim,) float32, as sent (the server normalizes it)
    number: int  # its index in WriteLog, or -1 when no log is kept
    measured: bool
    since: float  # the send (or, in an open loop, the scheduled) time

    @property
    def key(self) -> int:
        return KEY_BASE + self.slot


@dataclass
class WriteLog:
    """Every write of the run in send order, for --verify: key slot, vector, times.

    `sent` is taken before the frame leaves and `acked` after its acknowledgement arrived, so
    the server received the write after `sent` and applied it before `acked`."""

    slots: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    acked: list[float] = field(default_factory=list)  # NEVER: not acknowledged


@dataclass
class WriteRecorder:
    """Acknowledgement latencies and errors of the writes sent while measuring."""

    latencies: list[float] = field(default_factory=list)  # seconds per write frame
    errors: Counter[str] = field(default_factory=Counter)  # write frames by error code
    sent: int = 0
    acknowledged: int = 0
    in_flight: int = 0  # any phase
    last_done: float = 0.0


class Writer:
    """Decides which requests are writes, picks their keys and vectors, records the answers."""

    def __init__(self, ratio: float, dim: int, seed: int, keep_log: bool) -> None:
        self.ratio = ratio
        self.dim = dim
        self._credit = 0.0
        self._vectors = np.random.default_rng([seed, 14])
        self._pick = random.Random(seed)
        self._slots = 0  # our keys so far: KEY_BASE + 0 .. _slots - 1
        self._idle: list[int] = []  # slots acknowledged with no write in flight
        self.failed: set[int] = set()  # slots never written again (a write's fate unknown)
        self.recorder = WriteRecorder()
        self.log = WriteLog() if keep_log else None

    @property
    def written(self) -> int:
        """Keys this run has written to (or tried to)."""
        return self._slots

    def due(self) -> bool:
        """Whether the next request is a write: exactly a share `ratio` of them, evenly spread."""
        self._credit += self.ratio
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False

    def begin(self, measured: bool, since: float | None = None) -> Upsert:
        """The next upsert: a re-upsert of an idle key of ours, or a new key."""
        if self._idle and self._pick.random() < REUSE_SHARE:
            i = self._pick.randrange(len(self._idle))
            self._idle[i], self._idle[-1] = self._idle[-1], self._idle[i]
            slot = self._idle.pop()
        else:
            slot, self._slots = self._slots, self._slots + 1
        vector = self._vectors.standard_normal(self.dim, dtype=np.float32)
        now = time.perf_counter() if since is None else since
        number = -1
        if self.log is not None:
            number = len(self.log.slots)
            self.log.slots.append(slot)
            self.log.vectors.append(vector)
            self.log.sent.append(now)
            self.log.acked.append(NEVER)
        self.recorder.in_flight += 1
        if measured:
            self.recorder.sent += 1
        return Upsert(slot, vector, number, measured, now)

    def settle(self, upsert: Upsert, code: str, counted: bool = True) -> None:
        """The answer arrived ("ok") or the write failed (a code): record it, free the key.
        A failed write may still have been applied (a lost connection), so its key is never
        written again and its log entry stays unacknowledged. `counted=False`: a failure of
        ours (the run closed its connections), not the server's."""
        now = time.perf_counter()
        recorder = self.recorder
        recorder.in_flight -= 1
        if code == "ok":
            if self.log is not None:
                self.log.acked[upsert.number] = now
            self._idle.append(upsert.slot)
        else:
            self.failed.add(upsert.slot)
        if not (upsert.measured and counted):
            return
        recorder.last_done = now
        if code == "ok":
            recorder.acknowledged += 1
            recorder.latencies.append(now - upsert.since)
        else:
            recorder.errors[code] += 1

    def keys(self) -> list[int]:
        """Every key this run wrote to (to delete them after it)."""
        return [KEY_BASE + slot for slot in range(self._slots)]


def upsert_outcome(answer: dict) -> str:
    """ "ok" for {"upserted": 1}; else the code of the item's error."""
    errors = answer.get("errors")
    if errors:
        return str(errors[0].get("code", "bad_answer"))
    return "ok" if answer.get("upserted") == 1 else "bad_answer"
