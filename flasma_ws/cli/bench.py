"""`flasma-ws bench`: engine q/s on generated data, rows = batch sizes, columns = dimensions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import FlasmaError
from . import app, check_writable, fail

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..bench import BenchConfig, Result

console = Console()


@app.command()
def bench(
    batches: Annotated[
        str, typer.Option(help="Batch sizes (rows); '1,2,...,128' doubles up to 128.")
    ] = "1,2,4,...,128",
    dims: Annotated[str, typer.Option(help="Vector dimensions (columns).")] = (
        "100,300,512,768,1024,2048"
    ),
    n: Annotated[int, typer.Option(help="Rows of the generated target matrix.")] = 100_000,
    k: Annotated[int, typer.Option(help="Results per query.")] = 10,
    dtype: Annotated[str, typer.Option(help="Stored matrix type: float32, float16, bfloat16.")] = (
        "float32"
    ),
    device: Annotated[str, typer.Option(help="TensorFlow device: auto, cpu, gpu:N.")] = "auto",
    seconds: Annotated[float, typer.Option(help="Timed seconds per cell and per method.")] = 1.0,
    compare: Annotated[
        bool,
        typer.Option(
            help="Also time the ceilings (TensorFlow matmul-only; numpy BLAS GEMM, the "
            "machine's) and FAISS IndexFlatIP and ScaNN brute force (both need "
            "flasma-ws\\[bench]) on the same data."
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option(help="Write the results as JSON to this file.")
    ] = None,
    recall: Annotated[
        bool,
        typer.Option(
            help="Also check the engine's answers for the bench queries against a float64 "
            "brute force: recall@k and the largest score error, per dimension."
        ),
    ] = False,
    markdown: Annotated[bool, typer.Option(help="Print Markdown tables instead.")] = False,
    approximate: Annotated[
        bool,
        typer.Option(
            help="With --dtype bfloat16/float16: the uncertified narrow scores (as serve "
            "--approximate), instead of the certified exact answers."
        ),
    ] = False,
    tf32: Annotated[
        bool,
        typer.Option(
            help="With --dtype float32 on an NVIDIA GPU: TensorFloat-32 matmuls, certified "
            "exact (as serve --tf32); --compare adds the float32 engine without TF32."
        ),
    ] = False,
    data: Annotated[
        str,
        typer.Option(
            help="gaussian (the demo set) or clustered (tight clusters with near-duplicates, "
            "queries near rows: many narrow ties)."
        ),
    ] = "gaussian",
    seed: Annotated[int, typer.Option(help="Seed of the generated matrix and queries.")] = 0,
    shards: Annotated[
        str | None,
        typer.Option(
            help="Shard counts, e.g. 1,2,4: instead of the q/s tables, time the sharded engine "
            "(local Ray, same total --n) against one engine: the fan-out overhead per batch "
            "(needs flasma-ws\\[ray])."
        ),
    ] = None,
) -> None:
    """Measure exact top-k q/s in-process, beside Flasma's published RTX 3090 figures."""
    from .. import bench as lib  # TensorFlow loads only when benchmarking

    if shards is not None:
        from . import bench_shards

        try:
            check_writable(json_out, "--json-out")
            bench_shards.run(shards, batches, dims, n, k, seconds, seed, json_out)
        except FlasmaError as exc:
            fail(exc)
        return
    try:
        config = lib.BenchConfig(
            batches=lib.parse_int_list(batches, "--batches"),
            dims=lib.parse_int_list(dims, "--dims"),
            n=n,
            k=k,
            dtype=dtype,
            device=device,
            seconds=seconds,
            compare=compare,
            recall=recall,
            seed=seed,
            approximate=approximate,
            data=data,
            tf32=tf32,
        )
        check_writable(json_out, "--json-out")  # before the run: writing it is the last step
        faiss = lib.load_faiss() if compare else None
        if compare and faiss is None:
            console.print(
                "FAISS is not installed: comparing with TensorFlow matmul-only alone. "
                "Install it with: pip install 'flasma-ws[bench]'",
                style="yellow",
                markup=False,
            )
        results = _run(config, faiss)
    except FlasmaError as exc:
        fail(exc)
    _print(config, results, markdown)
    if json_out is not None:
        json_out.write_text(json.dumps(lib.report(config, results), indent=2) + "\n")
        console.print(f"Wrote {json_out}")


def _run(config: BenchConfig, faiss: object | None) -> list[Result]:
    from .. import bench as lib

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=config.cells)

        def update(what: str, done: int) -> None:
            progress.update(task, description=what, completed=done)

        return list(lib.run_bench(config, update, faiss))


def _print(config: BenchConfig, results: list[Result], markdown: bool) -> None:
    from .. import bench as lib

    if not results:
        return
    first = results[0]
    mode = (" tf32" if config.tf32 else "") + (" approximate" if config.approximate else "")
    head = f"N={config.n:,}, k={config.k}, {first.dtype}{mode} on {first.device}, {config.data}"
    typer.echo(lib.machine_line())
    tables: list[tuple[str, Callable[[Result], str]]] = [
        (f"Engine q/s ({head}; Flasma's RTX 3090 figures in parentheses)", lib.engine_cell)
    ]
    if config.compare:
        tables += _compare_tables(results)
    if any(r.fallback_fraction is not None for r in results):
        tables += [
            (
                "Certified: fraction of queries recomputed in float32",
                _cell(_fraction, "fallback_fraction"),
            ),
            (
                "Certified: candidates rescored in float32 per query",
                _cell(_mean, "mean_candidates"),
            ),
        ]
    if config.recall:
        _print_accuracy(config, results, markdown)
    for title, cell in tables:
        if markdown:
            typer.echo(f"\n**{title}**\n\n{lib.markdown_table(results, cell)}")
        else:
            console.print(f"\n[bold]{title}[/bold]")
            console.print(_rich_table(*lib.grid(results, cell)))


COMPARED = [  # (title, short name, Result's q/s field, Result's ratio property)
    (
        "TensorFlow matmul-only q/s (TensorFlow's ceiling)",
        "matmul-only",
        "matmul_qps",
        "over_matmul",
    ),
    (
        "BLAS GEMM-only q/s (numpy, scores only: the machine's ceiling)",
        "BLAS",
        "blas_qps",
        "over_blas",
    ),
    ("FAISS IndexFlatIP q/s", "FAISS", "faiss_qps", "over_faiss"),
    ("ScaNN brute force q/s (its fastest call)", "ScaNN", "scann_qps", "over_scann"),
    ("float32 engine q/s (exact float32, same rows)", "float32", "float32_qps", "over_float32"),
]


def _compare_tables(results: list[Result]) -> list[tuple[str, Callable[[Result], str]]]:
    """The ceilings and the other libraries that ran, each with the engine's ratio to it."""
    from .. import bench as lib

    tables: list[tuple[str, Callable[[Result], str]]] = []
    for title, name, qps, ratio in COMPARED:
        if any(getattr(r, qps) is not None for r in results):
            tables.append((title, _cell(lib.format_qps, qps)))
            tables.append((f"engine / {name}", _cell(lib.format_ratio, ratio)))
    return tables


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cell(format_value: Callable[[float | None], str], field: str) -> Callable[[Result], str]:
    return lambda result: format_value(getattr(result, field))


def _rich_table(batches: list[int], dims: list[int], cells: dict[tuple[int, int], str]) -> Table:
    table = Table()
    table.add_column("batch", justify="right", style="bold")
    for d in dims:
        table.add_column(f"d={d}", justify="right")
    for b in batches:
        table.add_row(str(b), *(cells.get((b, d), "") for d in dims))
    return table


def _print_accuracy(config: BenchConfig, results: list[Result], markdown: bool) -> None:
    per_dim = {r.dim: r for r in results}
    title = f"Accuracy vs float64 brute force ({max(config.batches)} queries per dim)"
    rows = [
        (f"recall@{config.k}", [f"{r.recall:.4f}" for r in per_dim.values()]),
        ("max score error", [f"{r.max_score_error:.1e}" for r in per_dim.values()]),
    ]
    if markdown:
        head = "| | " + " | ".join(f"d={d}" for d in per_dim) + " |"
        lines = [head, "|---|" + "---:|" * len(per_dim)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
        typer.echo(f"\n**{title}**\n\n" + "\n".join(lines))
        return
    table = Table()
    table.add_column("")
    for d in per_dim:
        table.add_column(f"d={d}", justify="right")
    for name, cells in rows:
        table.add_row(name, *cells)
    console.print(f"\n[bold]{title}[/bold]")
    console.print(table)
