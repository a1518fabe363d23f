"""The load generator behind `flasma-ws loadtest`, built on the Python client (flasma_ws.client).

    config.py     LoadConfig (validated) and --sweep
    remote.py     the server under load: /info and /metrics
    workload.py   the query pool and its frames, encoded once before the run
    transport.py  one Transport per connection (WebSocket or POST /cos): send -> future
    run.py        the closed and open loops, the recorder, warm-up / measure / drain
    verify.py     --verify: answers against a float64 brute force over the server's matrix
    writes.py     --write-ratio: the upserts mixed into the load, their keys, times and vectors
    live_verify.py  --verify under writes: answers against every state a row may have had
    report.py     RunReport / SweepReport and their --json-out document
    runner.py     run_load: probe, run (or sweep), verify, report

Tables and plots are drawn by the CLI (flasma_ws/cli/loadtest.py).
"""

from ..reference import check_answer
from .config import LoadConfig, parse_sweep
from .remote import ServerUnderTest, http_base, probe
from .report import (
    Report,
    RunReport,
    SweepReport,
    WriteReport,
    is_exact,
    nothing_acknowledged,
    nothing_answered,
)
from .run import LiveStatus
from .runner import run_load, run_once

__all__ = [
    "LiveStatus",
    "LoadConfig",
    "Report",
    "RunReport",
    "ServerUnderTest",
    "SweepReport",
    "WriteReport",
    "check_answer",
    "http_base",
    "is_exact",
    "nothing_acknowledged",
    "nothing_answered",
    "parse_sweep",
    "probe",
    "run_load",
    "run_once",
]
