"""The entry points: probe the server, then one run or a sweep, each verified on request."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from ..errors import ConfigError, FlasmaError
from .config import LoadConfig
from .live_verify import LiveCheck
from .remote import ServerUnderTest, http_client, probe
from .report import Report, RunReport, ServerSummary, SweepReport, Verification, build_report
from .run import LiveStatus, Run, connected, drive, fill_timed, fill_unsent
from .transport import Transport, transports
from .verify import ServerMatrix
from .workload import build_workload
from .writes import Writer


async def run_once(
    config: LoadConfig,
    server: ServerUnderTest,
    matrix: ServerMatrix | None = None,
    on_progress: Callable[[LiveStatus], None] | None = None,
) -> RunReport:
    """One load run against a probed server; with `matrix`, its answers verified. The keys a
    --write-ratio run wrote are deleted after it, so that the next run starts from the same
    rows."""
    writer = None
    if config.write_ratio:
        writer = Writer(config.write_ratio, server.dim, config.seed, keep_log=matrix is not None)
    run = Run(config, build_workload(config, server.dim), on_progress, writer)
    async with http_client() as http, connected(run, transports(server, run.workload, config)) as c:
        measured = await drive(run, c, http, server.http_url)
        verification = None
        if matrix is not None:
            verification = await _verify(run, c[0], matrix, config.k or int(server.info["top_k"]))
        if writer is not None:
            await delete_keys(c[0], writer.keys(), int(server.info["max_queries_per_frame"]))
    return build_report(config, run.recorder, measured, verification, writer)


async def _verify(run: Run, transport: Transport, matrix: ServerMatrix, k: int) -> Verification:
    if run.writer is None:
        await fill_unsent(run, transport)
        return matrix.check(run, k)
    assert run.writer.log is not None
    await fill_timed(run, transport)
    return LiveCheck(matrix, run.writer.log, k).check(
        run.timed, run.workload.queries, run.workload.multi
    )


async def delete_keys(transport: Transport, keys: list[int], per_frame: int) -> None:
    """Delete `keys`, `per_frame` to a frame; a FlasmaError if the server would not."""
    chunks = [keys[i : i + per_frame] for i in range(0, len(keys), per_frame)]
    try:
        answers = [await transport.send_write("delete", chunk) for chunk in chunks]
        await asyncio.gather(*answers)
    except FlasmaError as exc:
        raise FlasmaError(
            f"Deleting the {len(keys):,} keys this load test wrote (from 2^52 up) failed: {exc}; "
            "the server still holds some of them."
        ) from exc


def check_writable(server: ServerUnderTest, config: LoadConfig) -> None:
    """--write-ratio needs a live int-key collection: one clear line otherwise."""
    if not config.write_ratio:
        return
    if not server.info.get("writable"):
        raise ConfigError(
            f"--write-ratio needs a writable server, but {server.http_url} is read-only "
            '(/info "writable": false): start it with --data-dir DIR, or drop --write-ratio.'
        )
    if server.info.get("key_type", "int") != "int":
        raise ConfigError(
            f"--write-ratio writes integer keys, but {server.http_url} has "
            f"{server.info.get('key_type')} keys; drop --write-ratio."
        )


async def run_load(
    config: LoadConfig,
    sweep: tuple[str, list[float]] | None = None,
    on_progress: Callable[[LiveStatus], None] | None = None,
    on_point: Callable[[RunReport], None] | None = None,
) -> Report:
    """Probe the server, then one run (its report) or a sweep (one report per value)."""
    server = await probe(config.url, config.token)
    configs = [config] if sweep is None else [config.replace(**{sweep[0]: v}) for v in sweep[1]]
    for each in configs:
        check_writable(server, each)
    matrix = ServerMatrix.for_server(server.info, config.npy) if config.verify else None
    summary = ServerSummary.of(server.info)
    if sweep is None:
        report = await run_once(config, server, matrix, on_progress)
        return dataclasses.replace(report, server=summary)
    points = []
    for each in configs:
        point = await run_once(each, server, matrix, on_progress)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return SweepReport(sweep[0], sweep[1], summary, points)
