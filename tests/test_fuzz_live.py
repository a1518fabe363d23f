"""A short run of reliability/fuzz.py against a real server: mutated frames (text and
binary) never crash it, and each is answered exactly once with a valid code.

The full run (100,000 frames) and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flasma_ws.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reliability/ is a folder of scripts beside the package
    sys.path.insert(0, str(ROOT))

from reliability import fuzz  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(fuzz.server_settings()) as running:
        yield running


def test_short_fuzz_run_has_no_violations(server):
    report = fuzz.run(fuzz.Config(frames=3000, seed=0, url=server.url))
    assert report.violations == [], report.summary()
    assert report.frames == 3000 and sum(report.answers.values()) == 3000
    assert report.healthz == 200
    assert report.answers["result"] > 300  # the controls and the harmless mutations
    assert {"bad_json", "bad_request", "bad_dimension", "bad_value"} <= set(report.answers)
    assert set(report.mutators) == fuzz.ALL_MUTATORS | {"control"}


@pytest.mark.parametrize("mutator", ["surrogate_id", "bigint_id_nan", "nested_rows"])
def test_mutators_that_found_server_bugs(server, mutator):
    """Each of these once lost answers, closed connections or failed other clients' queries."""
    config = fuzz.Config(
        frames=300, connections=2, url=server.url, only=frozenset({mutator}), answer_timeout_s=5
    )
    report = fuzz.run(config)
    assert report.violations == [], report.summary()
    assert report.mutators[mutator] > 50
