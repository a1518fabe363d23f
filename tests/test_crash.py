"""kill -9 at random moments while several connections pipeline writes: after each restart
every acknowledged write is there with its last acknowledged vector, and no deleted key comes
back (reliability/crash.py runs 20 cycles; this runs 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reliability import crash


def test_no_acknowledged_write_is_lost_over_five_kill_9_cycles(tmp_path: Path):
    outcome = crash.run(cycles=5, workdir=tmp_path, seed=1)
    assert outcome.problems == []
    assert outcome.cycles == 5 and outcome.acked_writes > 100


def test_the_check_catches_a_lost_or_stale_write():
    """The check itself can fail: an acknowledged write that is missing after the restart,
    or an older state than the last acknowledged one, is reported; a later, unacknowledged
    write that did reach the log is accepted."""
    first, second, third = (np.full(crash.DIM, v, np.float32) for v in (0.1, 0.2, 0.3))
    history = crash.KeyHistory(states=[first, second, third], acked=1, before=None)
    keys = {1: history}
    assert crash.check(keys, {1: second}) == []
    assert crash.check(keys, {1: third}) == []  # sent after the ack, logged before the kill
    assert crash.check(keys, {1: first})  # older than the acknowledged state
    assert crash.check(keys, {1: None})  # the acknowledged write is gone
    deleted = crash.KeyHistory(states=[first, crash.DELETED], acked=1, before=None)
    assert crash.check({2: deleted}, {2: first})  # an acknowledged delete undone
