"""Top-k for every row of a .npy file with multi-query frames (`query_many`).

    python clients/python/batch.py queries.npy [ws://HOST:PORT/ws] [K]

Writes queries.topk.npz with `ids` (Q, K) int64 and `scores` (Q, K) float32. Frames of up to
1,024 queries (the server's default --max-queries-per-frame) are sent pipelined.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from flasma_ws.client import Client


async def main(path: str, url: str = "ws://127.0.0.1:8080/ws", k: str = "10") -> None:
    queries = np.load(path).astype(np.float32)
    started = time.perf_counter()
    async with Client(url, binary=True) as client:
        ids, scores = await client.query_many(queries, k=int(k))
    elapsed = time.perf_counter() - started
    out = Path(path).with_suffix(".topk.npz")
    np.savez(out, ids=ids, scores=scores)
    print(f"{len(queries)} queries in {elapsed:.2f} s ({len(queries) / elapsed:,.0f} q/s) -> {out}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
