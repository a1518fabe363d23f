"""`flasma-ws loadtest`: drive a running server over WebSocket (or POST /cos) and report."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..errors import FlasmaError
from . import app, check_writable, fail

# Wide enough for the report when stdout is a file or a pipe (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
progress_console = Console(stderr=True)


@app.command()
def loadtest(
    url: Annotated[
        str,
        typer.Option(
            help="The server's WebSocket URL; its /info and /metrics "
            "are read from the same host and port."
        ),
    ] = "ws://127.0.0.1:8080/ws",
    connections: Annotated[int, typer.Option(help="WebSocket (or HTTP) connections.")] = 1,
    inflight: Annotated[
        int, typer.Option(help="Closed loop: requests outstanding per connection.")
    ] = 1,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Open loop: total queries/s over all connections (instead of --inflight)."
        ),
    ] = None,
    arrival: Annotated[
        str, typer.Option(help="Open-loop arrivals: constant or poisson.")
    ] = "constant",
    duration: Annotated[
        float | None,
        typer.Option(help="Seconds to measure (default 10 when --count is not given)."),
    ] = None,
    count: Annotated[int | None, typer.Option(help="Queries to measure.")] = None,
    warmup: Annotated[float, typer.Option(help="Seconds of unmeasured load first.")] = 0.0,
    k: Annotated[
        int | None, typer.Option(help="Results per query (default: the server's).")
    ] = None,
    binary: Annotated[bool, typer.Option(help="Binary frames instead of JSON.")] = False,
    multi: Annotated[int, typer.Option(help="Queries per frame (multi-query frames).")] = 1,
    queries: Annotated[
        Path | None, typer.Option(help="(Q, dim) .npy of queries (default: random).")
    ] = None,
    http: Annotated[
        bool, typer.Option(help="POST /cos over keep-alive HTTP instead of WebSocket.")
    ] = False,
    verify: Annotated[
        int,
        typer.Option(
            help="Check this many answers against a float64 brute "
            "force; exit 1 unless all are exact."
        ),
    ] = 0,
    npy: Annotated[
        Path | None,
        typer.Option(
            help="The server's vectors, for --verify (demo sets are regenerated from /info)."
        ),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="One run per value, e.g. connections=1,4,16,64 (or inflight=, rate=)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option(help="Write the full report as JSON.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw throughput against p99 latency (PNG; needs flasma-ws\\[plot])."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random queries.")] = 0,
    token: Annotated[
        str | None,
        typer.Option(help="Bearer token of a server started with --token.", envvar="FLASMA_TOKEN"),
    ] = None,
    time_limit: Annotated[
        float,
        typer.Option(
            help="Most seconds of sending per run, warm-up included; answers in flight then get "
            "at most 10 s more."
        ),
    ] = 300.0,
) -> None:
    """Measure throughput and latency of a running server (closed or open loop, or a sweep)."""
    from .. import loadtest as lt  # numpy and httpx load only for this command

    try:
        config = lt.LoadConfig(
            url=url,
            connections=connections,
            inflight=inflight,
            rate=rate,
            arrival=arrival,  # type: ignore[arg-type]
            duration_s=duration,
            count=count,
            warmup_s=warmup,
            k=k,
            binary=binary,
            multi=multi,
            queries=queries,
            http=http,
            verify=verify,
            npy=npy,
            seed=seed,
            token=token,
            time_limit_s=time_limit,
        )
        swept = lt.parse_sweep(sweep) if sweep else None
        check_writable(json_out, "--json-out")  # before the run, not after it
        check_writable(plot, "--plot")
        if plot is not None:
            lt.require_matplotlib()
        result = _run(lt, config, swept)
        console.print(lt.report_table(result))
        if json_out is not None:
            json_out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        if plot is not None:
            lt.plot(result, plot)
    except FlasmaError as exc:
        fail(exc)
    if lt.nothing_answered(result):
        console.print("[red]No query was answered[/red] (see the errors column).")
        raise typer.Exit(1)
    if not lt.is_exact(result):
        console.print("[red]Some answers were not exact[/red] (see the recall column).")
        raise typer.Exit(1)


def _run(lt: Any, config: Any, swept: tuple[str, list[float]] | None) -> dict[str, Any]:
    """The run, with a live status line on stderr when it is a terminal."""
    if not progress_console.is_terminal:
        return asyncio.run(lt.run_load(config, swept))
    with Live(
        Text("connecting"), console=progress_console, transient=True, refresh_per_second=4
    ) as live:

        def on_progress(progress: Any) -> None:
            live.update(Text(lt.progress_text(progress)))

        def on_point(point: dict[str, Any]) -> None:
            live.console.print(
                f"  done: {point['throughput_qps']:,.0f} q/s, p99 "
                f"{point['latency_ms']['p99'] or 0:.2f} ms"
            )

        return asyncio.run(lt.run_load(config, swept, on_progress, on_point))
