"""Many asyncio tasks sharing one pipelined connection, with binary frames.

Each `await client.query(...)` sends at once without waiting for earlier answers; answers are
matched by id, in whatever order they arrive. The server batches queries from all tasks (and
all connections) together.

    python clients/python/pipelined.py [ws://HOST:PORT/ws] [TASKS]
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np

from flasma_ws.client import Client, ConnectionLost, server_info


async def worker(client: Client, queries: np.ndarray, latencies: list[float]) -> None:
    for query in queries:
        started = time.perf_counter()
        await client.query(query, k=10)
        latencies.append(time.perf_counter() - started)


async def main(url: str, tasks: int) -> None:
    dim = server_info(url)["dim"]
    queries = np.random.default_rng(0).standard_normal((tasks, 50, dim), dtype=np.float32)
    latencies: list[float] = []
    try:
        async with Client(url, binary=True) as client:
            started = time.perf_counter()
            await asyncio.gather(*(worker(client, q, latencies) for q in queries))
            elapsed = time.perf_counter() - started
    except ConnectionLost as exc:  # the server went away mid-run
        sys.exit(f"error: {exc}")
    ms = np.percentile(np.array(latencies) * 1000, [50, 99])
    print(
        f"{len(latencies)} queries from {tasks} tasks on one connection in {elapsed:.2f} s: "
        f"{len(latencies) / elapsed:,.0f} q/s, p50 {ms[0]:.2f} ms, p99 {ms[1]:.2f} ms"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    url = args[0] if args else "ws://127.0.0.1:8080/ws"
    asyncio.run(main(url, int(args[1]) if len(args) > 1 else 32))
