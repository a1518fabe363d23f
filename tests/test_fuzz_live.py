"""Bad input and bad clients against a real server, in seconds: a short run of
reliability/fuzz.py (mutated text and binary frames never crash it, and each is answered
exactly once with a valid code), and a client that vanishes while the server has stopped
reading it (reliability/slow_consumer.py in small).

The full runs and their figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from flasma_ws.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reliability/ is a folder of scripts beside the package
    sys.path.insert(0, str(ROOT))

from reliability import fuzz  # noqa: E402

SETTINGS = fuzz.server_settings()  # the `server` fixture (conftest.py) serves these


def test_short_fuzz_run_has_no_violations(server):
    report = fuzz.run(fuzz.Config(frames=3000, seed=0, url=server.url))
    assert report.violations == [], report.summary()
    assert report.frames == 3000 and sum(report.answers.values()) == 3000
    assert report.healthz == 200
    assert report.answers["result"] > 300  # the controls and the harmless mutations
    assert {"bad_json", "bad_request", "bad_dimension", "bad_value"} <= set(report.answers)
    assert set(report.mutators) == fuzz.ALL_MUTATORS | {"control"}


@pytest.mark.parametrize("mutator", ["surrogate_id", "bigint_id_nan", "nested_rows"])
def test_mutators_that_found_server_bugs(server, mutator):
    """Each of these once lost answers, closed connections or failed other clients' queries."""
    config = fuzz.Config(
        frames=300, connections=2, url=server.url, only=frozenset({mutator}), answer_timeout_s=5
    )
    report = fuzz.run(config)
    assert report.violations == [], report.summary()
    assert report.mutators[mutator] > 50


def open_connections(server: BackgroundServer) -> float:
    text = httpx.get(f"{server.http_url}/metrics").text
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("flasma_open_connections ")
    )


async def test_client_vanishing_at_the_inflight_cap_releases_its_connection():
    settings = fuzz.server_settings().replace(max_inflight=8, drain_timeout_s=1)
    with BackgroundServer(settings) as server:
        port = int(server.http_url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        ws = await connect(server.url, sock=sock, max_queue=1, compression=None, proxy=None)
        frame = orjson.dumps({"id": 1, "embedding": [1.0] * 16, "k": 100}).decode()

        async def never_read() -> None:
            for _ in range(5000):  # large answers: TCP and then the cap stop the server
                await ws.send(frame)

        sender = asyncio.create_task(never_read())
        await asyncio.sleep(1.5)
        assert open_connections(server) == 1
        sender.cancel()
        ws.transport.abort()
        for _ in range(30):
            if open_connections(server) == 0:
                break
            await asyncio.sleep(0.1)
        assert open_connections(server) == 0
