"""`--verify` under `--write-ratio`: each sampled answer against a float64 brute force over the
rows that may have been live when its batch ran.

What is known
-------------
The server's own rows (the --npy file or the demo set, `ServerMatrix`) are never written by
the load test (writes.py). Of each write w to one of its keys the load test knows the vector
and two client times: `sent_w`, taken before the frame left, and `acked_w`, taken after its
acknowledgement arrived (infinite when none did). The server applies w at some moment a_w with
sent_w < a_w < acked_w: it cannot apply a frame before receiving it, and it acknowledges a write
only once it is applied (docs/protocol.md, read-your-writes). Likewise a search sent at t0 whose
answer had arrived at t1 ran in one batch at some moment b with t0 < b < t1, and that batch saw
exactly the writes applied before it. (In an open loop t0 is the scheduled time, earlier than
the send: a wider window, so what follows still holds.)

The possible states of a key
----------------------------
The writes to one key never overlap (writes.py sends the next only after the previous one was
acknowledged, and none after one failed), so they apply in send order w_1, w_2, ..., w_m, and
the key holds w_j's vector from a_j until a_{j+1}, and nothing before a_1. At b it may hold
w_j's vector only if a_j < b < a_{j+1} is possible, that is if sent_j < t1 and acked_{j+1} > t0
(acked_{m+1} = infinity); it may be absent only if acked_1 > t0; it is certainly live if
acked_1 < t0. These sets contain the true state, whatever the server did within its
guarantees; `_possible` computes them (with <= and >=: a wider set).

The check, and why it is sound
------------------------------
Let T be the k-th returned score plus SCORE_TOLERANCE + NEAR_TIE when the answer holds k
results, and -infinity when it holds fewer (then every live row must be in it). An answer is
accepted only if:
  1. its keys are distinct, its scores do not increase, and it holds at most k results;
  2. every key is a server row, whose float64 score it matches within SCORE_TOLERANCE, or a key
     of ours with a possible present state whose float64 score it matches within
     SCORE_TOLERANCE (so no returned row is absent, deleted or scored against a vector it
     could not have held);
  3. no row that is certainly live and scores above T in every possible state (each server
     row; each key of ours acknowledged before t0) is missing from it.
A wrong answer either returns a row that was not live (fails 2), gives a row a score that is
not its score (fails 2), or leaves out a row that beats a returned one. A row whose state is
certain has one score, so it is held to the same tolerances as `check_answer` holds it: if it
is returned its score must match, and if it is left out while scoring above the k-th returned
score by more than the tolerances, 3 fails. A key whose write was in flight can only be checked
against every state it may have had: 2 holds it to one of them and 3 to the worst of them.
So every returned row, every score and every omission the check accepts is explained by a
state that row may have had during the batch; what it does not check is that one state of the
whole collection explains them all at once, which can only matter for rows whose writes were in
flight. It may reject a correct answer only in a chain of near-ties spanning more than the
tolerances (as check_answer may).

Recall under writes is the share of the rows that condition 3 requires that the answer holds.
"""

from __future__ import annotations

import numpy as np

from ..reference import NEAR_TIE, SCORE_TOLERANCE, unit_rows
from .report import Verification
from .run import TimedAnswer
from .verify import VERIFY_BLOCK, ServerMatrix
from .writes import KEY_BASE, WriteLog

TOLERANCE = SCORE_TOLERANCE + NEAR_TIE


class WriteHistory:
    """The run's writes as arrays: per write its slot, times, unit vector; per slot its writes."""

    def __init__(self, log: WriteLog, dim: int) -> None:
        n = len(log.slots)
        self.slots = np.array(log.slots, np.int64)
        self.sent = np.array(log.sent, np.float64)
        self.acked = np.array(log.acked, np.float64)
        self.units = unit_rows(np.stack(log.vectors)) if n else np.empty((0, dim))
        self.n_slots = int(self.slots.max()) + 1 if n else 0
        # Writes grouped by slot, each slot's in send order (= apply order, see above).
        self.order = np.lexsort((np.arange(n), self.slots))
        grouped = self.slots[self.order]
        self.starts = np.searchsorted(grouped, np.arange(self.n_slots))
        self.ends = np.searchsorted(grouped, np.arange(self.n_slots), side="right")
        self.next_acked = np.full(n, np.inf)
        same = grouped[1:] == grouped[:-1]
        self.next_acked[self.order[:-1][same]] = self.acked[self.order[1:][same]]
        self.first_acked = self.acked[self.order[self.starts]] if n else np.empty(0)

    def possible(self, sent: float, answered: float) -> np.ndarray:
        """Per write: whether its key may have held its vector during the batch."""
        return (self.sent <= answered) & (self.next_acked >= sent)

    def certain(self, sent: float) -> np.ndarray:
        """Per slot: certainly live during the batch (its first write acknowledged before)."""
        return self.first_acked < sent

    def writes_of(self, slot: int) -> np.ndarray:
        return self.order[self.starts[slot] : self.ends[slot]]


class LiveCheck:
    """Timed answers against the server's rows and the run's writes (module docstring)."""

    def __init__(self, matrix: ServerMatrix, log: WriteLog, k: int) -> None:
        self.matrix = matrix
        self.history = WriteHistory(log, matrix.matrix.shape[1])
        self.k = k
        base = np.full(matrix.rows, False)
        base[matrix.keep if matrix.keep is not None else slice(None)] = True
        self.base_live = base  # server rows by key (row number): live, never written

    def check(self, answers: list[TimedAnswer], queries: np.ndarray, multi: int) -> Verification:
        problems: list[str] = []
        recalls: list[float] = []
        rows = [(a, j) for a in answers for j in range(multi)]
        for start in range(0, len(rows), VERIFY_BLOCK):
            block = rows[start : start + VERIFY_BLOCK]
            q = queries[[a.frame * multi + j for a, j in block]]
            base = self.matrix.scores(q)
            own = unit_rows(q) @ self.history.units.T
            for i, (answer, j) in enumerate(block):
                ids, got = _one(answer, j, multi)
                recall, problem = self.check_one(answer, base[i], own[i], ids, got)
                recalls.append(recall)
                if problem:
                    problems.append(f"query {answer.frame * multi + j}: {problem}")
        mean = float(np.mean(recalls)) if recalls else None
        return Verification(len(rows), mean, not problems, len(problems), problems[:5])

    def check_one(
        self,
        answer: TimedAnswer,
        base: np.ndarray,
        own: np.ndarray,
        ids: np.ndarray,
        got: np.ndarray,
    ) -> tuple[float, str]:
        h = self.history
        possible = h.possible(answer.sent, answer.answered)
        problem = self._returned(ids, got, base, own, possible)
        threshold = float(got[-1]) + TOLERANCE if len(ids) == self.k else -np.inf
        need_base = np.flatnonzero(base > threshold)
        worst = np.where(possible, own, np.inf)[h.order]
        lowest = np.minimum.reduceat(worst, h.starts) if h.n_slots else np.empty(0)
        need_own = np.flatnonzero(h.certain(answer.sent) & (lowest > threshold)) + KEY_BASE
        needed = np.concatenate([need_base, need_own])
        missing = np.setdiff1d(needed, ids)
        recall = 1.0 - len(missing) / len(needed) if len(needed) else 1.0
        if not problem and missing.size:
            key = int(missing[0])
            score = base[key] if key < KEY_BASE else lowest[key - KEY_BASE]
            problem = (
                f"key {key} (score {score:.6f}) is missing, though it beats the last of the "
                f"{len(ids)} results ({got[-1]:.6f})"
                if len(ids)
                else f"key {key} is missing"
            )
        return recall, problem

    def _returned(
        self,
        ids: np.ndarray,
        got: np.ndarray,
        base: np.ndarray,
        own: np.ndarray,
        possible: np.ndarray,
    ) -> str:
        """Conditions 1 and 2 of the module docstring: "" or what is wrong."""
        if len(ids) > self.k:
            return f"{len(ids)} results, expected at most {self.k}"
        if len(set(ids.tolist())) != len(ids):
            return "a key came back twice"
        if np.any(np.diff(got.astype(np.float64)) > 0):
            return "scores are not in descending order"
        for key, score in zip(ids.tolist(), got.astype(np.float64).tolist()):
            if 0 <= key < len(base) and self.base_live[key]:
                if abs(score - base[key]) > SCORE_TOLERANCE:
                    return f"key {key}: score {score:.6f}, expected {base[key]:.6f}"
                continue
            slot = key - KEY_BASE
            if not 0 <= slot < self.history.n_slots:
                return f"key {key} is neither a row of the server's set nor one this run wrote"
            writes = self.history.writes_of(slot)
            states = own[writes[possible[writes]]]
            if not np.any(np.abs(states - score) <= SCORE_TOLERANCE):
                return (
                    f"key {key}: score {score:.6f} matches none of the "
                    f"{len(states)} vector(s) it could hold then"
                )
        return ""


def _one(answer: TimedAnswer, row: int, multi: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's keys and scores, absent results (a binary answer's -inf padding) left out."""
    ids, scores = answer.result
    if multi > 1:
        ids, scores = ids[row], scores[row]
    present = ~np.isneginf(scores)
    return ids[present], scores[present]
