"""A Python client for the flasma-ws WebSocket protocol (docs/protocol.md).

One persistent connection carries every request; requests are pipelined and answers are matched
by correlation id, so many tasks may await `query` at once on one `Client`:

    async with Client("ws://127.0.0.1:8080/ws") as client:
        hits = await client.query(vector, k=10)      # TopK: ids (k,), scores (k,)
        many = await client.query_many(matrix, k=5)  # TopK: ids (Q, 5), scores (Q, 5)
        for index, score in hits.pairs(): ...

Answers are `TopK` named tuples of numpy arrays: `ids` (int64 row numbers of the server's
matrix) and `scores` (float32 cosine similarities), best first. A server error raises
`ServerError` with the server's `code`; a dropped connection fails the requests in flight with
`ConnectionLost`, and the next request reconnects with exponential backoff. `SyncClient` wraps
all this for scripts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl as ssl_module
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .errors import AuthError, ConnectionLost, ServerError
from .protocol import Answer, EncodedRequest, decode_answer, encode_request
from .settings import LimitSettings
from .text import counted

__all__ = [
    "AuthError",
    "Client",
    "Connection",
    "ConnectionLost",
    "ServerError",
    "SyncClient",
    "TopK",
    "http_url",
    "server_info",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_FRAME_QUERIES = LimitSettings().max_queries_per_frame  # the server's default
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # answers of large multi-query frames exceed 1 MiB


class TopK(NamedTuple):
    """Best matches, best first: int64 row `ids` and float32 cosine `scores`.

    Shape (k,) for one query, (Q, k) for `query_many`.
    """

    ids: np.ndarray
    scores: np.ndarray

    def pairs(self) -> list[tuple[int, float]] | list[list[tuple[int, float]]]:
        """As lists of (index, score), like the JSON wire format."""
        if self.ids.ndim == 1:
            return list(zip(self.ids.tolist(), self.scores.tolist()))
        return [list(zip(i, s)) for i, s in zip(self.ids.tolist(), self.scores.tolist())]


class Connection:
    """One persistent, pipelined WebSocket connection: encoded requests out, answers matched to
    their futures by id as they arrive, reconnecting with exponential backoff.

    The load generator's low-level interface (`send` returns the future of the answer, with no
    task per request); `Client` builds the user's API on it.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_attempts: int = 5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        open_timeout_s: float = 10.0,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1.")
        self.url = url
        self.connect_attempts = connect_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.ssl = ssl  # for wss:// with a private CA; None: the system's defaults
        self._headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        self._ids = itertools.count(1)
        # id -> (future, multi): a binary answer does not say whether it answers a single
        # query or a one-row multi-query frame, so the shape the caller expects is kept here.
        self._pending: dict[int, tuple[asyncio.Future[TopK], bool]] = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None  # created on the running loop
        self._closed = False

    # -- connection ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def in_flight(self) -> int:
        """Requests whose answer someone still awaits (an abandoned one is cancelled)."""
        return sum(not future.done() for future, _ in self._pending.values())

    async def connect(self) -> None:
        """Open the connection if it is not open, retrying with exponential backoff."""
        if self._ws is not None:
            return
        if self._closed:
            raise ConnectionLost("This client is closed.")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one attempt at a time; later callers reuse its connection
            if self._ws is None:
                self._ws = await self._open_with_backoff()
                self._reader = asyncio.get_running_loop().create_task(self._read(self._ws))

    def _ssl_option(self) -> dict[str, Any]:
        return {} if self.ssl is None else {"ssl": self.ssl}

    async def _open_with_backoff(self) -> ClientConnection:
        delay, problem = self.backoff_s, ""
        for attempt in range(1, self.connect_attempts + 1):
            try:
                return await connect(
                    self.url,
                    compression=None,  # vectors barely compress; deflate only costs CPU
                    proxy=None,  # contact the given URL only
                    open_timeout=self.open_timeout_s,
                    additional_headers=self._headers,
                    **self._ssl_option(),  # wss:// defaults when none is given
                    max_size=MAX_MESSAGE_BYTES,
                    max_queue=1024,
                )
            except InvalidURI as exc:
                raise ConnectionLost(f"{self.url} is not a WebSocket URL: {exc}") from exc
            except InvalidStatus as exc:
                if not _retryable(exc):  # a wrong token or URL does not fix itself
                    error = AuthError if _is_auth(exc.response.status_code) else ConnectionLost
                    raise error(f"Cannot connect to {self.url}: {_refusal(exc)}.") from exc
                problem = _refusal(exc)
            except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
                problem = _describe(exc)
            if attempt < self.connect_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
        raise ConnectionLost(
            f"Cannot connect to {self.url} ({problem}) after "
            f"{counted(self.connect_attempts, 'attempt')}."
        )

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionLost."""
        self._closed = True
        ws, reader = self._ws, self._reader
        if ws is not None:
            await ws.close()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)
        self._fail_pending(ConnectionLost("The client was closed."))

    # -- requests ----------------------------------------------------------------------
    async def send(self, request: EncodedRequest) -> asyncio.Future[TopK]:
        """Send an encoded request; return the future of its answer without waiting for it."""
        ws = self._ws
        if ws is None:
            await self.connect()
            ws = self._ws
            if ws is None:  # dropped again between connecting and sending
                raise ConnectionLost(f"The connection to {self.url} closed right after opening.")
        request_id = next(self._ids)
        future: asyncio.Future[TopK] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, request.multi)
        try:
            await ws.send(request.frame(request_id), text=not request.binary)
        except ConnectionClosed as exc:
            self._pending.pop(request_id, None)
            self._drop(ws)
            raise ConnectionLost(
                f"The connection to {self.url} closed ({_describe(exc)})."
            ) from exc
        return future

    # -- answers -------------------------------------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        """Resolve futures as answers arrive, in whatever order the server sends them."""
        reason = "closed"
        try:
            async for message in ws:
                self._resolve(message)
        except ConnectionClosed as exc:
            reason = _describe(exc)
        except Exception as exc:  # a malformed answer: nothing more on this connection is safe
            log.exception("Reading an answer failed; dropping the connection.")
            reason = f"unreadable answer: {exc}"
            await ws.close()
        else:
            reason = _describe_close(ws)
        self._drop(ws)
        if self._pending:
            self._fail_pending(
                ConnectionLost(
                    f"The connection to {self.url} was lost ({reason}) with "
                    f"{counted(len(self._pending), 'request')} unanswered; "
                    "the next request reconnects."
                )
            )

    def _resolve(self, message: str | bytes) -> None:
        answer = decode_answer(message)
        future, multi = self._pending.pop(answer.id, _NOBODY)  # type: ignore[arg-type]
        if future is None or future.done():
            if answer.error is not None and answer.id is None:
                log.warning("The server sent an error with no id: %s", answer.error)
            return
        if answer.error is not None:
            future.set_exception(ServerError(*answer.error, answer.id))
        else:
            future.set_result(top_k(answer, multi))

    def _drop(self, ws: ClientConnection) -> None:
        if self._ws is ws:
            self._ws = None

    def _fail_pending(self, exc: ConnectionLost) -> None:
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: a caller that gave up must not warn


_NOBODY: tuple[None, bool] = (None, False)  # an answer to a request nobody waits for any more


def top_k(answer: Answer, multi: bool) -> TopK:
    """(Q, k) arrays for a multi-query frame, (k,) for one query. A binary answer does not say
    which it answers: the shape the sender asked for (`multi`) decides."""
    ids, scores = answer.ids, answer.scores
    assert ids is not None and scores is not None
    return (
        TopK(ids, scores)
        if (multi if answer.multi is None else answer.multi)
        else TopK(ids[0], scores[0])
    )


class Client:
    """An asyncio client on one persistent, pipelined WebSocket connection.

    Connects on first use (or `await client.connect()`); safe to share between tasks of one
    event loop. `binary=True` sends binary frames (less CPU on both ends than JSON).
    """

    def __init__(
        self,
        url: str,
        *,
        binary: bool = False,
        frame_queries: int = DEFAULT_FRAME_QUERIES,
        **options: Any,
    ) -> None:
        """`options`: Connection's (connect_attempts=5, backoff_s=0.1, backoff_max_s=2.0,
        open_timeout_s=10.0, token=None, ssl=None)."""
        self.connection = Connection(url, **options)
        self.url = url
        self.binary = binary
        self.frame_queries = frame_queries

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def in_flight(self) -> int:
        return self.connection.in_flight

    async def connect(self) -> None:
        """Open the connection if it is not open, retrying with exponential backoff."""
        await self.connection.connect()

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionLost."""
        await self.connection.close()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def query(
        self,
        vector: np.ndarray | Sequence[float],
        k: int | None = None,
        *,
        timeout_ms: int | None = None,
    ) -> TopK:
        """Top-k of one query vector: TopK with ids (k,) and scores (k,)."""
        request = encode_request(vector, k, binary=self.binary, timeout_ms=timeout_ms)
        return await (await self.connection.send(request))

    async def query_many(
        self,
        matrix: np.ndarray | Sequence[Sequence[float]],
        k: int | None = None,
        *,
        timeout_ms: int | None = None,
    ) -> TopK:
        """Top-k of each row of a (Q, dim) matrix in multi-query frames: ids and scores (Q, k).

        More than `frame_queries` rows are split into several frames, sent pipelined.
        """
        array = np.ascontiguousarray(matrix, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"Expected a non-empty (Q, dim) matrix; got shape {array.shape}.")
        step = self.frame_queries
        frames = [
            encode_request(
                array[i : i + step], k, multi=True, binary=self.binary, timeout_ms=timeout_ms
            )
            for i in range(0, array.shape[0], step)
        ]
        return _concatenate(await self._gather(frames))

    async def _gather(self, frames: list[EncodedRequest]) -> list[TopK]:
        """Every frame's answer, pipelined; the first failure raised once all are settled."""
        sent = [await self.connection.send(frame) for frame in frames]
        parts = await asyncio.gather(*sent, return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return [p for p in parts if isinstance(p, TopK)]


def _concatenate(parts: list[TopK]) -> TopK:
    if len(parts) == 1:
        return parts[0]
    return TopK(np.concatenate([p.ids for p in parts]), np.concatenate([p.scores for p in parts]))


def _retryable(exc: InvalidStatus) -> bool:
    """503 (loading, draining, too many connections) and 5xx may pass; 4xx will not."""
    return exc.response.status_code >= 500


def _is_auth(status: int) -> bool:
    return status in (401, 403)  # a wrong or missing token; an Origin not allowed


def _refusal(exc: InvalidStatus) -> str:
    return _reason(exc.response.status_code, exc.response.body)


def _reason(status: int, body: bytes | bytearray | None) -> str:
    """The server's own reason when it sent one ({"error": {"message"}}), else the status."""
    try:
        message = orjson.loads(body or b"")["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"HTTP {status}"
    return f"HTTP {status}: {message.rstrip('.')}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        if frame is None:
            return "no close frame"
        return f"code {frame.code}{': ' + frame.reason if frame.reason else ''}"
    text = str(exc) or type(exc).__name__
    return text.rstrip(".")


def _describe_close(ws: ClientConnection) -> str:
    code, reason = ws.close_code, ws.close_reason
    return f"code {code}{': ' + reason if reason else ''}" if code is not None else "closed"


def http_url(ws_url: str) -> str:
    """http://host:port for ws://host:port/ws (https for wss): the same server's HTTP routes."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"Expected a URL like ws://HOST:PORT/ws; got {ws_url!r}.")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def server_info(url: str, *, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET /info of the server behind a ws:// URL: n, dim, top_k, max_k, demo, ... (blocking)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    info_url = f"{http_url(url)}/info"
    try:
        response = httpx.get(info_url, headers=headers, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise ConnectionLost(f"Cannot read {info_url}: {exc}") from exc
    if response.is_success:
        return response.json()
    reason = _reason(response.status_code, response.content)
    if _is_auth(response.status_code):
        raise AuthError(f"{info_url} answered {reason}; pass the server's --token as token=.")
    raise ConnectionLost(f"{info_url} answered {reason}.")


class SyncClient:
    """A blocking wrapper for scripts: the asyncio `Client` runs on a private thread.

    with SyncClient("ws://127.0.0.1:8080/ws") as client:
        ids, scores = client.query(vector, k=5)
    """

    def __init__(self, url: str, *, timeout_s: float | None = 60.0, **options: Any) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="flasma-client", daemon=True
        )
        self._thread.start()
        self.client = Client(url, **options)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            # Cancel the task on the client's loop too: else it would go on waiting for (and
            # reconnecting for) an answer nobody will read.
            future.cancel()
            raise

    def connect(self) -> None:
        self._call(self.client.connect())

    def query(
        self,
        vector: np.ndarray | Sequence[float],
        k: int | None = None,
        *,
        timeout_ms: int | None = None,
    ) -> TopK:
        return self._call(self.client.query(vector, k, timeout_ms=timeout_ms))

    def query_many(
        self,
        matrix: np.ndarray | Sequence[Sequence[float]],
        k: int | None = None,
        *,
        timeout_ms: int | None = None,
    ) -> TopK:
        return self._call(self.client.query_many(matrix, k, timeout_ms=timeout_ms))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
