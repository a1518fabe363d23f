"""TensorFlow's process-wide switches, set before TensorFlow is first imported.

Import this module before `import tensorflow` (the engine does). An explicit value in the
environment always wins; `onednn_state()` says which value is in force and who chose it.

oneDNN: TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX (`DefaultOneDnnPolicy`, tensorflow/core/util/port.cc). Elsewhere
float32 MatMul runs on Eigen: on an AVX2-only AMD EPYC (Zen 3) a (128 x 100) @ (100 x 100k)
product ran at ~24 GFLOP/s against ~69 with oneDNN, and the engine at batch 128 gave 1,415
against 4,631 q/s (docs/benchmarks.md). oneDNN is therefore on unless the user says otherwise.

Log level: TF_CPP_MIN_LOG_LEVEL=2 hides TensorFlow's C++ INFO and WARNING lines (lines
logged before absl's logging is initialized still reach stderr).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
LOG_LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"

_USER_ONEDNN = os.environ.get(ONEDNN_VAR)  # read before we set our default
_IMPORTED_FIRST = "tensorflow" in sys.modules  # then our defaults came too late


@dataclass(frozen=True)
class OneDnnState:
    enabled: bool
    chosen_by: str  # "flasma-ws" (our default) or "environment" (TF_ENABLE_ONEDNN_OPTS)

    def describe(self) -> dict[str, object]:
        return {"enabled": self.enabled, "chosen_by": self.chosen_by}


def _truthy(value: str) -> bool:
    # TensorFlow reads the variable with ReadBoolFromEnvVar: "1"/"true" on, "0"/"false" off.
    return value.strip().lower() in ("1", "true")


def onednn_state() -> OneDnnState:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process, and who chose it.

    TensorFlow's own answer (`IsMklEnabled`, the policy it applies) when it can be had: it is
    right even where TensorFlow was imported before this module could set its default."""
    chosen_by = "environment" if _USER_ONEDNN is not None else "flasma-ws"
    try:
        from tensorflow.python.util import _pywrap_util_port

        return OneDnnState(bool(_pywrap_util_port.IsMklEnabled()), chosen_by)
    except (ImportError, AttributeError):  # a TensorFlow without the private probe
        return OneDnnState(_truthy(os.environ.get(ONEDNN_VAR, "1")), chosen_by)


if not _IMPORTED_FIRST:
    os.environ.setdefault(ONEDNN_VAR, "1")
    os.environ.setdefault(LOG_LEVEL_VAR, "2")
