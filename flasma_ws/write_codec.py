"""The wire codec of writes: upsert, delete and get frames in, their answers out (pure).

JSON (a /ws text frame, or the body of POST /vectors, POST /vectors/delete):
  {"id", "op": "upsert", "items": [{"key", "embedding"}, ...]}  -> {"id", "upserted": n}
  {"id", "op": "delete", "keys": [...]}                          -> {"id", "deleted": n}
  {"id", "op": "get", "keys": [...]}                             -> {"id", "items": [...]}
Binary upsert (little-endian, for bulk loads): the binary query header with bit 31 of its
timeout field set (a query's timeout is below 2^22 ms, so no query has it), k = 0:
  u64 id | u16 0 | u16 count | u32 0x80000000 | keys | float32[count * dim]
keys: int64[count] on an int-key server; count x (u16 length | UTF-8 bytes) on a str-key one.

A bad item gets its own error, {"index", "code", "message"} in the answer's "errors"; the
frame's other items are applied, together (docs/protocol.md). A bad frame (not an object, no
items, an unknown op) gets one error for the whole frame, as a bad query does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

from .errors import ProtocolError
from .keys import Key, KeyType, decode_keys, encode_keys, key_error
from .protocol import BINARY_HEADER, Code, RequestId
from .text import counted

Op = Literal["upsert", "delete", "get"]
OPS: tuple[Op, ...] = ("upsert", "delete", "get")
WRITE_FLAG = 0x8000_0000  # in the binary header's timeout field: an upsert frame
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset({int, float})


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int  # the item's place in the frame
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """A validated write or get: the good items (keys, and for upserts their raw float32
    vectors, in frame order) and one error per bad item."""

    id: RequestId
    op: Op
    keys: list[Key]
    vectors: np.ndarray | None = None  # (len(keys), dim) for upserts
    errors: list[ItemError] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # frame index of each good key (get)
    size: int = 0  # items in the frame


def is_write_frame(data: bytes) -> bool:
    """A binary frame whose header marks it as an upsert."""
    if len(data) < BINARY_HEADER.size:
        return False
    return bool(BINARY_HEADER.unpack_from(data)[3] & WRITE_FLAG)


@dataclass(frozen=True)
class WriteCodec:
    dim: int
    key_type: KeyType
    max_items: int  # per frame, as --max-queries-per-frame for queries

    def parse(self, obj: dict[str, Any], request_id: RequestId) -> WriteRequest:
        """A decoded JSON object with an "op" field (the id already read by the caller)."""
        op = obj.get("op")
        if op not in OPS:
            raise ProtocolError(
                Code.BAD_REQUEST, f'"op" must be one of {", ".join(OPS)}; got {op!r}.'
            )
        field_name = "items" if op == "upsert" else "keys"
        unknown = obj.keys() - {"id", "op", field_name}
        if unknown:
            raise ProtocolError(
                Code.BAD_REQUEST,
                f"Unknown field(s) {', '.join(sorted(map(repr, unknown)))} for op {op!r}; "
                f"allowed: id, op, {field_name}.",
            )
        entries = obj.get(field_name)
        if not isinstance(entries, list) or not entries:
            raise ProtocolError(
                Code.BAD_REQUEST, f'Op {op!r} needs "{field_name}": a non-empty list.'
            )
        self._check_count(len(entries))
        if op == "upsert":
            return self._upserts(request_id, entries)
        return self._keys(request_id, op, entries)

    def parse_binary(self, data: bytes) -> WriteRequest:
        request_id, k, count, _ = BINARY_HEADER.unpack_from(data)
        try:
            if k != 0:
                raise ProtocolError(Code.BAD_REQUEST, "A binary upsert frame has k = 0.")
            self._check_count(count)
            try:
                keys, offset = decode_keys(
                    memoryview(data), BINARY_HEADER.size, count, self.key_type
                )
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                raise ProtocolError(
                    Code.BAD_KEY, f"The binary upsert frame's keys cannot be read: {exc}."
                ) from exc
            if len(data) - offset != 4 * count * self.dim:
                raise ProtocolError(
                    Code.BAD_DIMENSION,
                    f"A binary upsert of {counted(count, 'row')} of dimension {self.dim} holds "
                    f"{4 * count * self.dim} bytes of vectors after its keys; got "
                    f"{len(data) - offset}.",
                )
            vectors = np.frombuffer(data, "<f4", count * self.dim, offset).reshape(count, self.dim)
        except ProtocolError as exc:
            exc.request_id = request_id
            raise
        rows = [(i, key, vectors[i]) for i, key in enumerate(keys)]
        return self._validated_upserts(request_id, rows, [], count)

    def _check_count(self, count: int) -> None:
        if not 1 <= count <= self.max_items:
            raise ProtocolError(
                Code.BAD_REQUEST, f"A frame must hold 1 to {self.max_items} items; got {count}."
            )

    def _upserts(self, request_id: RequestId, entries: list[Any]) -> WriteRequest:
        rows: list[tuple[int, Any, np.ndarray]] = []
        errors: list[ItemError] = []
        for i, item in enumerate(entries):
            if not isinstance(item, dict) or item.keys() != {"key", "embedding"}:
                errors.append(
                    ItemError(i, Code.BAD_REQUEST, 'An item is {"key": ..., "embedding": [...]}.')
                )
                continue
            vector = self._vector(item["embedding"])
            if isinstance(vector, ItemError):
                errors.append(ItemError(i, vector.code, vector.message))
                continue
            rows.append((i, item["key"], vector))
        return self._validated_upserts(request_id, rows, errors, len(entries))

    def _validated_upserts(
        self,
        request_id: RequestId,
        rows: list[tuple[int, Any, np.ndarray]],
        errors: list[ItemError],
        size: int,
    ) -> WriteRequest:
        """Keys checked (type, range, duplicates in the frame) and values checked per row."""
        good: list[tuple[int, Key, np.ndarray]] = []
        seen: dict[Key, int] = {}
        for i, key, vector in rows:
            problem = self._key_problem(key, seen, i)
            if problem is None and not _usable(vector):
                problem = ItemError(i, Code.BAD_VALUE, _value_message(vector))
            if problem is not None:
                errors.append(problem)
                continue
            seen[key] = i
            good.append((i, key, vector))
        vectors = (
            np.stack([v for _, _, v in good]).astype(np.float32)
            if good
            else np.empty((0, self.dim), np.float32)
        )
        errors.sort(key=lambda e: e.index)
        return WriteRequest(
            request_id,
            "upsert",
            [k for _, k, _ in good],
            vectors,
            errors,
            [i for i, _, _ in good],
            size,
        )

    def _keys(self, request_id: RequestId, op: Op, entries: list[Any]) -> WriteRequest:
        keys: list[Key] = []
        positions: list[int] = []
        errors: list[ItemError] = []
        seen: dict[Key, int] = {}
        for i, key in enumerate(entries):
            # A get may name a key twice (it reads); a delete may not (one answer per key).
            problem = self._key_problem(key, seen if op == "delete" else {}, i)
            if problem is not None:
                errors.append(problem)
                continue
            seen[key] = i
            keys.append(key)
            positions.append(i)
        return WriteRequest(request_id, op, keys, None, errors, positions, len(entries))

    def _key_problem(self, key: Any, seen: dict[Key, int], index: int) -> ItemError | None:
        problem = key_error(key, self.key_type)
        if problem is not None:
            return ItemError(index, Code.BAD_KEY, problem[0].upper() + problem[1:] + ".")
        if key in seen:
            return ItemError(
                index, Code.BAD_KEY, f"Key {key!r} is already item {seen[key]} of this frame."
            )
        return None

    def _vector(self, row: Any) -> np.ndarray | ItemError:
        if not isinstance(row, list):
            return ItemError(0, Code.BAD_REQUEST, '"embedding" must be a list of numbers.')
        if len(row) != self.dim:
            return ItemError(
                0,
                Code.BAD_DIMENSION,
                f"The embedding has {len(row)} values; this server's vectors have dimension "
                f"{self.dim}.",
            )
        kinds = set(map(type, row))
        if not kinds <= _NUMBER_TYPES:
            code = Code.BAD_VALUE if bool in kinds else Code.BAD_REQUEST
            return ItemError(0, code, "Embeddings must hold only numbers (not true/false).")
        return np.array(row, np.float64)


def _usable(vector: np.ndarray) -> bool:
    """Finite within float32 and not zero: what can be normalized and compared."""
    largest = float(np.abs(vector).max()) if vector.size else 0.0
    return bool(np.isfinite(vector).all()) and 0 < largest <= _FLOAT32_MAX


def _value_message(vector: np.ndarray) -> str:
    if not np.isfinite(vector).all() or np.abs(vector).max() > _FLOAT32_MAX:
        return (
            "Embeddings must be finite: NaN, Infinity and values beyond float32 cannot be stored."
        )
    return "A zero vector has no direction, so no cosine similarity; it cannot be stored."


# -- answers --------------------------------------------------------------------------
def encode_write_answer(request: WriteRequest, count: int) -> bytes:
    """{"id", "upserted"|"deleted": n, "errors"?: [...]}."""
    name = "upserted" if request.op == "upsert" else "deleted"
    answer: dict[str, Any] = _with_id(request, {name: count})
    if request.errors:
        answer["errors"] = _errors(request)
    return orjson.dumps(answer)


def encode_get_answer(request: WriteRequest, found: list[np.ndarray | None]) -> bytes:
    """{"id", "items": [{"key", "embedding"} | null per requested key], "errors"?: [...]}."""
    items: list[Any] = [None] * request.size
    for position, key, vector in zip(request.positions, request.keys, found):
        if vector is not None:
            items[position] = {"key": key, "embedding": vector}
    answer: dict[str, Any] = _with_id(request, {"items": items})
    if request.errors:
        answer["errors"] = _errors(request)
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def _with_id(request: WriteRequest, fields: dict[str, Any]) -> dict[str, Any]:
    """The id first, as in every answer; none over HTTP, where requests carry none."""
    return fields if request.id is None else {"id": request.id, **fields}


def _errors(request: WriteRequest) -> list[dict[str, Any]]:
    return [{"index": e.index, "code": str(e.code), "message": e.message} for e in request.errors]


# -- the client's side -----------------------------------------------------------------
def encode_binary_upsert(
    request_id: int, keys: list[Key], vectors: np.ndarray, key_type: KeyType = "int"
) -> bytes:
    """One binary upsert frame for (count, dim) float32 vectors."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    header = BINARY_HEADER.pack(request_id, 0, len(keys), WRITE_FLAG)
    return header + encode_keys(keys, key_type) + vectors.tobytes()
