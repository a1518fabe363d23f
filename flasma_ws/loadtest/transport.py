"""Who carries a frame: one `Transport` per connection, WebSocket or POST /cos.

A transport sends a frame and returns at once the future of its answer (a `TopK`, or
`ServerError` with the server's code, or `ConnectionLost`), so that the closed loop (await it)
and the open loop (a done callback) drive both kinds the same way. Writes (--write-ratio) go
over the same connections: `send_write` returns the future of the write's JSON answer.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

import httpx
import numpy as np
import orjson
from websockets.exceptions import ConnectionClosed

from ..client import Connection, ConnectionLost, TopK, top_k
from ..errors import ServerError
from ..keys import Key
from ..protocol import decode_cos_answer
from ..write_codec import encode_binary_upsert
from .config import LoadConfig
from .remote import ServerUnderTest, http_client
from .workload import Workload

CONNECTION_ERROR = "connection"  # errors-by-code key for a lost or refused connection
_JSON = {"content-type": "application/json"}
WriteOp = Literal["upsert", "delete"]


class Transport(Protocol):
    async def open(self) -> None: ...

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        """Send workload frame `frame`; the future of its answer. ConnectionLost if it
        could not be sent."""
        ...

    async def send_write(
        self, op: WriteOp, keys: list[int], vectors: np.ndarray | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        """Send an upsert (`vectors`: (len(keys), dim) float32) or a delete; the future of its
        JSON answer ({"upserted": n} ...). ConnectionLost if it could not be sent."""
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


def write_body(op: WriteOp, keys: list[int], vectors: np.ndarray | None) -> dict[str, Any]:
    """The JSON fields of an upsert or a delete (a /ws frame adds "id" and "op")."""
    if op == "delete":
        return {"keys": keys}
    assert vectors is not None
    return {"items": [{"key": key, "embedding": v} for key, v in zip(keys, vectors)]}


class MixedConnection(Connection):
    """A `Connection` that also carries writes: their JSON answers ({"upserted"} or
    {"deleted"}, or an error naming a write's id) resolve the write's future; every other
    answer goes to the searches as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writes: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def send_write(self, build: Any, binary: bool) -> asyncio.Future[dict[str, Any]]:
        """Send the frame `build(request_id)`; the future of its JSON answer."""
        if self._ws is None:
            await self.connect()
        ws = self._ws
        if ws is None:
            raise ConnectionLost(f"The connection to {self.url} closed right after opening.")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._writes[request_id] = future
        try:
            await ws.send(build(request_id), text=not binary)
        except ConnectionClosed as exc:
            self._writes.pop(request_id, None)
            self._drop(ws)
            raise ConnectionLost(f"The connection to {self.url} closed ({exc}).") from exc
        return future

    def _resolve(self, message: str | bytes) -> None:
        if self._writes and isinstance(message, str):  # while writes are out: read the id
            answer = orjson.loads(message)
            future = self._writes.pop(answer.get("id"), None)
            if future is not None:
                if not future.done():
                    error = answer.get("error")
                    if error is not None:
                        future.set_exception(ServerError(error["code"], error["message"]))
                    else:
                        future.set_result(answer)
                return
        super()._resolve(message)

    def _fail_pending(self, exc: ConnectionLost) -> None:
        writes, self._writes = self._writes, {}
        for future in writes.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a write abandoned at close must not warn
        super()._fail_pending(exc)


class WsTransport:
    """One pipelined WebSocket `Connection`: any number of frames in flight."""

    def __init__(self, server: ServerUnderTest, workload: Workload, token: str | None) -> None:
        self.connection = MixedConnection(server.ws_url, connect_attempts=2, token=token)
        self.frames = workload.frames
        self.binary = bool(workload.frames) and getattr(workload.frames[0], "binary", False)

    async def open(self) -> None:
        await self.connection.connect()

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        return await self.connection.send(self.frames[frame])  # type: ignore[arg-type]

    async def send_write(
        self, op: WriteOp, keys: list[int], vectors: np.ndarray | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        if op == "upsert" and self.binary:
            assert vectors is not None
            frame_keys: list[Key] = list(keys)
            return await self.connection.send_write(
                lambda request_id: encode_binary_upsert(request_id, frame_keys, vectors), True
            )
        body = orjson.dumps(write_body(op, keys, vectors), option=orjson.OPT_SERIALIZE_NUMPY)
        head = b'{"id":%d,"op":"' + op.encode() + b'",'
        return await self.connection.send_write(
            lambda request_id: head % request_id + body[1:], False
        )

    async def close(self) -> None:
        await self.connection.close()


class HttpTransport:
    """One keep-alive HTTP/1.1 connection for POST /cos.

    Requests wait their turn on a FIFO lock rather than in httpx's pool, whose waiting list
    gets slow with hundreds of waiters (an open loop beyond capacity collapsed to 25 q/s).
    httpx has no send-without-waiting, so each request here is a task.
    """

    def __init__(self, server: ServerUnderTest, workload: Workload, token: str | None) -> None:
        self.base = server.http_url
        self.url = f"{server.http_url}/cos"
        self.client = http_client(token)
        self.lock = asyncio.Lock()
        self.bodies = workload.frames
        self.tasks: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        """Connects on the first request."""

    async def send(self, frame: int) -> asyncio.Future[TopK]:
        task = asyncio.get_running_loop().create_task(self.post(self.bodies[frame]))  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def send_write(
        self, op: WriteOp, keys: list[int], vectors: np.ndarray | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        body = orjson.dumps(write_body(op, keys, vectors), option=orjson.OPT_SERIALIZE_NUMPY)
        route = "/vectors" if op == "upsert" else "/vectors/delete"
        task = asyncio.get_running_loop().create_task(self.post_write(route, body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def post_write(self, route: str, body: bytes) -> dict[str, Any]:
        response = await self._post(f"{self.base}{route}", body)
        answer = orjson.loads(response.content)
        if "error" in answer:
            raise ServerError(answer["error"]["code"], answer["error"]["message"])
        return answer  # type: ignore[no-any-return]

    async def _post(self, url: str, body: bytes) -> httpx.Response:
        async with self.lock:
            try:
                return await self.client.post(url, content=body, headers=_JSON)
            except httpx.HTTPError as exc:
                raise ConnectionLost(f"POST {url} failed: {exc}") from exc

    async def post(self, body: bytes) -> TopK:
        response = await self._post(self.url, body)
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
