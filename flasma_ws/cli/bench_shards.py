"""`flasma-ws bench --shards 1,2,4`: the fan-out overhead table (flasma_ws/shard_bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def run(
    shards: str,
    batches: str,
    dims: str,
    n: int,
    k: int,
    seconds: float,
    seed: int,
    json_out: Path | None,
) -> None:
    """Measure, print a Markdown table and the merge cost, write JSON if asked."""
    from .. import bench as lib
    from .. import shard_bench

    counts = lib.parse_int_list(shards, "--shards")
    batch_sizes = lib.parse_int_list(batches, "--batches")
    dim_list = lib.parse_int_list(dims, "--dims")
    with console.status("starting") as status:
        results = shard_bench.run_fanout(
            counts, dim_list, batch_sizes, n, k, seconds, seed, progress=status.update
        )
        merge = shard_bench.merge_ms(batch=128, k=10, shards=64)
    typer.echo(lib.machine_line())
    typer.echo(f"\nN={n:,} in all, k={k}; shards on a local Ray on this machine\n")
    typer.echo(shard_bench.markdown(results))
    typer.echo(f"\nMerge of 64 synthetic shards' answers, batch 128, k=10: {merge:.3f} ms")
    if json_out is not None:
        document = {
            "n": n,
            "k": k,
            "machine": lib.machine(),
            "merge_ms_batch128_k10_64_shards": merge,
            "results": [r.to_json() for r in results],
        }
        json_out.write_text(json.dumps(document, indent=2) + "\n")
        typer.echo(f"Wrote {json_out}")
