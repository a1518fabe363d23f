"""`flasma-ws serve`: flags (or FLASMA_* variables) derived from Settings' fields, parsed into
Settings; then run the server."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Annotated, Any

import typer

from ..errors import FlasmaError
from ..settings import Leaf, Settings, leaves
from . import app, fail, quiet_tensorflow

STARTED = time.perf_counter()  # cold-start time is measured from CLI import


def build_settings(options: dict[str, Any]) -> Settings:
    """Settings from the command's options (keyed by option name, e.g. drain_timeout)."""
    values = {}
    for leaf in leaves():
        raw = options[leaf.flag]
        values[leaf.name] = raw if leaf.parse is None else leaf.parse(raw)
    return Settings(**values)


def _parameter(leaf: Leaf) -> inspect.Parameter:
    """One option of `serve`, and its FLASMA_<NAME> variable, from a settings field."""
    option = typer.Option(help=leaf.help, envvar=f"FLASMA_{leaf.flag.upper()}", show_default=True)
    annotation = Annotated[leaf.type, option]  # type: ignore[name-defined]  # built at run time
    return inspect.Parameter(
        leaf.flag, inspect.Parameter.KEYWORD_ONLY, default=leaf.default, annotation=annotation
    )


def serve(**options: Any) -> None:
    """Serve exact cosine top-k over WebSocket (/ws) and HTTP (POST /cos) on one port."""
    try:
        settings = build_settings(options)  # bad values refused before anything slow starts
        quiet_tensorflow(debug=settings.log_level.lower() == "debug")
        _configure_logging(settings.log_level)
        if settings.npy is not None:
            from ..vectors import open_npy

            open_npy(settings.npy, settings.dim)  # shape errors now, before we listen
        from ..server import serve as run_server  # uvicorn loads only when serving

        run_server(settings, STARTED)  # TensorFlow loads in the background once listening
    except FlasmaError as exc:
        fail(exc)


# typer reads the options from the signature: one per settings field, none restated here.
_PARAMETERS = [_parameter(leaf) for leaf in leaves()]
serve.__signature__ = inspect.Signature(_PARAMETERS, return_annotation=None)  # type: ignore[attr-defined]
serve.__annotations__ = {p.name: p.annotation for p in _PARAMETERS} | {"return": None}
app.command()(serve)


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_level.lower() != "debug":  # one line per connection is too chatty for long-lived clients
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
