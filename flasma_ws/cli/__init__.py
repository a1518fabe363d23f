"""The `flasma-ws` command line: thin commands over the library, one module per command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Typer ships its own copy of click and does not re-export these; main() needs them to print
# usage errors as one line instead of typer's box.
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from ..errors import ConfigError, FlasmaError

USAGE_EXIT_CODE = 2  # click's convention for a bad flag; every other error exits 1
TF_LOG_LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
_TF_LOG_LEVEL_GIVEN = TF_LOG_LEVEL_VAR in os.environ  # the user's own value always wins

app = typer.Typer(
    name="flasma-ws",
    help="Exact cosine-similarity top-k server over WebSocket and HTTP, batched on TensorFlow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def quiet_tensorflow(debug: bool = False) -> None:
    """Keep TensorFlow's C++ log (CUDA probing on a CPU machine, oneDNN notices) out of the
    terminal, unless `debug` (serve --log-level debug) or the user set TF_CPP_MIN_LOG_LEVEL.
    Level 3: the CUDA probe's "failed call to cuInit" is logged as an error. Must run before
    TensorFlow is imported; the engine's own default (2) is only a fallback for library use."""
    if not _TF_LOG_LEVEL_GIVEN:
        os.environ[TF_LOG_LEVEL_VAR] = "0" if debug else "3"


def version_line() -> str:
    """flasma-ws's and TensorFlow's versions and the devices TensorFlow sees (imports it)."""
    import importlib

    from .. import __version__

    quiet_tensorflow()  # --version runs before the root callback
    importlib.import_module("flasma_ws.engine")  # TensorFlow with the engine's settings
    import tensorflow as tf

    devices = ", ".join(d.name for d in tf.config.list_logical_devices())
    return f"flasma-ws {__version__}, TensorFlow {tf.__version__}, devices: {devices}"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the flasma-ws and TensorFlow versions and the devices TensorFlow "
            "sees, then exit.",
        ),
    ] = False,
) -> None:
    """Exact cosine-similarity top-k server: serve, convert, bench, loadtest."""
    quiet_tensorflow()  # every command; serve lets the log through with --log-level debug


def error_line(message: str) -> None:
    """One `Error: ...` line on stderr, however long and whatever brackets it holds."""
    err_console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def fail(exc: FlasmaError) -> NoReturn:
    """Report a FlasmaError as one line (no traceback) and exit 1; commands call this."""
    error_line(str(exc))
    raise typer.Exit(1)


def check_writable(path: Path | None, flag: str) -> None:
    """Refuse an output file that cannot be written before the run whose results it would hold
    (writing it is the last step: a failure then would lose the run)."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the path of a file to write.")
    if not path.parent.is_dir():
        raise ConfigError(
            f"{flag} {path}: the folder {path.parent} does not exist; create it first."
        )
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag} {path} cannot be written (no permission); choose another path.")


def usage_message(exc: ClickException) -> str:
    """A usage error as one line: which flag (or FLASMA_ variable) was wrong, and where to look.

    Typer's own text names the environment variable even when the bad value came from the
    command line; here it is named only when the value came from it.
    """
    message = exc.format_message()
    param = getattr(exc, "param", None)
    ctx = getattr(exc, "ctx", None)
    envvar = getattr(param, "envvar", None)
    if param is not None and ctx is not None and isinstance(envvar, str) and param.name:
        source = ctx.get_parameter_source(param.name)
        opts = " / ".join(f"'{opt}'" for opt in param.opts)
        where = f"{envvar} (environment variable)" if _from_env(source) else opts
        message = f"Invalid value for {where}: {exc.message}"
    if isinstance(exc, UsageError) and ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    return message


def _from_env(source: object) -> bool:
    return getattr(source, "name", None) == "ENVIRONMENT"


# Each module registers its command on `app`.
from . import bench, convert, loadtest, serve  # noqa: E402,F401


def main() -> None:
    """Entry point. Commands report their own FlasmaErrors through fail(); this is the net.

    Usage errors (a bad flag) print one line and exit 2; everything else that fails exits 1.
    """
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError:  # typer has printed the help already
        sys.exit(USAGE_EXIT_CODE)
    except UsageError as exc:
        error_line(usage_message(exc))
        sys.exit(USAGE_EXIT_CODE)
    except ClickException as exc:
        error_line(usage_message(exc))
        sys.exit(exc.exit_code)
    except typer.Abort:
        error_line("Aborted.")
        sys.exit(1)
    except FlasmaError as exc:
        error_line(str(exc))
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
