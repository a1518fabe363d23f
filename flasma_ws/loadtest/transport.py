"""Who carries a frame: one `Transport` per connection, WebSocket or POST /cos.

A transport sends a frame and returns at once the future of its answer (a `TopK`, or
`ServerError` with the server's code, or `ConnectionLost`), so that the closed loop (await it)
and the open loop (a done callback) drive both kinds the same way.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httpx

from ..client import Connection, ConnectionLost, TopK, top_k
from ..errors import ServerError
from ..protocol import decode_cos_answer
from .config import LoadConfig
from .remote import ServerUnderTest, http_client
from .workload import Workload

CONNECTION_ERROR = "connection"  # errors-by-code key for a lost or refused connection
_JSON = {"content-type": "application/json"}


class Transport(Protocol):
    async def open(self) -> None: ...

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        """Send workload frame `frame`; the future of its answer. ConnectionLost if it
        could not be sent."""
        ...

    async def close(self) -> None:
        """Close the connection; answers still awaited are abandoned."""
        ...


def outcome(future: asyncio.Future[TopK]) -> tuple[str, TopK | None]:
    """("ok", result) or (error code, None) for a finished answer."""
    if future.cancelled():
        return CONNECTION_ERROR, None
    exc = future.exception()
    if exc is None:
        return "ok", future.result()
    return (exc.code if isinstance(exc, ServerError) else CONNECTION_ERROR), None


async def exchange(transport: Transport, frame: int) -> tuple[str, TopK | None]:
    """Send a frame and wait for its answer: ("ok", result) or (error code, None)."""
    try:
        return "ok", await (await transport.send(frame))
    except ServerError as exc:
        return exc.code, None
    except ConnectionLost:
        return CONNECTION_ERROR, None


class WsTransport:
    """One pipelined WebSocket `Connection`: any number of frames in flight."""

    def __init__(self, server: ServerUnderTest, workload: Workload, token: str | None) -> None:
        self.connection = Connection(server.ws_url, connect_attempts=2, token=token)
        self.frames = workload.frames

    async def open(self) -> None:
        await self.connection.connect()

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        return await self.connection.send(self.frames[frame])  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.connection.close()


class HttpTransport:
    """One keep-alive HTTP/1.1 connection for POST /cos.

    Requests wait their turn on a FIFO lock rather than in httpx's pool, whose waiting list
    gets slow with hundreds of waiters (an open loop beyond capacity collapsed to 25 q/s).
    httpx has no send-without-waiting, so each request here is a task.
    """

    def __init__(self, server: ServerUnderTest, workload: Workload, token: str | None) -> None:
        self.url = f"{server.http_url}/cos"
        self.client = http_client(token)
        self.lock = asyncio.Lock()
        self.bodies = workload.frames
        self.tasks: set[asyncio.Task[TopK]] = set()

    async def open(self) -> None:
        """Connects on the first request."""

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        task = asyncio.get_running_loop().create_task(self.post(self.bodies[frame]))  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def post(self, body: bytes) -> TopK:
        async with self.lock:
            try:
                response = await self.client.post(self.url, content=body, headers=_JSON)
            except httpx.HTTPError as exc:
                raise ConnectionLost(f"POST {self.url} failed: {exc}") from exc
        answer = decode_cos_answer(response.content)
        if answer.error is not None:
            raise ServerError(*answer.error)
        if response.status_code != 200:
            raise ServerError(f"http_{response.status_code}", f"HTTP {response.status_code}")
        return top_k(answer, multi=False)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.aclose()


def transports(server: ServerUnderTest, workload: Workload, config: LoadConfig) -> list[Transport]:
    """One transport per connection of the run."""
    if config.http:
        return [HttpTransport(server, workload, config.token) for _ in range(config.connections)]
    return [WsTransport(server, workload, config.token) for _ in range(config.connections)]
