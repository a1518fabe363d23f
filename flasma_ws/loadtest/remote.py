"""The server under load: its /info (`probe`) and its /metrics counters (`scrape`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import httpx

from ..client import http_url
from ..errors import ConfigError, FlasmaError
from ..metrics import read_samples


@dataclass(frozen=True)
class ServerUnderTest:
    """The server a run drives: its WebSocket and HTTP URLs and its /info."""

    ws_url: str
    http_url: str
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])


def http_base(ws_url: str) -> str:
    """The server's HTTP base URL (for /info, /metrics, /cos) from --url."""
    try:
        return http_url(ws_url)
    except ValueError as exc:
        raise ConfigError(f"--url must look like ws://HOST:PORT/ws; got {ws_url!r}.") from exc


def http_client(token: str | None = None) -> httpx.AsyncClient:
    """One keep-alive connection; trust_env=False: no proxies, contact the given URL only."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False, headers=headers)


async def probe(url: str, token: str | None = None) -> ServerUnderTest:
    """GET /info of the server behind `url`; a one-line FlasmaError when it cannot be used."""
    base = http_base(url)
    async with http_client(token) as http:
        try:
            response = await http.get(f"{base}/info", timeout=5.0)
        except httpx.HTTPError as exc:
            raise FlasmaError(f"Cannot reach {base}/info: {exc or type(exc).__name__}.") from exc
    if response.status_code == 401:
        raise FlasmaError(f"{base}/info answered HTTP 401: pass the server's --token.")
    if response.status_code != 200:
        raise FlasmaError(f"{base}/info answered HTTP {response.status_code}; is it flasma-ws?")
    info = response.json()
    if info.get("state") != "ready" or "dim" not in info:
        raise FlasmaError(f"The server at {base} is {info.get('state', 'not ready')}; retry later.")
    return ServerUnderTest(url, base, info)


@dataclass(frozen=True)
class ServerCounters:
    batch_sum: float = 0.0
    batch_count: float = 0.0
    engine_sum: float = 0.0
    engine_count: float = 0.0

    def __sub__(self, before: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a - b for a, b in zip(_values(self), _values(before))))


def _values(counters: ServerCounters) -> tuple[float, ...]:
    return dataclasses.astuple(counters)


async def scrape(http: httpx.AsyncClient, base: str) -> ServerCounters | None:
    """Batch-size and engine-time sums from /metrics; None when they cannot be read."""
    try:
        response = await http.get(f"{base}/metrics", timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    samples = read_samples(response.text)
    return ServerCounters(
        samples.get("flasma_batch_size_sum", 0.0),
        samples.get("flasma_batch_size_count", 0.0),
        samples.get("flasma_engine_seconds_sum", 0.0),
        samples.get("flasma_engine_seconds_count", 0.0),
    )
