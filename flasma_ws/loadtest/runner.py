"""The entry points: probe the server, then one run or a sweep, each verified on request."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .config import LoadConfig
from .remote import ServerUnderTest, http_client, probe
from .report import Report, RunReport, ServerSummary, SweepReport, build_report
from .run import LiveStatus, Run, connected, drive, fill_unsent
from .transport import transports
from .verify import ServerMatrix
from .workload import build_workload


async def run_once(
    config: LoadConfig,
    server: ServerUnderTest,
    matrix: ServerMatrix | None = None,
    on_progress: Callable[[LiveStatus], None] | None = None,
) -> RunReport:
    """One load run against a probed server; with `matrix`, its answers verified."""
    run = Run(config, build_workload(config, server.dim), on_progress)
    async with http_client() as http, connected(run, transports(server, run.workload, config)) as c:
        measured = await drive(run, c, http, server.http_url)
        verification = None
        if matrix is not None:
            await fill_unsent(run, c[0])
            verification = matrix.check(run, config.k or int(server.info["top_k"]))
    return build_report(config, run.recorder, measured, verification)


async def run_load(
    config: LoadConfig,
    sweep: tuple[str, list[float]] | None = None,
    on_progress: Callable[[LiveStatus], None] | None = None,
    on_point: Callable[[RunReport], None] | None = None,
) -> Report:
    """Probe the server, then one run (its report) or a sweep (one report per value)."""
    server = await probe(config.url, config.token)
    matrix = ServerMatrix.for_server(server.info, config.npy) if config.verify else None
    summary = ServerSummary.of(server.info)
    if sweep is None:
        report = await run_once(config, server, matrix, on_progress)
        return dataclasses.replace(report, server=summary)
    name, values = sweep
    points = []
    for value in values:
        point = await run_once(config.replace(**{name: value}), server, matrix, on_progress)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return SweepReport(name, values, summary, points)
