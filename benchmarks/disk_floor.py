"""The disk's own floor for group commit: what no WAL on this file system can beat.

Open-loop arrivals at `rate` per second of `record_bytes` each; one committer thread writes
everything pending in one `write` and one `fdatasync`, exactly the GroupCommitter's pattern
but with no server, no encoding and no engine. A write's latency is arrival to the end of
the fdatasync that covered it. Run it on the server's file system just before and after a
server measurement, and (on a file of its own) during it, so that the server's figure can be
read against what the disk did; run beside the server, each slows the other somewhat.

    python benchmarks/disk_floor.py --dir /var/tmp --rate 1000 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def group_commit_floor(
    directory: Path, rate: float = 1000, seconds: float = 10, record_bytes: int = 440
) -> dict[str, float]:
    """Latency percentiles (ms) and fsyncs of ideal group commit at `rate` writes/s."""
    arrivals: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    latencies: list[float] = []
    fsyncs = 0
    fd, name = tempfile.mkstemp(dir=directory, prefix="floor-", suffix=".wal")

    def commit() -> None:
        nonlocal fsyncs
        done = False
        while not done:
            group = [arrivals.get()]
            while not arrivals.empty():
                group.append(arrivals.get_nowait())
            done = group[-1] is None
            times = [t for t in group if t is not None]
            if times:
                os.write(fd, bytes(record_bytes * len(times)))
                os.fdatasync(fd)
                fsyncs += 1
                now = time.perf_counter()
                latencies.extend(now - t for t in times)

    committer = threading.Thread(target=commit)
    committer.start()
    try:
        start = due = time.perf_counter()
        while due - start < seconds:
            due += 1 / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            arrivals.put(time.perf_counter())
    finally:
        arrivals.put(None)
        committer.join()
        os.close(fd)
        os.unlink(name)
    ms = np.asarray(latencies) * 1000
    return {
        "writes": int(ms.size),
        "fsyncs": fsyncs,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "over_20ms_fraction": float((ms > 20).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(json.dumps(group_commit_floor(args.dir, args.rate, args.seconds), indent=1))


if __name__ == "__main__":
    main()
