"""The dashboard: its files, /ws auth by subprotocol, and the page itself in a real headless
chromium (Playwright driving the system's Debian `chromium`; skipped where there is none)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from flasma_ws import reference
from flasma_ws.auth import BEARER_PROTOCOL, token_protocol
from flasma_ws.client import SyncClient
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret/to+ken=="  # '/', '+' and '=' are not subprotocol characters: base64url is
SETTINGS = Settings(dim=16, demo_size=2_000, port=0, token=TOKEN)
BEARER = {"Authorization": f"Bearer {TOKEN}"}
TOKEN_KEY = "flasma-ws.token"


def get(server: BackgroundServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{server.http_url}{path}", timeout=10, trust_env=False, **kwargs)


# -- files ---------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_without_the_token(server) -> None:
    page = get(server, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/dashboard/app.js">' in page.text
    script = get(server, "/dashboard/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    chart = get(server, "/dashboard/vendor/uPlot.iife.min.js")
    assert chart.status_code == 200 and chart.text.startswith("/*! https://github.com/leeoniya")


@pytest.mark.parametrize(
    "path", ["/dashboard/nope.js", "/dashboard/vendor/uPlot.LICENSE", "/dashboard/../app.py"]
)
def test_anything_else_under_the_dashboard_is_404(server, path: str) -> None:
    answer = get(server, path)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_the_feed_and_info_need_the_token_like_info(server) -> None:
    assert get(server, "/stats").status_code == 401
    assert get(server, "/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    good = get(server, "/stats", headers=BEARER)
    assert good.status_code == 200 and good.json()["auth"] is True


def test_the_dashboard_runs_the_projects_js_client() -> None:
    shipped = (ROOT / "flasma_ws/dashboard/client.js").read_bytes()
    assert shipped == (ROOT / "clients/js/client.js").read_bytes()


# -- /ws auth by subprotocol ---------------------------------------------------------------
async def search_once(ws: Any) -> list:
    await ws.send(orjson.dumps({"id": 1, "embedding": [1.0] * 16, "k": 3}).decode())
    return orjson.loads(await ws.recv())["result"]


async def test_the_token_as_a_subprotocol_opens_ws_and_is_never_echoed(server) -> None:
    offered = [BEARER_PROTOCOL, token_protocol(TOKEN)]
    async with websockets.connect(server.url, subprotocols=offered) as ws:
        assert ws.subprotocol == BEARER_PROTOCOL
        assert ws.response.headers["Sec-WebSocket-Protocol"] == BEARER_PROTOCOL
        assert TOKEN not in str(ws.response.headers) and offered[1] not in str(ws.response.headers)
        assert len(await search_once(ws)) == 3


async def test_the_token_subprotocol_alone_is_accepted_without_selecting_one(server) -> None:
    async with websockets.connect(server.url, subprotocols=[token_protocol(TOKEN)]) as ws:
        assert ws.subprotocol is None
        assert len(await search_once(ws)) == 3


@pytest.mark.parametrize(
    "offered",
    [
        [BEARER_PROTOCOL],
        [BEARER_PROTOCOL, token_protocol("wrong")],
        [BEARER_PROTOCOL, token_protocol(TOKEN) + "x"],
        [BEARER_PROTOCOL, f"{BEARER_PROTOCOL}.{TOKEN.strip('=').replace('/', '_')}"],  # raw
    ],
)
async def test_a_missing_or_wrong_token_subprotocol_is_401(server, offered: list[str]) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(server.url, subprotocols=offered)
    assert refused.value.response.status_code == 401


async def test_the_header_still_works_and_the_plain_name_is_selected(server) -> None:
    async with websockets.connect(
        server.url, additional_headers=BEARER, subprotocols=[BEARER_PROTOCOL]
    ) as ws:
        assert ws.subprotocol == BEARER_PROTOCOL
        assert len(await search_once(ws)) == 3


# -- the page in a real browser ------------------------------------------------------------
def chromium_path() -> str | None:
    return os.environ.get("FLASMA_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("No chromium here (apt-get install chromium, or set FLASMA_CHROMIUM).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install '.[test]'")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    yield opened
    context.close()
    assert problems == [], problems  # no uncaught script error on the page


def submit_token(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")


def test_a_wrong_token_is_refused_and_the_right_one_kept_for_the_tab(page, server) -> None:
    page.goto(f"{server.http_url}/")
    page.wait_for_selector("#token-form", state="visible")
    assert page.is_hidden("#main")
    submit_token(page, "wrong")
    page.wait_for_selector("#token-error", state="visible")
    assert page.is_hidden("#main")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None

    submit_token(page, TOKEN)
    page.wait_for_selector("#main", state="visible")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == TOKEN
    page.reload()  # the tab keeps it: no question asked again
    page.wait_for_selector("#main", state="visible")
    assert page.is_hidden("#token-form")


def drive_load(server: BackgroundServer, stop: threading.Event) -> None:
    rng = np.random.default_rng(3)
    with SyncClient(server.url, token=TOKEN) as client:
        while not stop.is_set():
            client.query_many(rng.random((64, 16)), k=5)


def test_the_charts_show_a_load_and_the_console_answers_exactly(page, server, matrix) -> None:
    page.goto(f"{server.http_url}/")
    page.evaluate(f"sessionStorage.setItem('{TOKEN_KEY}', {orjson.dumps(TOKEN).decode()})")
    page.reload()
    page.wait_for_selector("#main", state="visible")
    stop = threading.Event()
    load = threading.Thread(target=drive_load, args=(server, stop), daemon=True)
    load.start()
    try:  # the q/s chart's own data (uPlot's) shows the load within a few polls
        page.wait_for_function(
            "() => (window.flasmaDashboard.charts['chart-qps']?.data[1] ?? [])"
            ".some((qps) => qps > 100)",
            timeout=60_000,
        )
    finally:
        stop.set()
        load.join(30)
    assert int(page.text_content("#matrix dd")) == 2_000  # rows (N)
    assert page.locator("#histogram .bar").count() >= 11

    row, k = 123, 7
    query = matrix[row] * 3.0 + 0.01  # a row's own vector, scaled and shifted
    page.fill("#vector", orjson.dumps(query.tolist()).decode())
    page.fill("#k", str(k))
    page.click("#search")
    page.wait_for_function("() => window.flasmaDashboard.lastResult !== null")
    hits = page.evaluate("window.flasmaDashboard.lastResult")
    rows, scores = reference.brute_force(matrix, query[None, :], k)
    assert [hit[0] for hit in hits] == rows[0].tolist()
    np.testing.assert_allclose([hit[1] for hit in hits], scores[0], atol=1e-5)
    assert page.locator("#results tr").count() == k
    assert "hits in" in page.text_content("#latency")
    assert page.is_hidden("#writes")  # no keyed writes on this server (/info: no "writable")

    page.fill("#key", str(row))  # a row by its key: its own vector becomes the query
    page.evaluate("window.flasmaDashboard.lastResult = null")
    page.click("#use-key")
    page.wait_for_function("() => window.flasmaDashboard.lastResult !== null")
    hits = page.evaluate("window.flasmaDashboard.lastResult")
    rows, scores = reference.brute_force(matrix, matrix[row][None, :], k)
    assert [hit[0] for hit in hits] == rows[0].tolist() and hits[0][0] == row
    np.testing.assert_allclose([hit[1] for hit in hits], scores[0], atol=1e-5)

    page.fill("#vector", "[1, 2, 3]")  # a wrong dimension: told, not thrown
    page.click("#search")
    page.wait_for_selector("#console-error", state="visible")
    assert "16" in page.text_content("#console-error")


def test_the_console_upserts_and_deletes_where_writes_are_enabled(page, tmp_path) -> None:
    settings = Settings(dim=16, demo_size=500, port=0, data_dir=tmp_path / "collection")
    vector = np.random.default_rng(11).standard_normal(16)
    with BackgroundServer(settings) as writable:
        page.goto(f"{writable.http_url}/")
        page.wait_for_selector("#writes", state="visible")
        page.fill("#vector", orjson.dumps(vector.tolist()).decode())
        page.fill("#write-key", "9000")
        page.click("#upsert")
        page.wait_for_function(
            "() => document.getElementById('write-result').textContent === 'upserted 1'"
        )
        page.wait_for_function(  # the feed counts live rows: 500 + the new key
            "() => document.querySelector('#matrix dd').textContent === '501'"
        )
        page.fill("#vector", "")
        page.fill("#key", "9000")
        page.fill("#k", "3")
        page.click("#use-key")  # the stored vector comes back and is searched
        page.wait_for_function("() => window.flasmaDashboard.lastResult !== null")
        hits = page.evaluate("window.flasmaDashboard.lastResult")
        assert hits[0][0] == 9000 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        stored = orjson.loads(page.input_value("#vector"))
        np.testing.assert_allclose(stored, vector / np.linalg.norm(vector), atol=1e-6)

        page.click("#delete")
        page.wait_for_function(
            "() => document.getElementById('write-result').textContent === 'deleted 1'"
        )
        page.click("#use-key")
        page.wait_for_selector("#console-error", state="visible")
        assert "9000" in page.text_content("#console-error")


# -- the JS client in Node -----------------------------------------------------------------
NODE_SCRIPT = """
import { FlasmaClient } from "%s";
const [url, token] = process.argv.slice(2);
const client = new FlasmaClient(url, { token, connectAttempts: 1 });
try {
  console.log(JSON.stringify(await client.query(new Array(16).fill(1), { k: 3 })));
} catch (error) {
  console.log(JSON.stringify({ refused: error.name }));
}
client.close();
"""


def node_query(server: BackgroundServer, token: str, tmp_path: Path) -> Any:
    node = shutil.which("node")
    if node is None:
        pytest.skip("No node here: the JS client's own test needs Node 20 or later.")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout[1:3])
    if major < 20:
        pytest.skip(f"Node {major} has no WebSocket; the client needs Node 20 or later.")
    script = tmp_path / "query.mjs"
    script.write_text(NODE_SCRIPT % (ROOT / "clients/js/client.js").as_uri())
    flags = ["--experimental-websocket"] if major < 22 else []
    result = subprocess.run(
        [node, *flags, str(script), server.url, token], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout.strip().splitlines()[-1])


def test_the_js_client_sends_its_token_as_a_subprotocol(server, matrix, tmp_path) -> None:
    hits = node_query(server, TOKEN, tmp_path)
    rows, _ = reference.brute_force(matrix, np.ones((1, 16)), 3)
    assert [hit[0] for hit in hits] == rows[0].tolist()
    assert node_query(server, "wrong", tmp_path) == {"refused": "FlasmaConnectionError"}
