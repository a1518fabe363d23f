"""The Dockerfiles, checked without a Docker engine: non-root user, EXPOSE 8080, a HEALTHCHECK
that really tells a ready server from a missing or draining one, and an ENTRYPOINT + CMD that
the real `flasma-ws serve` parser turns into valid Settings. hadolint runs when installed."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import flasma_ws.server
from flasma_ws.cli import app
from flasma_ws.server import BackgroundServer
from flasma_ws.service import State
from flasma_ws.settings import Settings
from flasma_ws.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / name).read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def last(name: str, instruction: str) -> str:
    found = [args for kind, args in instructions(name) if kind == instruction]
    assert found, f"{name} has no {instruction}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def environment(name: str) -> dict[str, str]:
    """ENV KEY=VALUE pairs (the form these files use)."""
    env: dict[str, str] = {}
    for kind, args in instructions(name):
        if kind == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


def healthcheck_argv(name: str) -> list[str]:
    args = last(name, "HEALTHCHECK")
    return exec_form(args[args.index("CMD") + len("CMD") :].strip())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name):
    kinds = [kind for kind, _ in instructions(name)]
    user = last(name, "USER").split(":")[0]
    assert user not in ("root", "0")
    assert kinds.index("ENTRYPOINT") > len(kinds) - 1 - kinds[::-1].index("USER")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_exposes_8080_and_serves_there(name):
    assert "8080" in last(name, "EXPOSE").split()
    assert environment(name)["FLASMA_PORT"] == "8080"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images(name):
    base = instructions(name)[[k for k, _ in instructions(name)].index("FROM")][1]
    if name == "Dockerfile":
        assert base.startswith("python:3.11-slim")
    else:
        assert re.fullmatch(r"tensorflow/tensorflow:\$\{TF_VERSION\}-gpu", base)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_and_cmd_make_valid_settings_through_the_real_cli(name, monkeypatch):
    entrypoint = exec_form(last(name, "ENTRYPOINT"))
    command = exec_form(last(name, "CMD"))
    assert entrypoint == ["flasma-ws", "serve"]
    captured: list[Settings] = []
    # `serve` imports flasma_ws.server.serve when called: record the settings, start nothing.
    monkeypatch.setattr(
        flasma_ws.server, "serve", lambda settings, started: captured.append(settings)
    )
    result = CliRunner().invoke(app, [*entrypoint[1:], *command], env=environment(name))
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert (settings.host, settings.port, settings.dim, settings.npy) == (
        "0.0.0.0",
        8080,
        100,
        None,
    )


def serve_envvars() -> set[str]:
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {param.envvar for param in command.params if param.envvar}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_flasma_variable_used_is_a_serve_setting(name):
    text = (ROOT / name).read_text()
    used = set(re.findall(r"FLASMA_[A-Z_]+", text))
    assert {"FLASMA_PORT", "FLASMA_HOST", "FLASMA_CERTFILE"} <= used
    assert used <= serve_envvars()


@pytest.fixture(scope="module")
def small_server():
    with BackgroundServer(Settings(dim=8, demo_size=100, port=0)) as running:
        yield running


def run_healthcheck(name: str, port: int) -> int:
    argv = healthcheck_argv(name)
    assert argv[0] in ("python", "python3") and "/healthz" in argv[-1]
    env = {"FLASMA_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True).returncode


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_passes_on_a_ready_server_and_fails_otherwise(name, small_server):
    port = int(small_server.http_url.rsplit(":", 1)[1])
    assert run_healthcheck(name, port) == 0
    assert run_healthcheck(name, free_port()) != 0  # nothing listening
    small_server.service.state = State.DRAINING  # /healthz 503
    try:
        assert run_healthcheck(name, port) != 0
    finally:
        small_server.service.state = State.READY


def test_cpu_image_installs_every_requirement_but_tensorflow():
    run = next(args for kind, args in instructions("Dockerfile") if "tomllib" in args)
    code = re.search(r'python -c "(.*?)" >', run).group(1)  # type: ignore[union-attr]
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "uvicorn>=0.35,<0.55" in printed and "orjson>=3.9" in printed
    assert not [line for line in printed if line.startswith("tensorflow")]
    assert "tensorflow-cpu==" in last("Dockerfile", "ARG")


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in DOCKERFILES:
        for kind, args in instructions(name):
            if kind == "COPY":
                for source in args.split()[:-1]:
                    assert not any(fnmatch.fnmatch(source, p) for p in patterns), source
    assert ".venv" in patterns and ".git" in patterns


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_is_clean():
    result = subprocess.run(
        ["hadolint", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
