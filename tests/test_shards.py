"""The matrix sharded over Ray actors: exact like one engine (ties included), faults answered.

One local Ray for the whole module (bounded CPUs and object store: a 2-core machine), started
by flasma_ws.shards.start_local_ray as `serve --shards` starts it, and stopped at the end with
every process it started. Skipped only where the `ray` extra is not installed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import websockets
from reference import assert_exact, pairs_to_arrays, stable_top_k

from flasma_ws import protocol, shards
from flasma_ws.errors import ConfigError
from flasma_ws.metrics import read_samples
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings
from flasma_ws.shard_merge import merge_top_k
from flasma_ws.testing import launch, wait_ready
from flasma_ws.vectors import load_matrix, open_demo, open_npy, open_targets

os.environ.setdefault(shards.LOOPBACK_ENV, "0")  # as serve does: a Ray on 127.0.0.1 only
ray = pytest.importorskip("ray")

DIM, N = 16, 3000
SHARD_CPUS = 0.25  # logical CPUs per actor: the server's and the tie test's shards fit in 2
SETTINGS = Settings(
    dim=DIM,
    demo_size=N,
    port=0,
    max_batch=32,
    shards=2,
    shard_cpus=SHARD_CPUS,
    shard_inflight=2,
    timeout_ms=60_000,  # a shard reload under load may take a while on 2 shared cores
)


def _processes(name: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One Ray for the module; afterwards none of the processes it started may be left."""
    before = _processes("raylet") | _processes("gcs_server")
    shards.start_local_ray(num_cpus=2, object_store_mib=200)
    started = _ray_processes() - before
    assert started, "the local Ray started no raylet"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()
    _assert_gone(started)


def _ray_processes() -> set[int]:
    return _processes("raylet") | _processes("gcs_server")


def _assert_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 30
    while pids & _ray_processes():
        assert time.monotonic() < deadline, "Ray's processes outlived their owner"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(local_ray: None) -> Iterator[BackgroundServer]:
    with BackgroundServer(SETTINGS, ready_timeout_s=300) as running:
        yield running


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return load_matrix(open_targets(None, DIM, N, 0))


def queries(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


# -- the merge alone -------------------------------------------------------------------------
def _sorted_part(rng: np.random.Generator, batch: int, k: int, first: int, n: int):
    """One shard's answer: distinct rows of its range, scores with many exact ties."""
    rows = np.stack([rng.choice(n, k, replace=False) for _ in range(batch)]) + first
    scores = (rng.integers(-4, 5, (batch, k)) / 4).astype(np.float32)
    scores[scores == 0] = np.where(rng.random((scores == 0).sum()) < 0.5, -0.0, 0.0)
    order = np.lexsort((rows, -scores), axis=1)  # the engine's order
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("widths", [[10], [10, 10], [3, 10, 1, 10], [10] * 64])
def test_merge_is_the_stable_top_k_of_all_answers(widths):
    rng = np.random.default_rng(len(widths))
    parts = [_sorted_part(rng, 32, w, 1000 * i, 1000) for i, w in enumerate(widths)]
    k = min(10, sum(widths))
    rows, scores = merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)
    all_rows = np.concatenate([p[0] for p in parts], axis=1)
    all_scores = np.concatenate([p[1] for p in parts], axis=1) + np.float32(0)
    want = np.lexsort((all_rows, -all_scores), axis=1)[:, :k]
    assert (rows == np.take_along_axis(all_rows, want, 1)).all()
    assert (scores == np.take_along_axis(all_scores, want, 1)).all()
    assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_merge_refuses_rows_that_do_not_fit_its_keys():
    with pytest.raises(ValueError, match="Row numbers"):
        merge_top_k([np.array([[1 << 32]])], [np.array([[1.0]], np.float32)], 1)


# -- settings and row ranges -----------------------------------------------------------------
def test_row_ranges_are_contiguous_and_cover_every_row():
    ranges = shards.row_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ConfigError, match="--shards"):
        shards.row_ranges(2, 3)


def test_shard_settings_are_checked():
    with pytest.raises(ConfigError, match="--ray-address needs --shards"):
        Settings(dim=4, ray_address="auto")
    with pytest.raises(ConfigError, match="--shards must be"):
        Settings(dim=4, shards=-1)
    with pytest.raises(ConfigError, match="--shard-inflight"):
        Settings(dim=4, shards=2, shard_inflight=0)


def test_a_shard_runs_as_many_compute_threads_as_whole_cpus_it_reserves():
    # As Ray's rule for OMP_NUM_THREADS: a fraction of a CPU still runs one thread.
    assert [shards.shard_threads(c) for c in (0, 0.25, 1, 1.5, 2, 4)] == [1, 1, 1, 1, 2, 4]


def test_data_dir_and_keys_with_shards_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not shard-aware"):
        Settings(dim=4, shards=2, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="--keys and --key-type str"):
        Settings(dim=4, shards=2, key_type="str")


def test_a_row_range_reads_the_rows_of_the_whole_source(tmp_path):
    demo = open_demo(500, 7, seed=3)
    assert np.array_equal(demo.row_range(120, 480).rows(10, 300), demo.rows(130, 420))
    standard = tmp_path / "m.npy"
    np.save(standard, demo.rows(0, 500))
    source = open_npy(standard)
    assert np.array_equal(source.row_range(200, 500).rows(0, 300), source.rows(200, 500))
    legacy = Path(__file__).parent.parent.parent / "shared/fixtures/flasma-legacy-10000x100.npy"
    if legacy.exists():
        source = open_npy(legacy, 100)
        part = source.row_range(4000, 9000)
        assert np.array_equal(part.rows(5, 40), source.rows(4005, 4040))
        assert np.array_equal(part.columns(5, 40), source.columns(4005, 4040))


# -- exact like one engine -------------------------------------------------------------------
def _tie_matrix(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Rows whose every cosine is exact in float32 (entries +-0.5 or one-hot, dim 4: scores
    are multiples of 1/4 whatever the summation order), repeated across every shard boundary,
    and zero rows (dropped with --drop-zero, row numbers kept)."""
    halves = np.array(np.meshgrid(*[[-0.5, 0.5]] * 4)).reshape(4, -1).T
    units = np.concatenate([halves, np.eye(4), -np.eye(4)])  # 24 unit rows
    rng = np.random.default_rng(5)
    matrix = units[rng.integers(0, len(units), 601)].astype(np.float32)
    matrix[[0, 7, 300, 599]] = 0.0
    path = tmp_path / "ties.npy"
    np.save(path, matrix)
    return path, matrix


def test_three_shards_answer_exactly_like_one_engine_ties_included(tmp_path):
    from flasma_ws.engine import Engine

    path, matrix = _tie_matrix(tmp_path)
    settings = Settings(npy=path, drop_zero=True, shards=3, shard_cpus=SHARD_CPUS, max_k=50)
    q = np.concatenate([matrix[[1, 2, 3, 4]], queries(6)[:, :4]])
    engine = shards.ShardedEngine(settings)
    try:
        assert engine.n == 597 and engine.targets.zero_rows == 4
        # Each shard's BLAS and TensorFlow pools hold the one CPU thread its 0.25 CPU allows.
        assert [s.info["threads"] for s in engine.shards] == [{"blas": 1, "tf_intra_op": 1}] * 3
        rows, scores = engine.search(q, 50)
    finally:
        engine.close()
    single = Engine(open_targets(path, None, drop_zero=True), settings.engine)
    one_rows, one_scores = single.search(q, 50)
    assert np.array_equal(rows, one_rows) and np.array_equal(scores, one_scores)
    # The float64 brute force, exact here: the lower row first among the many equal scores.
    unit = matrix.astype(np.float64)
    ref = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float64) @ unit.T
    ref[:, [0, 7, 300, 599]] = -np.inf  # the dropped rows
    assert np.array_equal(rows, stable_top_k(ref, 50))


async def test_two_shards_over_ws_and_http_are_exact(server, matrix):
    q = queries(70, seed=2)  # more rows than max_batch: several batches in flight
    async with websockets.connect(server.url) as ws:
        await ws.send(orjson.dumps({"id": 1, "embeddings": q.tolist(), "k": 7}).decode())
        answer = orjson.loads(await ws.recv())
    rows = np.array([[p[0] for p in r] for r in answer["results"]])
    scores = np.array([[p[1] for p in r] for r in answer["results"]])
    assert_exact(matrix, q, rows, scores, k=7)
    async with httpx.AsyncClient(base_url=server.http_url, trust_env=False) as http:
        body = (await http.post("/cos", json={"embedding": q[0].tolist()})).json()
    assert_exact(matrix, q[:1], *pairs_to_arrays(body["result"]), k=10)


async def test_info_lists_shards_and_metrics_count_per_shard(server):
    async with httpx.AsyncClient(base_url=server.http_url, trust_env=False) as http:
        info = (await http.get("/info")).json()
        health = await http.get("/healthz")
        await http.post("/cos", json={"embedding": queries(1).tolist()[0]})
        samples = read_samples((await http.get("/metrics")).text)
    assert health.status_code == 200 and health.json() == {"status": "ready"}
    assert info["n"] == N and [s["rows"] for s in info["shards"]] == [[0, 1500], [1500, N]]
    assert all(s["status"] == "ready" and s["node"] for s in info["shards"])
    assert all(s["threads"] == {"blas": 1, "tf_intra_op": 1} for s in info["shards"])
    assert all(s["lane"] for s in info["shards"])  # small batches skip Ray's round trip
    assert samples['flasma_shard_batches_total{way="lane"}'] >= 1
    for shard in ("0", "1"):
        assert samples[f'flasma_shard_call_seconds_count{{shard="{shard}"}}'] >= 1
        assert samples[f'flasma_shard_up{{shard="{shard}"}}'] == 1


# -- faults ----------------------------------------------------------------------------------
class Load:
    """Clients streaming queries over /ws; every answer is kept by request id."""

    def __init__(self, server: BackgroundServer, matrix: np.ndarray, clients: int = 4) -> None:
        self.server, self.matrix, self.clients = server, matrix, clients
        self.sent: dict[str, np.ndarray] = {}
        self.answers: dict[str, list[dict]] = {}
        self.stop = asyncio.Event()

    async def _client(self, c: int) -> None:
        rng = np.random.default_rng(100 + c)
        async with websockets.connect(self.server.url) as ws:
            i = 0
            while not self.stop.is_set():
                for _ in range(4):  # a few in flight per connection
                    rid = f"{c}-{i}"
                    i += 1
                    self.sent[rid] = rng.standard_normal((1, DIM)).astype(np.float32)
                    request = {"id": rid, "embedding": self.sent[rid][0].tolist(), "k": 5}
                    await ws.send(orjson.dumps(request).decode())
                for _ in range(4):
                    answer = orjson.loads(await ws.recv())
                    self.answers.setdefault(answer["id"], []).append(answer)

    def run(self) -> asyncio.Task:
        return asyncio.ensure_future(
            asyncio.gather(*(self._client(c) for c in range(self.clients)))
        )

    def check(self) -> tuple[int, dict[str, int]]:
        """(exact answers, errors by code); fails on a wrong, missing or repeated answer."""
        assert set(self.answers) == set(self.sent), "a request was never answered"
        exact, errors = 0, {}
        for rid, answers in self.answers.items():
            assert len(answers) == 1, f"request {rid} was answered {len(answers)} times"
            answer = answers[0]
            if "error" in answer:
                code = answer["error"]["code"]
                assert code in (protocol.UNAVAILABLE, protocol.TIMEOUT), answer
                errors[code] = errors.get(code, 0) + 1
                continue
            assert_exact(self.matrix, self.sent[rid], *pairs_to_arrays(answer["result"]), k=5)
            exact += 1
        return exact, errors


async def _until_back(server: BackgroundServer, shard: int, restarts: int) -> set[str]:
    """Wait until the shard has come back `restarts` times and answers; /healthz seen meanwhile."""
    engine = server.service.engine
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    async with httpx.AsyncClient(base_url=server.http_url, trust_env=False) as http:
        while True:
            seen.add((await http.get("/healthz")).json()["status"])
            state = engine.live_info()["shards"][shard]
            if state["restarts"] >= restarts and state["status"] == "ready":
                return seen
            assert time.monotonic() < deadline, f"shard {shard} did not come back: {state}"
            await asyncio.sleep(0.1)


async def test_a_killed_shard_comes_back_and_every_request_is_answered_once(server, matrix):
    engine = server.service.engine
    load = Load(server, matrix)
    running = load.run()
    try:
        await asyncio.sleep(1.0)
        # Ray's own kill, the actor allowed to restart: it reloads its rows.
        victim = engine.shards[0].actor
        killed = time.monotonic()
        ray.kill(victim, no_restart=False)
        seen = await _until_back(server, 0, restarts=1)
        back_s = time.monotonic() - killed
        assert "degraded" in seen  # /healthz said so (HTTP 200) while the shard reloaded
        await asyncio.sleep(1.0)
        # The worker process itself, killed by the operating system.
        os.kill(engine.live_info()["shards"][1]["pid"], signal.SIGKILL)
        await _until_back(server, 1, restarts=1)
        await asyncio.sleep(1.0)
    finally:
        load.stop.set()
        await asyncio.wait_for(running, 120)
    exact, errors = load.check()
    assert exact > 0
    # Both shards serve again, each over a new lane to its new process: a fresh query is
    # answered exactly, through the lanes.
    deadline = time.monotonic() + 10
    while not all(s["lane"] for s in engine.live_info()["shards"]):
        assert time.monotonic() < deadline, "no new lane to the restarted shards"
        await asyncio.sleep(0.05)
    lane_batches = 'flasma_shard_batches_total{way="lane"}'
    async with httpx.AsyncClient(base_url=server.http_url, trust_env=False) as http:
        before = read_samples((await http.get("/metrics")).text)[lane_batches]
    q = queries(3, seed=9)
    async with websockets.connect(server.url) as ws:
        await ws.send(orjson.dumps({"id": "after", "embeddings": q.tolist(), "k": 5}).decode())
        answer = orjson.loads(await ws.recv())
    rows = np.array([[p[0] for p in r] for r in answer["results"]])
    scores = np.array([[p[1] for p in r] for r in answer["results"]])
    assert_exact(matrix, q, rows, scores, k=5)
    async with httpx.AsyncClient(base_url=server.http_url, trust_env=False) as http:
        samples = read_samples((await http.get("/metrics")).text)
    assert samples[lane_batches] > before
    assert samples['flasma_shard_restarts_total{shard="0"}'] == 1
    assert samples['flasma_shard_restarts_total{shard="1"}'] == 1
    reload_s = engine.live_info()["shards"][0]["load_seconds"]
    print(f"answered exactly: {exact}, errors: {errors}; shard 0 back {back_s:.1f} s after the")
    print(f"kill, its reload (TensorFlow import, rows, warm-up) {reload_s:.1f} s")


async def test_a_request_whose_deadline_passes_while_a_shard_reloads_gets_timeout(server):
    engine = server.service.engine
    before = engine.live_info()["shards"][0]["restarts"]
    ray.kill(engine.shards[0].actor, no_restart=False)
    deadline = time.monotonic() + 60
    while engine.live_info()["shards"][0]["status"] != "reloading":
        assert time.monotonic() < deadline, "the shard never showed as reloading"
        await asyncio.sleep(0.05)
    async with websockets.connect(server.url) as ws:
        request = {"id": "late", "embedding": queries(1)[0].tolist(), "timeout_ms": 200}
        await ws.send(orjson.dumps(request).decode())
        answer = orjson.loads(await ws.recv())
    # The reload (a TensorFlow import, the rows, the warm-up) takes seconds, not 200 ms.
    assert answer["error"]["code"] == protocol.TIMEOUT, answer
    await _until_back(server, 0, restarts=before + 1)


def test_serve_shards_starts_a_local_ray_and_stops_it_on_exit(tmp_path):
    before = _ray_processes()
    args = ["--dim", "8", "--demo-size", "500", "--shards", "2", "--shard-cpus", "0.5"]
    server = launch(tmp_path / "serve.log", *args, "--ray-object-store-mib", "100")
    try:
        wait_ready(server, timeout_s=300)
        started = _ray_processes() - before
        info = httpx.get(f"{server.http_url}/info", trust_env=False).json()
    finally:
        code, _ = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    assert [s["rows"] for s in info["shards"]] == [[0, 250], [250, 500]]
    assert started, "serve --shards started no Ray of its own"
    _assert_gone(started)


def test_the_kuberay_manifest_runs_serve_with_real_options():
    yaml = pytest.importorskip("yaml")
    from flasma_ws.settings import leaves

    path = Path(__file__).parent.parent / "deploy" / "raycluster.yaml"
    cluster, service = yaml.safe_load_all(path.read_text())
    assert cluster["kind"] == "RayCluster" and service["kind"] == "Service"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    command = head["lifecycle"]["postStart"]["exec"]["command"][-1].split()
    serve = command[command.index("serve") + 1 : command.index(">")]
    flags = {"--" + leaf.flag.replace("_", "-") for leaf in leaves()}
    assert {word for word in serve if word.startswith("--")} <= flags
    assert "--shards" in serve and serve[serve.index("--ray-address") + 1] == "auto"
