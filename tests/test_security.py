"""Auth, TLS, Origins and connection limits, against real servers on loopback."""

from __future__ import annotations

import ssl

import httpx
import orjson
import pytest
import trustme
import websockets
from websockets.exceptions import InvalidStatus

from flasma_ws.errors import ConfigError
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings

DIM = 8
TOKEN = "s3cret-token"


def base(**changes: object) -> Settings:
    return Settings(dim=DIM, demo_size=200, port=0).replace(**changes)


def cos_body() -> dict:
    return {"embedding": [1.0] * DIM}


@pytest.fixture(scope="module")
def token_server():
    with BackgroundServer(base(token=TOKEN)) as running:
        yield running


def test_cos_and_info_need_the_bearer_token(token_server):
    url = token_server.http_url
    missing = httpx.post(f"{url}/cos", json=cos_body())
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{url}/cos", json=cos_body(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = httpx.post(f"{url}/cos", json=cos_body(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and len(good.json()["result"]) == 10
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no token


async def test_websocket_handshake_needs_the_bearer_token(token_server):
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(token_server.url)
    assert refused.value.response.status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with websockets.connect(token_server.url, additional_headers=headers) as ws:
        await ws.send(orjson.dumps({"id": 1, **cos_body()}).decode())
        assert len(orjson.loads(await ws.recv())["result"]) == 10


async def test_tls_serves_wss_and_https(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with BackgroundServer(base(certfile=certfile, keyfile=keyfile)) as running:
        assert running.url.startswith("wss://")
        async with websockets.connect(running.url, ssl=client_context) as ws:
            await ws.send(orjson.dumps({"id": "tls", **cos_body()}).decode())
            assert orjson.loads(await ws.recv())["id"] == "tls"
        with httpx.Client(verify=client_context) as client:
            assert client.post(f"{running.http_url}/cos", json=cos_body()).status_code == 200
        with pytest.raises(ssl.SSLError):  # an untrusting client refuses the self-signed cert
            async with websockets.connect(running.url, ssl=ssl.create_default_context()):
                pass


async def test_only_allowed_origins_may_connect():
    with BackgroundServer(base(allowed_origins=("https://app.example",))) as running:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(running.url, origin="https://evil.example")
        assert refused.value.response.status_code == 403
        async with websockets.connect(running.url, origin="https://app.example") as ws:
            await ws.send(orjson.dumps({"id": 2, **cos_body()}).decode())
            assert orjson.loads(await ws.recv())["id"] == 2
        async with websockets.connect(running.url) as ws:  # no Origin: not a browser
            await ws.send(orjson.dumps({"id": 3, **cos_body()}).decode())
            assert orjson.loads(await ws.recv())["id"] == 3


async def test_connections_beyond_the_limit_are_refused_cleanly():
    with BackgroundServer(base(max_connections=2)) as running:
        first = await websockets.connect(running.url)
        second = await websockets.connect(running.url)
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(running.url)
        assert refused.value.response.status_code == 503
        assert b"too_many_connections" in refused.value.response.body
        await first.close()
        await second.send(orjson.dumps({"id": 4, **cos_body()}).decode())
        assert orjson.loads(await second.recv())["id"] == 4  # the others keep working
        async with websockets.connect(running.url) as third:  # a slot freed up
            await third.send(orjson.dumps({"id": 5, **cos_body()}).decode())
            assert orjson.loads(await third.recv())["id"] == 5
        await second.close()


def test_large_cos_body_gets_413():
    with BackgroundServer(base(max_body_bytes=1000)) as running:
        body = orjson.dumps({"embedding": [1.0] * 400})
        response = httpx.post(f"{running.http_url}/cos", content=body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"


async def test_frames_over_the_limit_close_with_1009_and_others_are_unaffected():
    with BackgroundServer(base(max_frame_bytes=2000)) as running:
        async with websockets.connect(running.url) as other:
            big = await websockets.connect(running.url, max_size=None)
            await big.send("x" * 5000)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await big.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            await other.send(orjson.dumps({"id": 6, **cos_body()}).decode())
            assert orjson.loads(await other.recv())["id"] == 6


def test_tls_settings_are_checked():
    with pytest.raises(ConfigError, match="both --certfile and --keyfile"):
        base(certfile="cert.pem")
    with pytest.raises(ConfigError, match="does not exist"):
        base(certfile="missing.pem", keyfile="missing.key")
