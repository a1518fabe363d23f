"""benchmarks/targets.py works end to end (tiny sizes). It reports; it never asserts speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"


def test_targets_smoke_measures_every_target(tmp_path):
    out = tmp_path / "targets.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--json-out",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    names = " ".join(c["name"] for c in checks)
    for target in ("P1", "P2", "P3", "P4", "P5", "P6", "P7"):
        assert target in names
    assert all(c["measured"] == c["measured"] and c["measured"] is not None for c in checks)
    assert "target >=" in result.stdout and "target <=" in result.stdout
