"""The public surface: what `import flasma_ws` offers, and that it stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import flasma_ws

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_wheel_ships_the_dashboard(tmp_path):
    """Built from a copy of the sources (a build leaves build/ and egg-info behind), the wheel
    holds every file GET / serves, and the vendored chart library's licence."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "flasma_ws", source / "flasma_ws", ignore=shutil.ignore_patterns("__pycache__")
    )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run(
        [*command, "-w", str(tmp_path / "out"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "out").glob("flasma_ws-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    dashboard = ROOT / "flasma_ws" / "dashboard"
    wanted = {
        f"flasma_ws/dashboard/{path.relative_to(dashboard).as_posix()}"
        for path in dashboard.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "flasma_ws/dashboard/index.html" in wanted
    assert "flasma_ws/dashboard/vendor/uPlot.LICENSE" in wanted
    assert wanted <= shipped, sorted(wanted - shipped)


def test_importing_the_package_stops_openblas_spinning_unless_told_otherwise():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it: the package must set
    it before its own numpy import, and leave a value the environment gives alone."""
    probe = "import os, flasma_ws; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"

    def timeout(env: dict[str, str]) -> str:
        clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
        run = subprocess.run(
            [sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True
        )
        return run.stdout.strip()

    assert timeout({}) == "4"
    assert timeout({"OPENBLAS_THREAD_TIMEOUT": "28"}) == "28"
