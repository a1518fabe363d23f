"""Timing competing calls on a shared machine. No TensorFlow here: ScaNN's subprocess uses it."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

ROUNDS = 5  # each method's seconds are split into this many turns, taken in rotation


def time_calls(
    calls: dict[str, Callable[[], object]], seconds: float, rounds: int = ROUNDS
) -> dict[str, float]:
    """Median seconds per call of each method, timed for `seconds` each (at least 3 calls).

    Each is called once untimed, then the methods take turns of seconds/rounds, so a burst of
    other work on a shared machine lands on all of them alike; the median rather than the mean
    keeps such bursts from deciding the figure.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for turn in range(rounds):
        for name, call in calls.items():
            deadline = time.perf_counter() + seconds / rounds
            while time.perf_counter() < deadline or (turn == rounds - 1 and len(times[name]) < 3):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t)) for name, t in times.items()}
