"""The engine's working memory stays bounded by one search's needs, whatever the mix of batch
sizes. Run in a fresh process: TensorFlow's CPU memory pool is per process and never shrinks,
so other tests' searches would blur the measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import assert_exact

from flasma_ws.vectors import load_matrix, open_targets


def run_fresh(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The script in a new interpreter (its own TensorFlow pool); it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


SCRIPT = """
import json, numpy as np
from flasma_ws.engine import Engine, EngineConfig
from flasma_ws.vectors import open_targets

def rss_mib():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

engine = Engine(open_targets(None, 16, demo_size=400_000, demo_seed=0),
                EngineConfig(device="cpu", max_batch=128))
before = rss_mib()
rng = np.random.default_rng(0)
for batch in [*engine.warmup_batches, *rng.integers(1, 129, 40)]:
    queries = rng.standard_normal((int(batch), 16), dtype=np.float32)
    engine.search(queries, int(rng.integers(1, 101)))
print(json.dumps({"growth": rss_mib() - before}))
"""


def test_mixed_batches_reuse_one_score_matrix() -> None:
    """One (128, 400k) float32 score matrix is 195 MiB. TensorFlow's pool used to settle at
    about twice that under mixed batch sizes; reserved up front it stays within one search's
    needs: the scores, an eighth more for the top-k and matmul buffers, and 72 MiB of slack."""
    growth = json.loads(run_fresh(SCRIPT).stdout.strip().splitlines()[-1])["growth"]
    score_mib = 128 * 400_000 * 4 / 2**20
    assert growth < score_mib * 1.125 + 32 + 40, f"RSS grew {growth:.0f} MiB"


CAPPED = """
import logging, sys, numpy as np
logging.basicConfig(level=logging.WARNING)
from flasma_ws.engine import Engine, EngineConfig
from flasma_ws.vectors import open_targets

engine = Engine(open_targets(None, 16, demo_size=50_000, demo_seed=1),
                EngineConfig(device="cpu", max_batch=128))
queries = np.random.default_rng(2).standard_normal((128, 16), dtype=np.float32)
rows, scores = engine.search(queries, 5)
np.savez(sys.argv[1], queries=queries, rows=rows, scores=scores)
"""


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_a_pool_too_small_for_the_reservation_only_warns(tmp_path: Path, onednn: str) -> None:
    """The up-front block is an optimization: where TensorFlow's pool is capped below it (here
    100 MB against 115 MiB asked), the engine says so and searches as before. The cap and the
    pool are oneDNN's: without oneDNN the allocator frees to the system, the engine reserves
    nothing, and no warning is due. Both are set explicitly, so this holds on every CPU."""
    out = tmp_path / "answers.npz"
    env = {
        **os.environ,
        "TF_MKL_ALLOC_MAX_BYTES": str(100_000_000),
        "TF_ENABLE_ONEDNN_OPTS": onednn,
    }
    done = run_fresh(CAPPED, str(out), env=env)
    assert ("Could not reserve" in done.stderr) == (onednn == "1"), done.stderr[-2000:]
    answers = np.load(out)
    matrix = load_matrix(open_targets(None, 16, demo_size=50_000, demo_seed=1))
    assert_exact(matrix, answers["queries"], answers["rows"], answers["scores"], 5)
