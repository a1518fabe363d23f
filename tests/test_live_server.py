"""A live collection served for real: writes over /ws and HTTP, answers checked against a
float64 brute force over the rows live at that moment, restarts from the data directory."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import websockets
from reference import assert_exact_scores, reference_scores

from flasma_ws.collection import COMPACTOR_NICE
from flasma_ws.errors import ConfigError, StorageError
from flasma_ws.protocol import Codec, encode_binary_query
from flasma_ws.reference import unit_rows
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings
from flasma_ws.vectors import load_matrix, open_targets
from flasma_ws.write_codec import encode_binary_upsert

DIM, N = 16, 300
DEMO = {"dim": DIM, "demo_size": N, "demo_seed": 3}


def serving(**values: object) -> Settings:
    return Settings(port=0, **values)  # any free loopback port


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("collection") / "data"


@pytest.fixture(scope="module")
def live(data_dir: Path) -> Iterator[BackgroundServer]:
    settings = serving(**DEMO, data_dir=data_dir, max_rows=N + 40, compact_min_rows=1_000_000)
    with BackgroundServer(settings) as running:
        yield running


def model_start() -> dict[object, np.ndarray]:
    rows = load_matrix(open_targets(None, DIM, N, 3))
    return dict(enumerate(rows))


async def call(url: str, *frames: dict) -> list[dict]:
    async with websockets.connect(url) as ws:
        for frame in frames:
            await ws.send(orjson.dumps(frame).decode())
        answers = [orjson.loads(await ws.recv()) for _ in frames]
    return sorted(answers, key=lambda a: a["id"])


def assert_search_exact(url: str, model: dict[object, np.ndarray], queries: np.ndarray, k: int):
    frames = [{"id": i, "embedding": q.tolist(), "k": k} for i, q in enumerate(queries)]
    answers = asyncio.run(call(url, *frames))
    keys = list(model)
    index = {key: i for i, key in enumerate(keys)}
    ref = reference_scores(np.stack(list(model.values())), queries)
    for answer, ref_row in zip(answers, ref):
        pairs = answer["result"]
        assert len(pairs) == min(k, len(keys))
        assert all(key in index for key, _ in pairs), "a deleted or unknown key came back"
        rows = np.array([[index[key] for key, _ in pairs]])
        scores = np.array([[score for _, score in pairs]])
        assert_exact_scores(ref_row[None], rows, scores, k)


def test_writes_are_seen_by_the_next_search_on_another_connection(live: BackgroundServer):
    model = model_start()
    rng = np.random.default_rng(1)
    fresh = rng.standard_normal((5, DIM)).astype(np.float32)
    items = [{"key": 1000 + i, "embedding": v.tolist()} for i, v in enumerate(fresh)]
    items.append({"key": 7, "embedding": fresh[0].tolist()})  # replaces row 7: a tie with 1000
    (answer,) = asyncio.run(call(live.url, {"id": 1, "op": "upsert", "items": items}))
    assert answer == {"id": 1, "upserted": 6}
    for i, v in enumerate(fresh):
        model[1000 + i] = unit_rows(v)[0].astype(np.float32)
    model.pop(7)
    model[7] = unit_rows(fresh[0])[0].astype(np.float32)
    (answer,) = asyncio.run(call(live.url, {"id": 2, "op": "delete", "keys": [3, 4, 99_999]}))
    assert answer == {"id": 2, "deleted": 2}  # 99,999 never existed
    model.pop(3), model.pop(4)
    # A new connection, after the acknowledgements: it sees every write.
    queries = np.concatenate([fresh, rng.standard_normal((6, DIM)).astype(np.float32)])
    assert_search_exact(live.url, model, queries, 10)


def test_get_returns_the_stored_normalized_vector_or_null(live: BackgroundServer):
    vector = np.arange(1, DIM + 1, dtype=np.float32)
    asyncio.run(
        call(
            live.url,
            {"id": 1, "op": "upsert", "items": [{"key": 2000, "embedding": vector.tolist()}]},
        )
    )
    (answer,) = asyncio.run(call(live.url, {"id": 5, "op": "get", "keys": [2000, 555_555, 2000]}))
    first, missing, again = answer["items"]
    assert missing is None and first == again and first["key"] == 2000
    assert np.array_equal(np.float32(first["embedding"]), unit_rows(vector)[0].astype(np.float32))
    got = httpx.get(f"{live.http_url}/vectors/2000").json()
    assert got["key"] == 2000 and np.allclose(got["embedding"], first["embedding"])
    absent = httpx.get(f"{live.http_url}/vectors/555555")
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "not_found"


def test_bad_items_get_one_error_each_and_the_rest_apply(live: BackgroundServer):
    good = [1.0] + [0.0] * (DIM - 1)
    items = [
        {"key": 3000, "embedding": good},
        {"key": "x", "embedding": good},  # bad_key: this server has int keys
        {"key": 3001, "embedding": [0.0] * DIM},  # bad_value: zero
        {"key": 3002, "embedding": [1.0] * (DIM - 1)},  # bad_dimension
        {"key": 3000, "embedding": good},  # bad_key: twice in one frame
        {"key": -1, "embedding": good},  # bad_key: out of range
        {"key": 3003},  # bad_request
    ]
    (answer,) = asyncio.run(call(live.url, {"id": 9, "op": "upsert", "items": items}))
    assert answer["upserted"] == 1
    codes = {e["index"]: e["code"] for e in answer["errors"]}
    assert codes == {
        1: "bad_key",
        2: "bad_value",
        3: "bad_dimension",
        4: "bad_key",
        5: "bad_key",
        6: "bad_request",
    }
    assert all(e["message"] for e in answer["errors"])
    (frame_error,) = asyncio.run(call(live.url, {"id": 10, "op": "upsert", "items": []}))
    assert frame_error["error"]["code"] == "bad_request"


def test_upserts_beyond_max_rows_get_full(live: BackgroundServer):
    info = httpx.get(f"{live.http_url}/info").json()
    room = info["max_rows"] - info["n"]
    items = [{"key": 50_000 + i, "embedding": [1.0] * DIM} for i in range(room + 3)]
    (answer,) = asyncio.run(call(live.url, {"id": 1, "op": "upsert", "items": items}))
    assert answer["upserted"] == room
    assert [e["code"] for e in answer["errors"]] == ["full"] * 3
    # Replacing an existing key still works at the limit; deleting makes room.
    (replace,) = asyncio.run(call(live.url, {"id": 2, "op": "upsert", "items": items[:1]}))
    assert replace == {"id": 2, "upserted": 1}
    deleted = httpx.post(f"{live.http_url}/vectors/delete", json={"keys": [50_000, 50_001]})
    assert deleted.json() == {"deleted": 2}
    added = httpx.post(f"{live.http_url}/vectors", json={"items": items[-1:]})
    assert added.json() == {"upserted": 1}
    cleanup = {"keys": [item["key"] for item in items]}
    assert httpx.post(f"{live.http_url}/vectors/delete", json=cleanup).json()["deleted"] == room - 1


def test_binary_upsert_and_keyed_binary_answers(live: BackgroundServer):
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3, DIM)).astype(np.float32)
    big = [2**40, 2**40 + 1, 2**62]  # keys beyond u32: binary answers carry u64 keys

    async def go() -> tuple[dict, tuple]:
        async with websockets.connect(live.url) as ws:
            await ws.send(encode_binary_upsert(77, big, vectors))
            ack = orjson.loads(await ws.recv())
            await ws.send(encode_binary_query(78, vectors[2], k=1))
            return ack, Codec.decode_binary_result(await ws.recv())

    ack, (request_id, rows, scores) = asyncio.run(go())
    assert ack == {"id": 77, "upserted": 3}
    assert request_id == 78 and rows.dtype == np.dtype("<u8") and int(rows[0, 0]) == 2**62
    assert abs(float(scores[0, 0]) - 1.0) < 1e-6


def test_restart_recovers_every_acknowledged_write(live: BackgroundServer, data_dir: Path):
    before = httpx.get(f"{live.http_url}/info").json()["n"]
    (answer,) = asyncio.run(call(live.url, {"id": 1, "op": "get", "keys": [1000, 7, 3, 2000]}))
    live.stop()
    with BackgroundServer(serving(data_dir=data_dir)) as again:
        assert httpx.get(f"{again.http_url}/info").json()["n"] == before
        (after,) = asyncio.run(call(again.url, {"id": 1, "op": "get", "keys": [1000, 7, 3, 2000]}))
    assert after["items"] == answer["items"] and answer["items"][2] is None


def test_a_conflicting_start_is_refused(data_dir: Path):
    with pytest.raises(ConfigError, match="already holds a collection"):
        BackgroundServer(serving(**DEMO, data_dir=data_dir, npy=data_dir / "x.npy")).start()
    with pytest.raises(ConfigError, match="dimension"):
        BackgroundServer(serving(dim=DIM + 1, data_dir=data_dir)).start()


def test_a_server_without_data_dir_refuses_writes_and_answers_gets():
    with BackgroundServer(serving(**DEMO)) as server:
        frames = [
            {"id": 1, "op": "upsert", "items": [{"key": 1, "embedding": [1.0] * DIM}]},
            {"id": 2, "op": "get", "keys": [5]},
        ]
        refused, got = asyncio.run(call(server.url, *frames))
        http = httpx.post(f"{server.http_url}/vectors/delete", json={"keys": [1]})
    assert refused["error"]["code"] == "read_only" and "--data-dir" in refused["error"]["message"]
    assert got["items"][0]["key"] == 5
    assert http.status_code == 403 and http.json()["error"]["code"] == "read_only"


def test_a_damaged_snapshot_is_refused_with_a_clear_message(tmp_path: Path):
    data = tmp_path / "data"
    with BackgroundServer(serving(**DEMO, data_dir=data)):
        pass
    (vectors,) = data.glob("snapshots/*/vectors.npy")
    raw = bytearray(vectors.read_bytes())
    raw[-5] ^= 0xFF
    vectors.write_bytes(bytes(raw))
    with pytest.raises(StorageError):
        BackgroundServer(serving(data_dir=data)).start()


def test_compaction_while_serving_keeps_answers_exact_and_survives_a_restart(tmp_path: Path):
    data = tmp_path / "data"
    settings = serving(**DEMO, data_dir=data, compact_min_rows=20, compact_fraction=0.01)
    model = model_start()
    rng = np.random.default_rng(9)
    with BackgroundServer(settings) as server:
        for frame in range(6):  # 6 x 10 upserts and a delete each: several compactions
            vectors = rng.standard_normal((10, DIM)).astype(np.float32)
            keys = [5000 + frame * 10 + i for i in range(10)]
            items = [{"key": k, "embedding": v.tolist()} for k, v in zip(keys, vectors)]
            asyncio.run(call(server.url, {"id": 1, "op": "upsert", "items": items}))
            asyncio.run(call(server.url, {"id": 2, "op": "delete", "keys": [frame]}))
            for key, vector in zip(keys, vectors):
                model[key] = unit_rows(vector)[0].astype(np.float32)
            model.pop(frame)
            assert_search_exact(server.url, model, rng.standard_normal((4, DIM)), 8)
        # Compaction runs in the background: wait (bounded) until one has finished and its
        # retirement of older snapshots is done, then check.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = httpx.get(f"{server.http_url}/info").json()
            snapshots = list(data.glob("snapshots/snap-*"))
            if info["compactions"] >= 1 and len(snapshots) == 1:
                break
            time.sleep(0.05)
    assert info["compactions"] >= 1 and info["n"] == len(model)
    assert len(snapshots) == 1  # older snapshots retired
    with BackgroundServer(serving(data_dir=data)) as again:
        assert_search_exact(again.url, model, rng.standard_normal((4, DIM)), 8)


def test_writes_during_a_compaction_do_not_start_another(tmp_path: Path):
    """A compaction takes every row written before its freeze: the writes that arrive while
    it runs (fewer than --compact-min-rows) must not start a second one right after it."""
    settings = serving(**DEMO, data_dir=tmp_path / "data", compact_min_rows=20)
    rng = np.random.default_rng(4)

    def upsert(keys: list[int]) -> None:
        vectors = rng.standard_normal((len(keys), DIM))
        items = [{"key": k, "embedding": v.tolist()} for k, v in zip(keys, vectors)]
        asyncio.run(call(server.url, {"id": 1, "op": "upsert", "items": items}))

    with BackgroundServer(settings) as server:
        upsert(list(range(9000, 9025)))  # due: 25 >= 20
        for key in range(9100, 9115):  # 15 more, most while the compaction runs
            upsert([key])
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.http_url}/info").json()["compactions"] < 1:
            assert time.monotonic() < deadline, "no compaction in 60 s"
            time.sleep(0.05)
        time.sleep(2)  # time for a second one to start and finish
        info = httpx.get(f"{server.http_url}/info").json()
    assert info["compactions"] == 1
    assert info["n"] == N + 40


def test_the_compactor_thread_yields_the_cpu_to_searches_and_writes(tmp_path: Path):
    """Its build and snapshot ran at the serving threads' priority and delayed write acks by
    up to 90 ms on 2 vCPUs: it now runs niced, alone (the serving threads keep theirs)."""
    with BackgroundServer(serving(**DEMO, data_dir=tmp_path / "data")):
        threads = {t.name: t.native_id for t in threading.enumerate()}
        own = os.getpriority(os.PRIO_PROCESS, 0)
        expected = max(COMPACTOR_NICE, own)  # nice can only go up without privileges
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, threads["flasma-compact"]) != expected:
            assert time.monotonic() < deadline, "the compactor kept its priority"
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, threads["flasma-wal"]) == own
        assert os.getpriority(os.PRIO_PROCESS, 0) == own


def test_string_keys_from_a_keys_file(tmp_path: Path):
    rows = np.random.default_rng(2).standard_normal((50, DIM)).astype(np.float32)
    np.save(tmp_path / "v.npy", rows)
    (tmp_path / "keys.txt").write_text("".join(f"doc-{i}\n" for i in range(50)))
    settings = serving(
        npy=tmp_path / "v.npy", keys=tmp_path / "keys.txt", key_type="str", data_dir=tmp_path / "d"
    )
    with BackgroundServer(settings) as server:
        item = {"key": "new", "embedding": rows[3].tolist()}
        frames = [
            {"id": 1, "op": "upsert", "items": [item]},
            {"id": 2, "op": "delete", "keys": ["doc-3"]},
        ]
        asyncio.run(call(server.url, *frames))
        (answer,) = asyncio.run(call(server.url, {"id": 3, "embedding": rows[3].tolist(), "k": 2}))
        binary = asyncio.run(_binary_query(server.url, rows[3]))
    assert answer["result"][0][0] == "new" and "doc-3" not in [k for k, _ in answer["result"]]
    assert binary["results"][0][0][0] == "new"  # a str-key server answers binary in JSON


async def _binary_query(url: str, vector: np.ndarray) -> dict:
    async with websockets.connect(url) as ws:
        await ws.send(encode_binary_query(5, vector, k=2))
        return orjson.loads(await ws.recv())
