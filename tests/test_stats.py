"""GET /stats: the feed's arithmetic on a real registry, then a real server under a known load."""

from __future__ import annotations

import time

import httpx
import numpy as np
import orjson
import pytest
import websockets

from flasma_ws.metrics import Metrics
from flasma_ws.settings import Settings
from flasma_ws.stats import COLUMNS, StatsFeed, quantile

SETTINGS = Settings(dim=8, demo_size=300, port=0, max_batch=64)


def test_quantile_interpolates_inside_its_bucket_like_histogram_quantile() -> None:
    buckets = ((1.0, 10.0), (2.0, 30.0), (4.0, 40.0), (float("inf"), 40.0))
    assert quantile(0.5, buckets) == pytest.approx(1.5)  # rank 20: half-way through (1, 2]
    assert quantile(0.25, buckets) == pytest.approx(1.0)  # rank 10: the top of (0, 1]
    assert quantile(0.99, buckets) == pytest.approx(2.0 + 2.0 * (39.6 - 30.0) / 10.0)
    assert quantile(0.5, ((1.0, 0.0), (float("inf"), 0.0))) is None
    assert quantile(0.99, ((1.0, 1.0), (float("inf"), 5.0))) == 1.0  # in +Inf: the last bound


def test_a_second_of_known_traffic_becomes_one_exact_point() -> None:
    metrics = Metrics()
    feed = StatsFeed(metrics.registry)
    feed.sample(now=1000.0)
    for size in (3, 5, 64):
        metrics.batch_size.observe(size)
        metrics.engine_seconds.observe(0.004)
    metrics.queries.inc(72)
    metrics.requests.labels("ws", "ok").inc(70)
    metrics.requests.labels("ws", "bad_k").inc(2)
    for _ in range(70):
        metrics.latency_seconds.labels("ws").observe(0.0015)
    metrics.queue_depth.set(7)
    feed.sample(now=1002.0)  # two seconds later
    document = feed.document()
    series = document["series"]
    assert list(series) == list(COLUMNS)
    assert series["t"] == [1002.0]
    assert series["queries"] == [72.0] and series["qps"] == [36.0]
    assert series["mean_batch"] == [pytest.approx(72 / 3)]
    assert series["engine_ms"] == [pytest.approx(4.0)]
    assert series["errors_per_s"] == [1.0]
    assert series["queue_depth"] == [7.0]
    assert 1.0 < series["p50_ms"][0] <= 2.0  # every answer took 1.5 ms: the (1, 2] ms bucket
    assert document["window"]["errors"] == {"bad_k": 2.0}
    histogram = dict((bound, count) for bound, count in document["window"]["batch_size"])
    assert (histogram[4.0], histogram[8.0], histogram[64.0], histogram[None]) == (1, 1, 1, 0)
    assert feed.document(since=1002.0)["series"]["t"] == []  # nothing newer


def test_the_ring_keeps_only_its_window() -> None:
    feed = StatsFeed(Metrics().registry, window_s=5)
    for second in range(20):
        feed.sample(now=float(second))
    document = feed.document()
    assert document["series"]["t"] == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert document["window_s"] == 5.0


def test_a_feed_never_started_answers_with_no_series_yet() -> None:
    document = StatsFeed(Metrics().registry).document()
    assert document["series"]["t"] == [] and document["totals"]["queries"] == 0


def stats(server, **params: object) -> httpx.Response:
    return httpx.get(f"{server.http_url}/stats", params=params, timeout=10, trust_env=False)


def wait_for_stats(server, until) -> dict:
    """The first /stats document that satisfies `until` (the feed samples once a second)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        document = stats(server).json()
        if until(document):
            return document
        time.sleep(0.2)
    raise AssertionError(f"/stats never showed it: {document}")


async def test_the_feed_counts_a_known_load(server) -> None:
    rng = np.random.default_rng(7)
    async with websockets.connect(server.url) as ws:
        for i in range(120):
            query = {"id": i, "embedding": rng.random(8).tolist(), "k": 3}
            await ws.send(orjson.dumps(query).decode())
        await ws.send(orjson.dumps({"id": "bad", "embedding": [1.0, 2.0], "k": 3}).decode())
        answers = [orjson.loads(await ws.recv()) for _ in range(121)]
    assert sum("result" in answer for answer in answers) == 120

    document = wait_for_stats(server, lambda d: d["totals"]["queries"] >= 120)
    totals, series = document["totals"], document["series"]
    assert totals["queries"] == 120 and totals["errors"] == {"bad_dimension": 1.0}
    assert sum(series["queries"]) == 120  # the window holds every second since start
    assert document["window"]["errors"] == {"bad_dimension": 1.0}
    batch_counts = sum(count for _, count in document["window"]["batch_size"])
    assert batch_counts == totals["batches"] >= 1
    busy = [m for m in series["mean_batch"] if m is not None]
    assert busy and all(1 <= m <= 64 for m in busy)
    assert any(p is not None and p > 0 for p in series["p99_ms"])
    assert document["state"] == "ready" and document["uptime_s"] > 0
    assert document["matrix"]["n"] == 300 and document["matrix"]["dim"] == 8
    assert document["limits"]["max_batch"] == 64 and document["auth"] is False

    later = stats(server, since=series["t"][-1]).json()["series"]["t"]
    assert all(t > series["t"][-1] for t in later)


@pytest.mark.parametrize("since", ["yesterday", "nan", "inf"])
def test_a_bad_since_is_a_bad_request(server, since: str) -> None:
    answer = stats(server, since=since)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "bad_request"
    assert "unix time" in answer.json()["error"]["message"]
