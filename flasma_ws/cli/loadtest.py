"""`flasma-ws loadtest`: drive a running server over WebSocket (or POST /cos) and report."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError, FlasmaError
from ..text import counted
from . import app, check_writable, fail

if TYPE_CHECKING:  # the load generator (numpy, httpx) loads only when the command runs
    from ..loadtest import LiveStatus, LoadConfig, Report, RunReport
    from ..loadtest.report import Verification

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
    count: Annotated[
        int | None,
        typer.Option(help="Queries to measure (with --write-ratio, write frames count too)."),
    ] = None,
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
    write_ratio: Annotated[
        float,
        typer.Option(
            help="Share of the requests that are one-row upserts (0 to 1), of new keys and of "
            "keys written earlier in the run, from 2^52 up; deleted after the run. Needs a "
            "server started with --data-dir."
        ),
    ] = 0.0,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="One run per value, e.g. connections=1,4,16,64 (or inflight=, rate=, "
            "write_ratio=)."
        ),
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
            write_ratio=write_ratio,
        )
        swept = lt.parse_sweep(sweep) if sweep else None
        check_writable(json_out, "--json-out")  # before the run, not after it
        check_writable(plot, "--plot")
        if plot is not None:
            require_matplotlib()
        report = _run(lt, config, swept)
        console.print(report_table(report))
        if json_out is not None:
            json_out.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        if plot is not None:
            draw_plot(report, plot)
    except FlasmaError as exc:
        fail(exc)
    if lt.nothing_answered(report):
        console.print("[red]No query was answered[/red] (see the errors column).")
        raise typer.Exit(1)
    if lt.nothing_acknowledged(report):
        console.print("[red]No write was acknowledged[/red] (see the write errors column).")
        raise typer.Exit(1)
    if not lt.is_exact(report):
        console.print("[red]Some answers were not exact[/red] (see the recall column).")
        raise typer.Exit(1)


def _run(lt: Any, config: LoadConfig, swept: tuple[str, list[float]] | None) -> Report:
    """The run, with a live status line on stderr when it is a terminal."""
    if not progress_console.is_terminal:
        return asyncio.run(lt.run_load(config, swept))
    with Live(
        Text("connecting"), console=progress_console, transient=True, refresh_per_second=4
    ) as live:

        def on_progress(status: LiveStatus) -> None:
            live.update(Text(status_text(status)))

        def on_point(point: RunReport) -> None:
            live.console.print(
                f"  done: {point.throughput_qps:,.0f} q/s, p99 {point.latency_ms.p99 or 0:.2f} ms"
            )

        return asyncio.run(lt.run_load(config, swept, on_progress, on_point))


# -- presentation ------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in errors.items()) or "0"


def report_table(report: Report) -> Table:
    """A rich Table: one row per run (a sweep has one per point); latencies in ms."""
    points = report.runs
    verifying = any(p.verification is not None for p in points)
    writing = any(p.writes is not None for p in points)
    table = Table(title=_title(report), title_justify="left")
    table.add_column("run")
    for name in ("q/s", "p50", "p90", "p95", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column("errors")
    if writing:
        for name in ("writes/s", "ack p50", "ack p99", "ack max"):
            table.add_column(name, justify="right")
        table.add_column("write errors")
    for name in ("batch", "engine", "cpu %", *(["recall"] if verifying else [])):
        table.add_column(name, justify="right")
    for p in points:
        row = _row(p)
        if writing:
            row[8:8] = _write_cells(p)
        table.add_row(*row, *([_recall_text(p.verification)] if verifying else []))
    return table


def _write_cells(p: RunReport) -> list[str]:
    """writes/s, acknowledgement p50/p99/max (ms) and write errors of one run."""
    w = p.writes
    if w is None:
        return ["-"] * 5
    lat = w.latency_ms
    return [
        f"{w.writes_per_s:,.0f}",
        *(_ms(value) for value in (lat.p50, lat.p99, lat.max)),
        _errors_text(w.errors),
    ]


def _row(p: RunReport) -> list[str]:
    lat = p.latency_ms
    return [
        _run_label(p),
        f"{p.throughput_qps:,.0f}",
        *(_ms(value) for value in (lat.p50, lat.p90, lat.p95, lat.p99, lat.max)),
        _errors_text(p.errors),
        _ms(p.mean_batch_size),
        _ms(p.mean_engine_ms),
        f"{p.client_cpu_percent:.0f}",
    ]


def _recall_text(verification: Verification | None) -> str:
    if verification is None:
        return "-"
    recall = "-" if verification.recall is None else f"{verification.recall:.4f}"
    return recall + ("" if verification.exact else " NOT EXACT")


def _run_label(point: RunReport) -> str:
    """E.g. "ws-json c=16 w=4 q=8": mode, connections, in flight (or rate), queries per frame."""
    rate = point.rate
    load = f"{rate:g}/s {point.arrival}" if rate else f"w={point.inflight}"
    multi = f" q={point.multi}" if point.multi > 1 else ""
    writes = f" writes {point.writes.ratio:.0%}" if point.writes is not None else ""
    return f"{point.mode} c={point.connections} {load}{multi}{writes}"


def _title(report: Report) -> str:
    server, points = report.server, report.runs
    n, dim, device = (server.n, server.dim, server.device) if server else (None, None, None)
    sent = sum(p.sent for p in points)
    unanswered = sum(p.unanswered for p in points)
    writes = sum(p.writes.sent for p in points if p.writes is not None)
    written = f", {counted(writes, 'write')}" if any(p.writes for p in points) else ""
    title = (
        f"{points[0].url}: {n} x {dim} on {device}; {counted(sent, 'query', 'queries')}"
        f"{written} sent; latency, engine time in ms"
    )
    if unanswered:
        title += f", {unanswered:,} unanswered"
    if any(p.timed_out for p in points):
        title += " (time limit reached)"
    return title


def status_text(status: LiveStatus) -> str:
    return (
        f"{status.phase:<8} {status.elapsed_s:6.1f} s  {status.qps:9,.0f} q/s  "
        f"{status.in_flight:6d} in flight  {counted(status.errors, 'error')}"
    )


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'flasma-ws[plot]' (or drop --plot)."
        ) from exc


def draw_plot(report: Report, path: Path) -> None:
    """Throughput (x) against p99 latency (y), one labelled point per run."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    points = _plot_points(report)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o")
    for x, y, label in points:
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("throughput (queries/s)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_title(f"flasma-ws loadtest ({report.runs[0].mode})")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_points(report: Report) -> list[tuple[float, float, str]]:
    """(q/s, p99 ms, label) of every run that answered something."""
    from ..loadtest import SweepReport

    name = report.sweep if isinstance(report, SweepReport) else None
    return [
        (p.throughput_qps, p.latency_ms.p99, f"{name}={getattr(p, name):g}" if name else p.mode)
        for p in report.runs
        if p.latency_ms.p99 is not None
    ]
