"""flasma-ws convert: turn .npy/.npz/.fvecs/.hdf5 vectors into a normalized float32 .npy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import formats
from ..errors import FlasmaError
from ..text import counted
from ..vectors import RowsDone, Targets, VectorSource, prepare
from . import app, err_console, fail

# Inputs of at least this many values (64 MiB as float32) get a progress bar.
PROGRESS_MIN_VALUES = 1 << 24

TaskFactory = Callable[[str, int], RowsDone | None]


class OutLayout(str, Enum):
    standard = "standard"
    legacy = "legacy"


@app.command()
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="IN",
            help="Input vectors: .npy (standard (N, dim) or 1-D Flasma legacy), .npz, "
            ".fvecs, or ann-benchmarks .hdf5/.h5.",
            show_default=False,
        ),
    ],
    dst: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Output .npy file: float32, rows L2-normalized.",
            show_default=False,
        ),
    ],
    dim: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Vector dimension (number of floats per vector). Required for a 1-D legacy "
            ".npy; for other files it is read from the file and, if given, must match.",
            show_default="read from the file",
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="Array to read: the member name in an .npz (optional if it holds one array) "
            "or the dataset in an .hdf5.",
            show_default="the only .npz array; 'train' for .hdf5",
        ),
    ] = None,
    to: Annotated[
        OutLayout,
        typer.Option(
            help="Output layout: 'standard' is (N, dim); 'legacy' is the Flasma 1-D "
            "transposed layout of length dim*N (serve it with --dim).",
        ),
    ] = OutLayout.standard,
    drop_zero: Annotated[
        bool,
        typer.Option(
            "--drop-zero",
            help="Skip zero-norm rows instead of refusing the file. Rows after a dropped one "
            "move up, so OUT row numbers no longer match IN.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite OUT if it already exists.")
    ] = False,
) -> None:
    """Convert a vector file into the L2-normalized float32 .npy that `serve --npy` loads."""
    try:
        _convert(src, dst, dim, key, to.value, drop_zero, force)
    except FlasmaError as exc:
        fail(exc)


def _convert(
    src: Path,
    dst: Path,
    dim: int | None,
    key: str | None,
    layout: formats.OutLayout,
    drop_zero: bool,
    force: bool,
) -> None:
    formats.check_output(dst, force)  # before reading a possibly huge input
    source = formats.open_any(src, dim=dim, key=key)
    with _progress(source.n * source.dim >= PROGRESS_MIN_VALUES) as task:
        targets = prepare(source, drop_zero, task("Checking", source.n))
        _describe_input(source, targets)
        formats.write_npy(targets, dst, layout, task("Writing", targets.n), overwrite=force)
    serve_hint = f"--npy {dst}" + (f" --dim {targets.dim}" if layout == "legacy" else "")
    typer.echo(
        f"Wrote {dst}: {targets.n} x {targets.dim} float32, L2-normalized, {layout} layout "
        f"(serve it with {serve_hint})."
    )


def _describe_input(source: VectorSource, targets: Targets) -> None:
    dtype = np.dtype(source.array.dtype).name if source.array is not None else "float32"
    typer.echo(
        f"Read {source.label}: N={source.n}, dim={source.dim}, dtype {dtype}, "
        f"{source.layout} layout, {counted(targets.zero_rows, 'zero-norm row')}."
    )
    if source.integer_dtype is not None:
        typer.echo(f"Note: {source.integer_dtype} values are written as float32.")
    if targets.zero_rows:
        typer.echo(
            f"Dropped {counted(targets.zero_rows, 'zero-norm row')}: "
            "OUT row numbers no longer match IN."
        )


@contextmanager
def _progress(enabled: bool) -> Iterator[TaskFactory]:
    """Yield a factory of per-task row callbacks; a bar on stderr only for large inputs."""
    if not enabled:
        yield lambda description, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console) as bar:

        def task(description: str, total: int) -> RowsDone:
            task_id = bar.add_task(f"{description} rows", total=total)
            return lambda rows: bar.advance(task_id, rows)

        yield task
