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
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .errors import AuthError, ConnectionLost, ServerError
from .protocol import Codec, encode_binary_query
from .text import counted

__all__ = [
    "AuthError",
    "Client",
    "ConnectionLost",
    "Prepared",
    "ServerError",
    "SyncClient",
    "TopK",
    "http_url",
    "prepare",
    "server_info",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_FRAME_QUERIES = 1024  # the server's default --max-queries-per-frame
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # answers of large multi-query frames exceed 1 MiB
U16_MAX = 65_535  # k and count are u16 fields of the binary header


class TopK(NamedTuple):
    """Best matches, best first: int64 row `ids` and float32 cosine `scores`.

    Shape (k,) for one query, (Q, k) for `query_many`.
    """

    ids: np.ndarray
    scores: np.ndarray

    @classmethod
    def from_pairs(cls, pairs: list[list[float]]) -> TopK:
        """From one JSON answer's [[index, score], ...]."""
        if not pairs:
            return cls(np.empty(0, np.int64), np.empty(0, np.float32))
        array = np.array(pairs, dtype=np.float64)  # float32 scores survive the round trip
        return cls(array[:, 0].astype(np.int64), array[:, 1].astype(np.float32))

    def pairs(self) -> list[tuple[int, float]] | list[list[tuple[int, float]]]:
        """As lists of (index, score), like the JSON wire format."""
        if self.ids.ndim == 1:
            return list(zip(self.ids.tolist(), self.scores.tolist()))
        return [list(zip(i, s)) for i, s in zip(self.ids.tolist(), self.scores.tolist())]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request encoded once and sent any number of times (each time with a fresh id).

    `body` is the JSON text after the id (`"embedding":[...],"k":5}`), or for binary frames the
    header's k/count/timeout fields followed by the float32 vectors.
    """

    body: bytes
    count: int
    multi: bool
    binary: bool


def prepare(
    vectors: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    k: int | None = None,
    *,
    multi: bool = False,
    binary: bool = False,
    timeout_ms: int | None = None,
) -> Prepared:
    """Encode one query (1-D) or, with multi=True, a (Q, dim) block of queries."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    expected = 2 if multi else 1
    if array.ndim != expected or array.size == 0:
        shape = "(Q, dim)" if multi else "(dim,)"
        raise ValueError(f"Expected a non-empty array of shape {shape}; got {array.shape}.")
    count = array.shape[0] if multi else 1
    if binary:
        # k = 0 would silently mean "the server's default" in a binary header.
        if k is not None and not 1 <= k <= U16_MAX:
            raise ValueError(f"k must be from 1 to {U16_MAX} in a binary frame; got {k}.")
        if count > U16_MAX:
            raise ValueError(f"A binary frame holds at most {U16_MAX} queries; got {count}.")
        # The id (first 8 bytes of the header) is prepended at send time.
        frame = encode_binary_query(0, array, k or 0, timeout_ms or 0)
        return Prepared(frame[8:], count, multi, True)
    request: dict[str, Any] = {"embeddings" if multi else "embedding": array}
    if k is not None:
        request["k"] = k
    if timeout_ms is not None:
        request["timeout_ms"] = timeout_ms
    encoded = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    return Prepared(encoded[1:], count, multi, False)  # drop "{": "{"id":N," goes first


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
        connect_attempts: int = 5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        open_timeout_s: float = 10.0,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        frame_queries: int = DEFAULT_FRAME_QUERIES,
    ) -> None:
        if connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1.")
        self.url = url
        self.binary = binary
        self.connect_attempts = connect_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.ssl = ssl  # for wss:// with a private CA; None: the system's defaults
        self._headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        self.frame_queries = frame_queries
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
        return len(self._pending)

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

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------
    async def query(
        self,
        vector: np.ndarray | Sequence[float],
        k: int | None = None,
        *,
        timeout_ms: int | None = None,
    ) -> TopK:
        """Top-k of one query vector: TopK with ids (k,) and scores (k,)."""
        return await self.submit(prepare(vector, k, binary=self.binary, timeout_ms=timeout_ms))

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
            prepare(array[i : i + step], k, multi=True, binary=self.binary, timeout_ms=timeout_ms)
            for i in range(0, array.shape[0], step)
        ]
        if len(frames) == 1:
            return await self.submit(frames[0])
        parts = await asyncio.gather(*(self.submit(f) for f in frames), return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        answers = [p for p in parts if isinstance(p, TopK)]
        return TopK(
            np.concatenate([p.ids for p in answers]), np.concatenate([p.scores for p in answers])
        )

    async def submit(self, prepared: Prepared) -> TopK:
        """Send a prepared request and wait for its answer."""
        return await (await self.send(prepared))

    async def send(self, prepared: Prepared) -> asyncio.Future[TopK]:
        """Send a prepared request; return the future of its answer without waiting for it.

        The load generator's fast path: one frame build, no task per request.
        """
        ws = self._ws
        if ws is None:
            await self.connect()
            ws = self._ws
            if ws is None:  # dropped again between connecting and sending
                raise ConnectionLost(f"The connection to {self.url} closed right after opening.")
        request_id = next(self._ids)
        future: asyncio.Future[TopK] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, prepared.multi)
        try:
            if prepared.binary:
                await ws.send(request_id.to_bytes(8, "little") + prepared.body)
            else:
                await ws.send(b'{"id":%d,' % request_id + prepared.body, text=True)
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
                if isinstance(message, bytes):
                    self._resolve_binary(message)
                else:
                    self._resolve_text(message)
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

    def _resolve_binary(self, message: bytes) -> None:
        request_id, rows, scores = Codec.decode_binary_result(message)
        future, multi = self._pending.pop(request_id, _NOBODY)
        if future is not None and not future.done():
            ids = rows.astype(np.int64)
            future.set_result(TopK(ids, scores) if multi else TopK(ids[0], scores[0]))

    def _resolve_text(self, message: str) -> None:
        answer = orjson.loads(message)
        future, _ = self._pending.pop(answer.get("id"), _NOBODY)  # type: ignore[arg-type]
        if future is None or future.done():
            if "error" in answer and answer.get("id") is None:
                log.warning("The server sent an error with no id: %s", answer["error"])
            return
        if "error" in answer:
            error = answer["error"]
            future.set_exception(ServerError(error["code"], error["message"], answer.get("id")))
        elif "result" in answer:
            future.set_result(TopK.from_pairs(answer["result"]))
        else:
            parts = [TopK.from_pairs(result) for result in answer["results"]]
            future.set_result(
                TopK(np.stack([p.ids for p in parts]), np.stack([p.scores for p in parts]))
            )

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
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout_s)

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
