"""Flasma's published table, end to end: q/s over /ws by --max-batch (rows) and dim (columns).

    python benchmarks/flasma_table.py                       # the full table (tens of minutes)
    python benchmarks/flasma_table.py --dims 100,768 --batches 1,128 --seconds 3
    python benchmarks/flasma_table.py --dims 30522 --batches 1,2,4   # 12 GB of float32

For each cell a server is started with `--max-batch B` on a demo set of N x dim, and
`flasma-ws loadtest` offers twice B queries in flight (so full batches can form), JSON frames,
k = 10, after a warm-up. Flasma's RTX 3090 figures are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import Sizes, loadtest, serving, wait_ready  # noqa: E402

FLASMA_3090 = {  # (max batch, dim) -> q/s, Flasma's README
    (1, 100): 393,
    (128, 100): 4424,
    (1, 300): 389,
    (64, 300): 1645,
    (1, 512): 383,
    (32, 512): 1001,
    (1, 768): 365,
    (16, 768): 655,
    (1, 1024): 355,
    (8, 1024): 506,
    (1, 2048): 192,
    (4, 2048): 260,
    (1, 30522): 31,
    (2, 30522): 42,
}


def cell(batch: int, dim: int, n: int, seconds: float, workdir: Path) -> dict:
    in_flight = 2 * batch
    connections = min(in_flight, 64)
    inflight = math.ceil(in_flight / connections)
    sizes = Sizes(load_s=seconds)
    with serving(
        workdir,
        "--dim",
        str(dim),
        "--demo-size",
        str(n),
        "--max-batch",
        str(batch),
        "--timeout-ms",
        "600000",
    ) as server:
        wait_ready(server, timeout_s=1800)
        report = loadtest(
            server,
            sizes,
            workdir,
            f"{batch}-{dim}",
            "--connections",
            str(connections),
            "--inflight",
            str(inflight),
        )
    return {
        "batch": batch,
        "dim": dim,
        "n": n,
        "qps": report["throughput_qps"],
        "p50_ms": report["latency_ms"]["p50"],
        "mean_batch": report["mean_batch_size"],
        "flasma_rtx3090_qps": FLASMA_3090.get((batch, dim)),
    }


def table(results: list[dict], batches: list[int], dims: list[int]) -> str:
    by = {(r["batch"], r["dim"]): r for r in results}
    lines = [
        "| max batch | " + " | ".join(f"d={d}" for d in dims) + " |",
        "|---:|" + "---:|" * len(dims),
    ]
    for b in batches:
        cells = []
        for d in dims:
            r = by.get((b, d))
            text = f"{r['qps']:,.0f}" if r else "-"
            if r and r["flasma_rtx3090_qps"]:
                text += f" (3090: {r['flasma_rtx3090_qps']:,})"
            cells.append(text)
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="100,300,512,768,1024,2048,30522")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in dims:
            for batch in batches:
                results.append(cell(batch, dim, args.n, args.seconds, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
                if args.json_out:
                    args.json_out.write_text(json.dumps({"results": results}, indent=2))
    print(table(results, batches, dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
