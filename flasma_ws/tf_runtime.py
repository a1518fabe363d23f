"""TensorFlow's process-wide switches, set before TensorFlow is first imported.

Import this module before `import tensorflow` (the engine does). An explicit value in the
environment always wins; `onednn_state()` says which value is in force and who chose it.

oneDNN: TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX (`DefaultOneDnnPolicy`, tensorflow/core/util/port.cc). Elsewhere
float32 MatMul runs on Eigen: on an AVX2-only AMD EPYC (Zen 3) a (128 x 100) @ (100 x 100k)
product ran at ~24 GFLOP/s against ~69 with oneDNN, and the engine at batch 128 gave 1,415
against 4,631 q/s (docs/benchmarks.md). oneDNN is therefore on unless the user says otherwise.

Log level: TF_CPP_MIN_LOG_LEVEL hides TensorFlow's C++ log lines below it (the CLI sets 3
unless `--log-level debug`; 2 where nobody set it). Lines logged while TensorFlow's libraries
load, before absl's logging is initialized ("oneDNN custom operations are on", "Could not find
cuda drivers"), ignore the variable: `quiet_import()` filters those by the same level.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
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


# absl's line format ("I0000 00:00:1796160798.644425    2569 port.cc:153] ..."), and the
# notice absl prints once before it is initialized.
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^\]\s]+\] ")
_PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called"
_LEVELS = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def _hidden(line: bytes, min_level: int) -> bool:
    if line.startswith(_PRE_INIT):
        return min_level >= 1
    match = _NATIVE_LINE.match(line)
    return match is not None and _LEVELS[match.group(1)] < min_level


def _pass_through(pipe: int, stderr: int, min_level: int) -> None:
    """Copy what reaches the pipe to the real stderr, less the native lines to hide."""
    with os.fdopen(pipe, "rb") as lines:
        for line in lines:
            if not _hidden(line, min_level):
                os.write(stderr, line)


class _StderrFilter:
    """File descriptor 2 routed through `_pass_through` until `close()`."""

    def __init__(self, min_level: int) -> None:
        sys.stderr.flush()
        self._saved, (pipe, sink) = os.dup(2), os.pipe()
        os.dup2(sink, 2)
        os.close(sink)
        args = (pipe, self._saved, min_level)
        self._copier = threading.Thread(target=_pass_through, args=args, daemon=True)
        self._copier.start()
        self._closed = False
        # The import runs in a loading thread (startup.py): when the process exits while it
        # still runs (a bad file found meanwhile), what the pipe holds, the "Error:" line
        # among it, must still reach the terminal before the copier thread dies.
        atexit.register(self.close)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's only writer closes: the copier drains it and ends
        self._copier.join(timeout=10)  # bounded: a forked child could hold the pipe open
        os.close(self._saved)
        atexit.unregister(self.close)


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """While TensorFlow imports, route file descriptor 2 through a filter that drops its native
    log lines below TF_CPP_MIN_LOG_LEVEL. Everything else written to stderr meanwhile (our
    own log lines from other threads, real errors) passes through, in order."""
    try:
        min_level = int(os.environ.get(LOG_LEVEL_VAR, "0"))
    except ValueError:
        min_level = 0
    if min_level <= 0:
        yield
        return
    stderr_filter = _StderrFilter(min_level)
    try:
        yield
    finally:
        stderr_filter.close()
