"""The route table: dispatch, 404, 405 with Allow, 426, and the error table's statuses, driven
through the ASGI app alone (no listener, no engine: the service stays loading)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from flasma_ws import protocol
from flasma_ws.app import ROUTES, App
from flasma_ws.protocol import Code
from flasma_ws.service import Service
from flasma_ws.settings import Settings


def http(path: str, method: str = "GET", token: str | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request to an app whose service is still loading."""
    settings = Settings(dim=4, demo_size=10, port=0, token=token)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": []}
    asyncio.run(App(Service(settings))(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = sent[1]["body"]
    return sent[0]["status"], headers, orjson.loads(body) if path != "/metrics" else {}


def test_unknown_path_is_404_naming_every_route() -> None:
    status, _, body = http("/nope")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert all(route.path in body["error"]["message"] for route in ROUTES)


@pytest.mark.parametrize(
    ("path", "method", "allow"), [("/cos", "GET", "POST"), ("/healthz", "POST", "GET, HEAD")]
)
def test_wrong_method_is_405_with_allow(path: str, method: str, allow: str) -> None:
    status, headers, body = http(path, method)
    assert (status, body["error"]["code"], headers["allow"]) == (405, "method_not_allowed", allow)


def test_http_to_the_websocket_route_is_426() -> None:
    status, headers, _ = http("/ws")
    assert (status, headers["upgrade"]) == (426, "websocket")


def test_guarded_routes_need_the_token_and_probes_do_not() -> None:
    assert http("/info", token="t")[0] == 401
    assert http("/healthz", token="t")[0] == 503  # open, and says it is loading
    assert http("/metrics", token="t")[0] == 200


def test_every_code_has_a_status_and_a_meaning() -> None:
    assert {code.value for code in Code if code.ws} == set(protocol.ERROR_CODES)
    assert all(code.status >= 400 and code.meaning for code in Code)
    assert protocol.http_status("something_else") == 400
