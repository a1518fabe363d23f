"""Property tests of the wire codec: whatever arrives, the codec returns a valid Query or raises
exactly one ProtocolError whose code is in ERROR_CODES; never another exception type.

The codec bugs once found by fuzzing (docs/reliability.md) are pinned at the end.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flasma_ws.errors import ProtocolError
from flasma_ws.protocol import (
    BINARY_HEADER,
    ERROR_CODES,
    MAX_ID_CHARS,
    MAX_TIMEOUT_MS,
    Codec,
    Query,
    encode_binary_query,
)

DIM, N, TOP_K, MAX_K, MAX_QUERIES = 4, 50, 5, 20, 8
CODEC = Codec(dim=DIM, n=N, top_k=TOP_K, max_k=MAX_K, max_queries_per_frame=MAX_QUERIES)
K_LIMIT = min(MAX_K, N)

# Short runs (CI-facing) and no .hypothesis/ folder in the work tree.
FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30])
FLOAT_EDGE_VALUES = [0.0, -0.0, 1e-45, 1e-46, 3.4e38, 3.5e38, 1e39, 1.7e308, -1.7e308, math.nan]
FLOAT_EDGES = st.sampled_from([*FLOAT_EDGE_VALUES, math.inf, -math.inf])
IDS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20))
FINITE32 = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[object]:
    """Any JSON value, including NaN/Infinity (json.dumps writes them) and huge integers."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        HUGE_INTS,
        st.floats(),
        FLOAT_EDGES,
        st.text(max_size=8),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=DIM + 1), st.dictionaries(st.text(max_size=5), inner)
        ),
        max_leaves=max_leaves,
    )


@st.composite
def vectors(draw: st.DrawFn, count: int = 1) -> list[list[float]]:
    """`count` valid rows: finite float32 values, not all zero."""
    rows = []
    for _ in range(count):
        row = draw(st.lists(FINITE32, min_size=DIM, max_size=DIM))
        if not any(row):
            row[0] = 1.0
        rows.append(row)
    return rows


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, object]:
    request: dict[str, object] = {"id": draw(IDS)}
    if draw(st.booleans()):
        request["embedding"] = draw(vectors())[0]
    else:
        request["embeddings"] = draw(vectors(draw(st.integers(1, MAX_QUERIES))))
    if draw(st.booleans()):
        request["k"] = draw(st.integers(1, K_LIMIT))
    if draw(st.booleans()):
        request["timeout_ms"] = draw(st.integers(1, MAX_TIMEOUT_MS))
    return request


def nest(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, object]:
    """A valid request with one to three structural mutations."""
    request = draw(valid_requests())
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["id", "embedding", "embeddings", "k", "timeout_ms", "extra"]))
        kind = draw(st.sampled_from(["swap", "drop", "huge", "edge", "nest", "element", "key"]))
        if kind == "swap":  # a value of any other JSON type
            request[key] = draw(json_values())
        elif kind == "drop":
            request.pop(key, None)
        elif kind == "huge":
            request[key] = draw(HUGE_INTS)
        elif kind == "edge":
            request[key] = draw(FLOAT_EDGES)
        elif kind == "nest":  # deep nesting, beyond what orjson (1024) and json accept
            request[key] = nest(request.get(key, 1), draw(st.sampled_from([2, 50, 600, 2000])))
        elif kind == "element":  # one weird value inside the vector(s)
            rows = request.get("embedding") or request.get("embeddings")
            if isinstance(rows, list) and rows:
                target = rows[0] if isinstance(rows[0], list) and rows[0] else rows
                target[draw(st.integers(0, len(target) - 1))] = draw(json_values(3))
        else:  # an unknown key, sometimes unicode
            request[draw(st.text(min_size=1, max_size=6))] = draw(json_values(3))
    return request


def dumps(request: object) -> str | None:
    """json.dumps that writes NaN/Infinity; None for values too deep for it to encode."""
    try:
        return json.dumps(request, ensure_ascii=False)
    except RecursionError:
        return None


# -- the contract -------------------------------------------------------------------------


def outcome(parse: object, data: str | bytes) -> Query | ProtocolError:
    """Run one parse; any exception other than ProtocolError fails the test by propagating."""
    try:
        query = parse(data)  # type: ignore[operator]
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        assert exc.request_id is None or type(exc.request_id) in (int, str)
        return exc
    check_query(query, cos=parse == CODEC.parse_cos)
    return query


def check_query(query: Query, cos: bool = False) -> None:
    """What every accepted request must look like (as far as the codec gets it right today)."""
    assert isinstance(query, Query)
    assert query.id is None if cos else type(query.id) in (int, str)
    assert query.vectors.dtype == np.float32
    assert query.vectors.shape[0] == query.count >= 1 and query.vectors.shape[1] == DIM
    assert np.isfinite(query.vectors).all()
    assert query.vectors.reshape(query.count, -1).any(axis=1).all()
    assert type(query.k) is int and 1 <= query.k <= K_LIMIT
    assert query.timeout_ms is None or 1 <= query.timeout_ms <= MAX_TIMEOUT_MS
    assert query.multi or query.count == 1


def readable_id(text: str | bytes) -> object:
    """The id a client can expect echoed: a string or integer "id" of a JSON object, else None."""
    obj = None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, dict):
        return None
    value = obj.get("id")
    if type(value) is int:
        return value if -(2**63) <= value < 2**64 else None  # what orjson can write back
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        try:
            value.encode("utf-8")  # lone surrogates cannot be written back
            return value
        except UnicodeEncodeError:
            return None
    return None


# -- arbitrary input ----------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"[" * 5000)
def test_any_bytes_as_text_binary_or_cos_body(data: bytes) -> None:
    outcome(CODEC.parse_text, data)
    outcome(CODEC.parse_binary, data)
    outcome(CODEC.parse_cos, data)


@FAST
@given(st.text(max_size=200))
@example("NaN")
@example('{"id": 1}')
@example('"\\ud800"')
@example("{" * 3000)
@example('{"id": 1, "embedding": ' + "[" * 100_000 + "]" * 100_000 + "}")
@example('{"id": 1, "embedding": [1, 2, 3, 4], "x": ' + "[" * 1100 + "]" * 1100 + "}")
def test_any_text_frame(text: str) -> None:
    outcome(CODEC.parse_text, text)


@FAST
@given(json_values(30))
def test_any_json_value(value: object) -> None:
    text = dumps(value)
    if text is not None:
        outcome(CODEC.parse_text, text)
        outcome(CODEC.parse_cos, text.encode())


@FAST
@given(st.dictionaries(st.sampled_from(["id", "embedding", "embeddings", "k", "x"]), json_values()))
def test_any_object_with_protocol_keys(obj: dict[str, object]) -> None:
    text = dumps(obj)
    if text is not None:
        result = outcome(CODEC.parse_text, text)
        if isinstance(result, ProtocolError):
            assert result.request_id == readable_id(text)


# -- structured input ---------------------------------------------------------------------


@FAST
@given(valid_requests())
def test_valid_requests_parse_to_what_was_sent(request: dict[str, object]) -> None:
    query = outcome(CODEC.parse_text, orjson.dumps(request).decode())
    assert isinstance(query, Query)
    assert query.id == request["id"] and type(query.id) is type(request["id"])
    rows = request.get("embeddings", [request.get("embedding")])
    np.testing.assert_array_equal(query.vectors, np.array(rows, np.float32))
    assert query.k == request.get("k", TOP_K)
    assert query.timeout_ms == request.get("timeout_ms")
    assert query.multi == ("embeddings" in request)


@FAST
@given(mutated_requests())
@example({"id": 1, "embedding": [1, 2, 3, 4], "k": 2**64})
@example({"id": 1, "embedding": [1, 2, 3, 4], "k": math.nan})
@example({"id": 1, "embedding": [1, 2, 3, 4], "timeout_ms": 1e400})
@example({"id": 1, "embedding": [1e39, 2, 3, 4]})
@example({"id": "x", "embeddings": [[1, 2, 3, 4]] * (MAX_QUERIES + 1)})
@example({"id": 1, "embedding": [True, 2, 3, 4]})
@example({"id": 1, "embedding": [10**400, 2, 3, 4]})
def test_mutated_requests(request: dict[str, object]) -> None:
    text = dumps(request)
    if text is None:
        return
    result = outcome(CODEC.parse_text, text)
    if isinstance(result, ProtocolError):
        assert result.request_id == readable_id(text)
    cos = {key: value for key, value in request.items() if key != "id"}
    cos_text = dumps(cos)
    if cos_text is not None:
        outcome(CODEC.parse_cos, cos_text.encode())


@FAST
@given(valid_requests(), st.integers(0, 400), st.integers(0, 7))
def test_bit_flipped_and_truncated_requests(
    request: dict[str, object], position: int, bit: int
) -> None:
    data = bytearray(orjson.dumps(request))
    cut = bytes(data[: position % (len(data) + 1)])
    outcome(CODEC.parse_text, cut)
    data[position % len(data)] ^= 1 << bit
    outcome(CODEC.parse_text, bytes(data))
    outcome(CODEC.parse_text, bytes(data).decode("utf-8", "replace"))


# -- binary frames ------------------------------------------------------------------------


@FAST
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, K_LIMIT),
    st.integers(0, MAX_TIMEOUT_MS),
    st.integers(1, MAX_QUERIES).flatmap(vectors),
)
def test_valid_binary_frames_round_trip(
    request_id: int, k: int, timeout_ms: int, rows: list[list[float]]
) -> None:
    frame = encode_binary_query(request_id, np.array(rows, np.float32), k, timeout_ms)
    query = outcome(CODEC.parse_binary, frame)
    assert isinstance(query, Query) and query.binary
    assert (query.id, query.k, query.timeout_ms) == (request_id, k or TOP_K, timeout_ms or None)
    np.testing.assert_array_equal(query.vectors, np.array(rows, np.float32))


@FAST
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=4 * DIM * 3),
)
def test_any_binary_header_and_payload(
    request_id: int, k: int, count: int, timeout_ms: int, payload: bytes
) -> None:
    frame = BINARY_HEADER.pack(request_id, k, count, timeout_ms) + payload
    result = outcome(CODEC.parse_binary, frame)
    read_id = result.id if isinstance(result, Query) else result.request_id
    assert read_id == request_id


@FAST
@given(st.integers(1, MAX_QUERIES).flatmap(vectors), FLOAT_EDGES)
def test_binary_frames_with_a_bad_float_are_bad_value(rows: list[list[float]], edge: float) -> None:
    array = np.array(rows, np.float32)
    with np.errstate(over="ignore"):
        array[0, 0] = np.float32(edge)
    if array[0, 0] == 0:
        array[0] = 0  # a zero vector
    result = outcome(CODEC.parse_binary, encode_binary_query(7, array))
    bad = not np.isfinite(array).all() or not array.any(axis=1).all()
    assert isinstance(result, ProtocolError) == bad
    assert not bad or (result.code, result.request_id) == ("bad_value", 7)


# -- answers ------------------------------------------------------------------------------


@FAST
@given(valid_requests(), st.booleans(), st.data())
def test_answers_of_valid_requests_encode(
    request: dict[str, object], binary: bool, data: st.DataObject
) -> None:
    if binary:
        rows = request.get("embeddings", [request.get("embedding")])
        request_id = data.draw(st.integers(0, 2**64 - 1))
        query = CODEC.parse_binary(encode_binary_query(request_id, np.array(rows, np.float32)))
    else:
        query = CODEC.parse_text(orjson.dumps(request))
    ids = np.arange(query.count * query.k, dtype=np.int64).reshape(query.count, query.k)
    scores = np.linspace(1, -1, ids.size, dtype=np.float32).reshape(ids.shape)
    frame = Codec.encode_result(query, ids, scores)
    if binary:
        request_id, got_ids, got_scores = Codec.decode_binary_result(frame)
        assert request_id == query.id
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_scores, scores)
    else:
        answer = orjson.loads(frame)
        assert answer["id"] == query.id
        assert len(answer["results"] if query.multi else [answer["result"]]) == query.count


def test_error_frames_are_json_with_the_id() -> None:
    for request_id in (None, 0, -(2**63), 2**64 - 1, "", "é✓🙂"):
        frame = orjson.loads(Codec.encode_error(request_id, "bad_k", "message"))
        assert frame == {"id": request_id, "error": {"code": "bad_k", "message": "message"}}


def test_binary_header_is_16_bytes() -> None:
    assert BINARY_HEADER.size == struct.calcsize("<QHHI") == 16


# -- bugs found by fuzzing (docs/reliability.md), fixed: they stay fixed ----------------------

UNENCODABLE_IDS = [
    '{"id": "\\ud800", "embedding": [1, 2, 3, 4]}',  # a lone surrogate escape: orjson reads it
    '{"id": "\\udfff", "embedding": [NaN, 2, 3, 4]}',
    '{"id": 99999999999999999999999, "embedding": [NaN, 2, 3, 4]}',  # NaN: lenient path
    '{"id": -99999999999999999999999, "embedding": [1, 2, 3, 4], "k": Infinity}',
]


@pytest.mark.parametrize("text", UNENCODABLE_IDS)
def test_every_read_id_can_be_written_back(text: str) -> None:
    try:
        query = CODEC.parse_text(text)
    except ProtocolError as exc:
        Codec.encode_error(exc.request_id, exc.code, exc.message)
    else:
        ids = np.zeros((1, query.k), np.int64)
        Codec.encode_result(query, ids, np.zeros((1, query.k), np.float32))


@pytest.mark.parametrize(
    "text",
    [
        '{"id": 1, "embedding": [[1], [2], [3], [4]]}',
        '{"id": 1, "embeddings": [[[1, 2], [3, 4], [5, 6], [7, 8]]]}',
    ],
)
def test_nested_rows_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        CODEC.parse_text(text)


def test_strings_in_embeddings_are_refused() -> None:
    with pytest.raises(ProtocolError) as caught:
        CODEC.parse_text('{"id": 1, "embedding": ["1", "2", "3.5", "4"]}')
    assert caught.value.code == "bad_request"
