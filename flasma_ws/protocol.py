"""The wire codec: bytes/str in, validated requests (or one ProtocolError) out; results out.

Pure: no I/O, no asyncio, no TensorFlow. The layouts are documented in docs/protocol.md.

Binary request (little-endian): u64 id | u16 k (0 = default) | u16 count | u32 timeout_ms
(0 = default) | float32[count * dim]. Binary answer: u64 id | u16 k | u16 count | u32 0 |
u32[count * k] rows | float32[count * k] scores. Errors are always JSON text frames.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .errors import ProtocolError
from .text import counted

if TYPE_CHECKING:
    from .write_codec import WriteCodec, WriteRequest

RequestId = str | int | None


class Code(str, enum.Enum):
    """Every error code the server answers: wire code, HTTP status, meaning (docs/protocol.md).

    `ws` codes may come back on /ws as well as HTTP; the others only refuse an HTTP request or
    a WebSocket handshake. A str, so a code compares equal to its wire text.
    """

    status: int
    meaning: str
    ws: bool

    BAD_JSON = ("bad_json", 400, "the frame or body is not JSON")
    BAD_REQUEST = ("bad_request", 400, "a request that is not of the documented shape")
    BAD_DIMENSION = ("bad_dimension", 400, "a vector's length is not the server's dimension")
    BAD_VALUE = ("bad_value", 400, "NaN, Infinity, beyond float32, a zero vector, true/false")
    BAD_K = ("bad_k", 400, "k not an integer in 1..min(max_k, N)")
    OVERLOADED = ("overloaded", 503, "the global queue is full; retry later")
    TIMEOUT = ("timeout", 504, "the deadline passed before the query's batch started")
    INTERNAL = ("internal", 500, "the server failed on this request; it keeps serving")
    UNAVAILABLE = ("unavailable", 503, "the server is loading or shutting down")
    BAD_KEY = ("bad_key", 400, "a key of the wrong type or size, or twice in one frame")
    READ_ONLY = ("read_only", 403, "a write to a server started without --data-dir")
    FULL = ("full", 507, "an upsert of a new key beyond --max-rows")
    TOO_LARGE = ("too_large", 413, "a POST /cos body over --max-body-bytes", False)
    NOT_FOUND = ("not_found", 404, "no such route", False)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "the route takes another method", False)
    UPGRADE_REQUIRED = ("upgrade_required", 426, "plain HTTP to /ws, a WebSocket route", False)
    UNAUTHORIZED = ("unauthorized", 401, "no or a wrong 'Authorization: Bearer' token", False)
    FORBIDDEN_ORIGIN = ("forbidden_origin", 403, "a browser Origin not allowed", False)
    TOO_MANY_CONNECTIONS = ("too_many_connections", 503, "--max-connections reached", False)
    REQUEST_TIMEOUT = ("request_timeout", 408, "a body not complete in --body-timeout-s", False)

    def __new__(cls, code: str, status: int, meaning: str, ws: bool = True) -> Code:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status, member.meaning, member.ws = status, meaning, ws
        return member

    def __str__(self) -> str:  # the wire text in f-strings and metric labels
        return str(self.value)


BAD_JSON = Code.BAD_JSON
BAD_REQUEST = Code.BAD_REQUEST
BAD_DIMENSION = Code.BAD_DIMENSION
BAD_VALUE = Code.BAD_VALUE
BAD_K = Code.BAD_K
OVERLOADED = Code.OVERLOADED
TIMEOUT = Code.TIMEOUT
INTERNAL = Code.INTERNAL
UNAVAILABLE = Code.UNAVAILABLE
ERROR_CODES = tuple(code.value for code in Code if code.ws)  # what /ws may answer


_STATUS = {code.value: code.status for code in Code}


def http_status(code: str) -> int:
    """The HTTP status of a wire code (400 for any code not in the table)."""
    return _STATUS.get(str(code), 400)


NO_ID = object()  # HTTP error bodies carry no "id"


def encode_error(request_id: RequestId | object, code: str, message: str) -> bytes:
    """The one error document: {"id", "error": {"code", "message"}}; no "id" given NO_ID."""
    error = {"error": {"code": str(code), "message": message}}
    return orjson.dumps(error if request_id is NO_ID else {"id": request_id, **error})


BINARY_HEADER = struct.Struct("<QHHI")
MAX_TIMEOUT_MS = 3_600_000
MAX_ID_CHARS = 1024
_MIN_ID, _MAX_ID = -(2**63), 2**64 - 1  # what orjson can write back
_NUMBER_TYPES = frozenset({int, float})
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_WS_KEYS = frozenset({"id", "embedding", "embeddings", "k", "timeout_ms"})
_COS_KEYS = frozenset({"embedding", "k", "timeout_ms"})


@dataclass(frozen=True, slots=True)
class Query:
    """One validated request: a (count, dim) float32 array of finite, non-zero queries."""

    id: RequestId
    vectors: np.ndarray
    k: int
    multi: bool = False  # answer with "results" (a list per query) rather than "result"
    binary: bool = False
    timeout_ms: int | None = None

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class Codec:
    dim: int
    n: int
    top_k: int  # the limits come from Settings (and the served matrix), never defaulted here
    max_k: int
    max_queries_per_frame: int
    writes: WriteCodec | None = None  # frames with an "op" (write_codec.py)
    keyed: bool = False  # answers carry int64 keys: binary answers say so in their flags

    # -- requests ----------------------------------------------------------------------
    def parse_text(self, data: str | bytes) -> Query | WriteRequest:
        """A WebSocket text frame: {"id", "embedding" | "embeddings", "k"?, "timeout_ms"?},
        or a write/get with an "op"."""
        obj = _load_json(data, "frame")
        request_id = _read_id(obj)
        try:
            if "id" not in obj:
                raise ProtocolError(
                    BAD_REQUEST, 'The request has no "id"; add one to match answers.'
                )
            if "op" in obj:
                return self.parse_op(obj, request_id)
            return self._parse_fields(obj, request_id, _WS_KEYS)
        except ProtocolError as exc:
            exc.request_id = request_id
            raise

    def parse_op(self, obj: dict[str, Any], request_id: RequestId) -> WriteRequest:
        if self.writes is None:
            raise ProtocolError(Code.READ_ONLY, "This server takes no writes.")
        return self.writes.parse(obj, request_id)

    def parse_http_op(self, body: bytes, op: str) -> WriteRequest:
        """POST /vectors ({"items"}) or POST /vectors/delete ({"keys"}): the op is the route's."""
        obj = _load_json(body, "body")
        if "op" in obj or "id" in obj:
            raise ProtocolError(BAD_REQUEST, f"The route says the op; send only the {op} fields.")
        return self.parse_op({**obj, "op": op}, None)

    def parse_cos(self, body: bytes) -> Query:
        """A POST /cos body: {"embedding": [...], "k"?: int} (Flasma's route)."""
        obj = _load_json(body, "body")
        if "embeddings" in obj:
            raise ProtocolError(
                BAD_REQUEST, 'POST /cos takes one "embedding"; use /ws for several.'
            )
        return self._parse_fields(obj, None, _COS_KEYS)

    def parse_binary(self, data: bytes) -> Query | WriteRequest:
        from .write_codec import is_write_frame

        if self.writes is not None and is_write_frame(data):
            return self.writes.parse_binary(data)
        if len(data) < BINARY_HEADER.size:
            raise ProtocolError(
                BAD_REQUEST,
                f"A binary frame needs a {BINARY_HEADER.size}-byte header; "
                f"got {counted(len(data), 'byte')}.",
            )
        request_id, k, count, timeout_ms = BINARY_HEADER.unpack_from(data)
        try:
            self._check_count(count)
            expected = BINARY_HEADER.size + 4 * count * self.dim
            if len(data) != expected:
                raise ProtocolError(
                    BAD_DIMENSION,
                    f"A binary frame with {counted(count, 'query', 'queries')} of dimension "
                    f"{self.dim} must be "
                    f"{expected} bytes; got {len(data)}.",
                )
            vectors = np.frombuffer(data, dtype="<f4", offset=BINARY_HEADER.size).reshape(
                count, self.dim
            )
            self._check_values(vectors)
            return Query(
                request_id,
                vectors,
                self._check_k(k or self.top_k),
                multi=count != 1,
                binary=True,
                timeout_ms=self._check_timeout(timeout_ms or None),
            )
        except ProtocolError as exc:
            exc.request_id = request_id
            raise

    def _parse_fields(self, obj: dict, request_id: RequestId, allowed: frozenset[str]) -> Query:
        unknown = obj.keys() - allowed
        if unknown:
            raise ProtocolError(
                BAD_REQUEST,
                f"Unknown field(s) {', '.join(sorted(map(repr, unknown)))}; "
                f"allowed: {', '.join(sorted(allowed))}.",
            )
        k = self._check_k(obj.get("k", self.top_k))
        timeout_ms = self._check_timeout(obj.get("timeout_ms"))
        if ("embedding" in obj) == ("embeddings" in obj):
            raise ProtocolError(BAD_REQUEST, 'Give exactly one of "embedding" or "embeddings".')
        if "embedding" in obj:
            vectors = self._vectors([obj["embedding"]], "embedding")
            return Query(request_id, vectors, k, timeout_ms=timeout_ms)
        rows = obj["embeddings"]
        if not isinstance(rows, list):
            raise ProtocolError(BAD_REQUEST, '"embeddings" must be a list of lists of numbers.')
        self._check_count(len(rows))
        return Query(
            request_id, self._vectors(rows, "embeddings"), k, multi=True, timeout_ms=timeout_ms
        )

    def _vectors(self, rows: list, field: str) -> np.ndarray:
        for i, row in enumerate(rows):
            if not isinstance(row, list):
                raise ProtocolError(BAD_REQUEST, f'"{field}" must hold lists of numbers.')
            if len(row) != self.dim:
                where = f" (query {i})" if field == "embeddings" else ""
                raise ProtocolError(
                    BAD_DIMENSION,
                    f"The embedding{where} has {len(row)} values; this server's vectors have "
                    f"dimension {self.dim}.",
                )
            # JSON true/false would silently become 1.0/0.0 in numpy.
            kinds = set(map(type, row))
            if not kinds <= _NUMBER_TYPES:
                # numpy would turn true/false into 1/0, "1.5" into 1.5 and nested lists into 3-D.
                if bool in kinds:
                    raise ProtocolError(BAD_VALUE, "Embeddings must hold numbers, not true/false.")
                raise ProtocolError(BAD_REQUEST, "Embeddings must hold only numbers.")
        try:
            wide = np.array(rows, dtype=np.float64)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(BAD_REQUEST, "Embeddings must hold only numbers.") from exc
        # One reduction checks all three: a NaN, an Inf or a value beyond float32 fails the
        # upper bound, a zero vector the lower one (this runs for every request).
        largest = np.abs(wide).max(axis=1)
        if not ((largest > 0) & (largest <= _FLOAT32_MAX)).all():
            with np.errstate(over="ignore"):
                self._check_values(wide.astype(np.float32))
        return wide.astype(np.float32)

    @staticmethod
    def _check_values(vectors: np.ndarray) -> None:
        finite = np.isfinite(vectors)
        if not finite.all():
            raise ProtocolError(
                BAD_VALUE,
                "Embeddings must be finite: NaN, Infinity and values beyond float32's "
                "range (about 3.4e38) cannot be compared.",
            )
        if not vectors.any(axis=1).all():
            raise ProtocolError(
                BAD_VALUE, "A zero vector has no direction, so no cosine similarity."
            )

    def _check_k(self, k: object) -> int:
        limit = min(self.max_k, self.n)
        if type(k) is not int or not 1 <= k <= limit:
            raise ProtocolError(BAD_K, f'"k" must be an integer from 1 to {limit}; got {k!r}.')
        return k

    def _check_count(self, count: int) -> None:
        if not 1 <= count <= self.max_queries_per_frame:
            raise ProtocolError(
                BAD_REQUEST,
                f"A frame must hold 1 to {self.max_queries_per_frame} queries; got {count}.",
            )

    @staticmethod
    def _check_timeout(timeout_ms: object) -> int | None:
        if timeout_ms is None:
            return None
        if type(timeout_ms) is not int or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
            raise ProtocolError(
                BAD_REQUEST,
                f'"timeout_ms" must be an integer from 1 to {MAX_TIMEOUT_MS}; got {timeout_ms!r}.',
            )
        return timeout_ms

    # -- answers -----------------------------------------------------------------------
    @staticmethod
    def encode_result(
        query: Query, rows: np.ndarray, scores: np.ndarray, keyed: bool = False
    ) -> bytes:
        """The answer to `query`: rows/scores are (count, k). JSON bytes, or a binary frame.
        Absent results (score -inf: fewer live rows than k) are left out of JSON lists; in a
        binary answer of a keyed server they read key 2^64-1, score -inf."""
        if query.binary and rows.dtype != object:
            flags = KEYED_FLAG if keyed else 0
            header = BINARY_HEADER.pack(query.id, query.k, query.count, flags)
            ids = rows.astype("<u8" if keyed else "<u4")
            return header + ids.tobytes() + scores.astype("<f4").tobytes()
        if query.multi or query.binary:  # a str-key server answers binary queries in JSON
            return orjson.dumps({"id": query.id, "results": _pairs(rows, scores)})
        return orjson.dumps({"id": query.id, "result": _pairs(rows, scores)[0]})

    @staticmethod
    def encode_cos(rows: np.ndarray, scores: np.ndarray) -> bytes:
        return orjson.dumps({"result": _pairs(rows, scores)[0]})

    encode_error = staticmethod(encode_error)

    @staticmethod
    def decode_binary_result(data: bytes) -> tuple[int, np.ndarray, np.ndarray]:
        """Client side: (id, rows (count, k) uint32 or, keyed, uint64, scores (count, k))."""
        request_id, k, count, flags = BINARY_HEADER.unpack_from(data)
        size = count * k
        width = 8 if flags & KEYED_FLAG else 4
        rows = np.frombuffer(data, f"<u{width}", size, BINARY_HEADER.size).reshape(count, k)
        offset = BINARY_HEADER.size + width * size
        scores = np.frombuffer(data, "<f4", size, offset).reshape(count, k)
        return request_id, rows, scores


KEYED_FLAG = 1  # binary answer flags: rows are u64 keys


def _pairs(rows: np.ndarray, scores: np.ndarray) -> list[list[tuple[Any, float]]]:
    """[[key, score], ...] per query, absent results (score -inf) left out."""
    if np.isneginf(scores).any():
        return [
            [(r, s) for r, s in zip(row, score) if s != -np.inf]
            for row, score in zip(rows.tolist(), scores.tolist())
        ]
    return [list(zip(r, s)) for r, s in zip(rows.tolist(), scores.tolist())]


def encode_binary_query(
    request_id: int, vectors: np.ndarray, k: int = 0, timeout_ms: int = 0
) -> bytes:
    """Client side: one binary request frame for (count, dim) float32 vectors."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    return BINARY_HEADER.pack(request_id, k, vectors.shape[0], timeout_ms) + vectors.tobytes()


def _load_json(data: str | bytes, what: str) -> dict:
    """`what` is "frame" (WebSocket) or "body" (POST /cos): the message names the right one."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        obj = _load_lenient_json(data)
        if obj is None:
            raise ProtocolError(BAD_JSON, f"The {what} is not valid JSON: {exc.args[0]}.") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "A request must be a JSON object.")
    return obj


def _load_lenient_json(data: str | bytes) -> object:
    """Python's json accepts NaN/Infinity, which some clients send: parse them so the answer
    can say `bad_value` rather than `bad_json`. Only reached on the error path."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _read_id(obj: dict) -> RequestId:
    """The request id when it is a string or an integer (JSON type kept), else None.

    Only ids we can write back are read: integers within 64 bits (orjson's limit) and
    strings of at most MAX_ID_CHARS that are valid Unicode (no lone surrogates)."""
    request_id = obj.get("id")
    if type(request_id) is int and _MIN_ID <= request_id <= _MAX_ID:
        return request_id
    if isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS:
        try:
            request_id.encode("utf-8")
            return request_id
        except UnicodeEncodeError:
            pass
    if "id" in obj:
        raise ProtocolError(
            BAD_REQUEST,
            f'"id" must be a string of at most {MAX_ID_CHARS} characters or an integer from '
            f"{_MIN_ID} to {_MAX_ID}.",
        )
    return None


# -- the client's side: requests out, answers in ------------------------------------------
U16_MAX = 65_535  # k and count are u16 fields of the binary header


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """A request encoded once and sent any number of times, each time with a fresh id.

    `body` is the JSON text after the id (`"embedding":[...],"k":5}`), or for binary frames the
    header's k/count/timeout fields followed by the float32 vectors.
    """

    body: bytes
    count: int
    multi: bool
    binary: bool

    def frame(self, request_id: int) -> bytes:
        """The frame to send: the id, then the body."""
        if self.binary:
            return request_id.to_bytes(8, "little") + self.body
        return b'{"id":%d,' % request_id + self.body


def encode_request(
    vectors: object,
    k: int | None = None,
    *,
    multi: bool = False,
    binary: bool = False,
    timeout_ms: int | None = None,
) -> EncodedRequest:
    """One query (1-D) or, with multi=True, a (Q, dim) block of queries; ValueError when the
    shape, or with binary=True k or the count, cannot be sent."""
    array = _request_array(vectors, multi)
    count = array.shape[0] if multi else 1
    if binary:
        _check_binary_fields(k, count)
        # The id (the header's first 8 bytes) goes first at send time.
        frame = encode_binary_query(0, array, k or 0, timeout_ms or 0)
        return EncodedRequest(frame[8:], count, multi, True)
    fields: dict[str, object] = {"embeddings" if multi else "embedding": array}
    fields.update(_optional(k=k, timeout_ms=timeout_ms))
    encoded = orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)
    return EncodedRequest(encoded[1:], count, multi, False)  # without "{": the id goes first


def encode_cos_request(vector: object, k: int | None = None) -> bytes:
    """A POST /cos body for one query."""
    fields: dict[str, object] = {"embedding": _request_array(vector, multi=False)}
    fields.update(_optional(k=k))
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)


def _request_array(vectors: object, multi: bool) -> np.ndarray:
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != (2 if multi else 1) or array.size == 0:
        shape = "(Q, dim)" if multi else "(dim,)"
        raise ValueError(f"Expected a non-empty array of shape {shape}; got {array.shape}.")
    return array


def _check_binary_fields(k: int | None, count: int) -> None:
    # k = 0 would silently mean "the server's default" in a binary header.
    if k is not None and not 1 <= k <= U16_MAX:
        raise ValueError(f"k must be from 1 to {U16_MAX} in a binary frame; got {k}.")
    if count > U16_MAX:
        raise ValueError(f"A binary frame holds at most {U16_MAX} queries; got {count}.")


def _optional(**fields: int | None) -> dict[str, int]:
    return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Answer:
    """One decoded answer: a result (int64 `ids` and float32 `scores`, (count, k), best
    first) or an `error` (code, message).

    `multi`: whether it answers a multi-query frame; None for binary answers, which do not say
    (a one-row multi-query frame and a single query look alike), so the sender decides.
    """

    id: RequestId
    ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: tuple[str, str] | None = None
    multi: bool | None = None


def decode_answer(data: str | bytes) -> Answer:
    """A /ws answer frame: bytes are a binary answer, text JSON. ProtocolError(INTERNAL) when
    it is malformed."""
    if isinstance(data, bytes):
        return _decode_binary_answer(data)
    return decode_cos_answer(data)


def decode_cos_answer(body: str | bytes) -> Answer:
    """A POST /cos answer body (or a /ws JSON answer); ProtocolError(INTERNAL) if malformed."""
    try:
        return _decode_json_answer(orjson.loads(body))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(INTERNAL, f"The server's answer is malformed: {exc}") from exc


def _decode_binary_answer(data: bytes) -> Answer:
    try:
        request_id, rows, scores = Codec.decode_binary_result(data)
    except (struct.error, ValueError) as exc:
        raise ProtocolError(INTERNAL, f"The server's binary answer is malformed: {exc}") from exc
    return Answer(request_id, rows.astype(np.int64), scores.copy())


def _decode_json_answer(answer: dict) -> Answer:
    request_id = answer.get("id")
    if "error" in answer:
        error = answer["error"]
        return Answer(request_id, error=(str(error["code"]), str(error["message"])))
    multi = "results" in answer
    ids, scores = _pairs_arrays(answer["results"] if multi else [answer["result"]])
    return Answer(request_id, ids, scores, multi=multi)


def _pairs_arrays(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """[[[key, score], ...], ...] into (count, k) ids and float32 scores. Keys are read as
    they came (never through float64, which rounds integers beyond 2^53): int64 for integer
    keys, object for string keys."""
    widths = {len(row) for row in rows}
    if not rows or widths == {0}:
        empty = (len(rows), 0)
        return np.empty(empty, np.int64), np.empty(empty, np.float32)
    if len(widths) != 1 or any(len(pair) != 2 for row in rows for pair in row):
        raise ValueError("results are not lists of [key, score] pairs of one length")
    keys = [[pair[0] for pair in row] for row in rows]
    numeric = all(type(key) is int for row in keys for key in row)
    ids = np.array(keys, dtype=np.int64 if numeric else object)
    scores = np.array([[pair[1] for pair in row] for row in rows], dtype=np.float64)
    return ids, scores.astype(np.float32)  # float32 scores survive the float64 round trip
