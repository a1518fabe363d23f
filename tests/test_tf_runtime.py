"""oneDNN is on in every engine process unless the user's environment says otherwise, on every
CPU (TensorFlow's own default turns it on only on CPUs with AVX512_VNNI, AVX512_BF16,
AVX_VNNI or AMX). Fresh processes: TensorFlow reads the switch once, at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json
import flasma_ws.engine
from flasma_ws.tf_runtime import onednn_state
from tensorflow.python.util import _pywrap_util_port
print(json.dumps([onednn_state().describe(), bool(_pywrap_util_port.IsMklEnabled())]))
"""


def probe(user_value: str | None) -> tuple[dict[str, object], bool]:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    state, tensorflow_says = json.loads(done.stdout.strip().splitlines()[-1])
    return state, tensorflow_says


@pytest.mark.parametrize(
    ("user_value", "enabled", "chosen_by"),
    [(None, True, "flasma-ws"), ("0", False, "environment"), ("1", True, "environment")],
)
def test_onednn_default_and_the_users_choice(
    user_value: str | None, enabled: bool, chosen_by: str
) -> None:
    state, tensorflow_says = probe(user_value)
    assert state == {"enabled": enabled, "chosen_by": chosen_by}
    assert tensorflow_says is enabled  # the state reported is the one TensorFlow applies


IMPORT_WITH_A_LOG_LINE = """
import logging, threading, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
beside = threading.Thread(target=lambda: (time.sleep(0.5), logging.info("our own line")))
beside.start()
import flasma_ws.engine
beside.join()
logging.info("after the import")
"""


@pytest.mark.parametrize("level", [None, "0"])
def test_tensorflow_start_up_lines_follow_the_log_level(level: str | None) -> None:
    """TensorFlow's lines from loading its libraries ignore TF_CPP_MIN_LOG_LEVEL; the import
    filters them by it, and lets everything else written meanwhile through."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_WITH_A_LOG_LINE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "our own line" in done.stderr and "after the import" in done.stderr
    chatter = "oneDNN custom operations are on"  # printed while oneDNN's library loads
    assert (chatter in done.stderr) == (level == "0"), done.stderr[-2000:]
