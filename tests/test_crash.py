"""kill -9 at random moments while several connections pipeline writes: after each restart
every acknowledged write is there with its last acknowledged vector, and no deleted key comes
back (reliability/crash.py runs 20 cycles; this runs 5)."""

from __future__ import annotations

from pathlib import Path

from reliability import crash


def test_no_acknowledged_write_is_lost_over_five_kill_9_cycles(tmp_path: Path):
    outcome = crash.run(cycles=5, workdir=tmp_path, seed=1)
    assert outcome.problems == []
    assert outcome.cycles == 5 and outcome.acked_writes > 100


def test_the_check_catches_a_lost_write(tmp_path: Path):
    """The same run, but the log's newest records are cut away after the kill: the check
    must report acknowledged writes as missing (so a passing run means something)."""

    def lose_the_log_tail(data: Path) -> None:
        newest = max((data / "wal").glob("wal-*.log"))
        size = newest.stat().st_size
        with newest.open("r+b") as log:
            log.truncate(max(size - 4096, 16))

    outcome = crash.run(cycles=1, workdir=tmp_path, seed=2, after_kill=lose_the_log_tail)
    assert outcome.problems, "acknowledged writes were cut from the log, yet nothing was found"
