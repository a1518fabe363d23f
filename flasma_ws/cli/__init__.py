"""The `flasma-ws` command line: thin commands over the library, one module per command."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import FlasmaError

app = typer.Typer(
    name="flasma-ws",
    help="Exact cosine-similarity top-k server over WebSocket and HTTP, batched on TensorFlow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Exact cosine-similarity top-k server: serve, convert, bench, loadtest."""


def fail(exc: FlasmaError) -> NoReturn:
    """Report a FlasmaError as one line (no traceback) and exit 1; commands call this."""
    err_console.print(f"[red]Error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# Each module registers its command on `app`.
from . import bench, convert, loadtest, serve  # noqa: E402,F401


def main() -> None:
    """Entry point. Commands report their own FlasmaErrors through fail(); this is the net."""
    try:
        app()
    except FlasmaError as exc:
        err_console.print(f"[red]Error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
