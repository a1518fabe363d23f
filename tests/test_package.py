"""The public surface: what `import flasma_ws` offers, and that it stays light."""

from __future__ import annotations

import subprocess
import sys

import flasma_ws


def test_exported_names():
    assert sorted(flasma_ws.__all__) == sorted(
        [
            "AuthError",
            "Client",
            "ConfigError",
            "ConnectionLost",
            "EngineError",
            "EngineOutOfMemory",
            "FlasmaError",
            "ProtocolError",
            "ServerError",
            "Settings",
            "SyncClient",
            "TopK",
            "VectorFileError",
            "__version__",
            "server_info",
        ]
    )
    for name in flasma_ws.__all__:
        assert hasattr(flasma_ws, name), name


def test_errors_share_one_base():
    for name in ("ConfigError", "EngineError", "ProtocolError", "ServerError", "VectorFileError"):
        assert issubclass(getattr(flasma_ws, name), flasma_ws.FlasmaError)


def test_importing_the_package_does_not_import_tensorflow():
    code = "import sys, flasma_ws, flasma_ws.cli; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
