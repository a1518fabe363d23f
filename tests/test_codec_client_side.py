"""The client's side of the wire codec, with bytes alone: requests it encodes parse back (on
the server's side of the same codec) to what was asked; answers the server encodes decode back
to the same rows and scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_codec_properties import CODEC, DIM, FAST, K_LIMIT, MAX_QUERIES

from flasma_ws.errors import ProtocolError
from flasma_ws.protocol import (
    BINARY_HEADER,
    Codec,
    decode_answer,
    decode_cos_answer,
    encode_cos_request,
    encode_error,
    encode_request,
)

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-3)
vectors = st.lists(finite, min_size=DIM, max_size=DIM)
blocks = st.lists(vectors, min_size=1, max_size=MAX_QUERIES)
ks = st.none() | st.integers(1, K_LIMIT)
timeouts = st.none() | st.integers(1, 10_000)
ids = st.integers(0, 2**63 - 1)
SHORT = BINARY_HEADER.pack(1, 2, 1, 0) + b"\0" * 4  # promises 2 results, holds half of one


def parse(frame: bytes, binary: bool):
    return CODEC.parse_binary(frame) if binary else CODEC.parse_text(frame)


@FAST
@given(block=blocks, k=ks, timeout_ms=timeouts, request_id=ids, binary=st.booleans())
def test_an_encoded_multi_query_parses_back(block, k, timeout_ms, request_id, binary) -> None:
    request = encode_request(block, k, multi=True, binary=binary, timeout_ms=timeout_ms)
    query = parse(request.frame(request_id), binary)
    assert query.id == request_id and query.count == request.count == len(block)
    np.testing.assert_array_equal(query.vectors, np.asarray(block, np.float32))
    assert query.k == (k or CODEC.top_k) and query.timeout_ms == timeout_ms


@FAST
@given(vector=vectors, k=ks, request_id=ids, binary=st.booleans())
def test_an_encoded_query_parses_back(vector, k, request_id, binary) -> None:
    request = encode_request(vector, k, binary=binary)
    query = parse(request.frame(request_id), binary)
    assert (query.id, query.count, query.k) == (request_id, 1, k or CODEC.top_k)
    np.testing.assert_array_equal(query.vectors[0], np.asarray(vector, np.float32))


@FAST
@given(vector=vectors, k=ks)
def test_a_cos_body_parses_back(vector, k) -> None:
    query = CODEC.parse_cos(encode_cos_request(vector, k))
    assert query.k == (k or CODEC.top_k)
    np.testing.assert_array_equal(query.vectors[0], np.asarray(vector, np.float32))


@pytest.mark.parametrize("bad", [([], {}), ([[1.0] * DIM], {}), ([1.0] * DIM, {"multi": True})])
def test_shapes_that_cannot_be_sent_are_refused(bad) -> None:
    vectors, options = bad
    with pytest.raises(ValueError, match="shape"):
        encode_request(vectors, **options)


def test_binary_fields_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be"):
        encode_request([1.0] * DIM, 0, binary=True)
    with pytest.raises(ValueError, match="at most 65535"):
        encode_request(np.ones((65_536, 1)), multi=True, binary=True)


def results(count: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 2**32 - 1, (count, k))
    return rows, np.sort(rng.standard_normal((count, k)).astype(np.float32))[:, ::-1]


@FAST
@given(count=st.integers(1, MAX_QUERIES), k=st.integers(1, K_LIMIT), seed=st.integers(0, 99))
def test_answers_decode_back_to_the_rows_and_scores(count: int, k: int, seed: int) -> None:
    rows, scores = results(count, k, seed)
    for binary in (False, True):
        block = encode_request(np.ones((count, DIM)), k, multi=True, binary=binary)
        query = parse(block.frame(7), binary)
        encoded = Codec.encode_result(query, rows, scores)
        answer = decode_answer(encoded if binary else encoded.decode())  # text frames are str
        assert answer.id == 7 and answer.error is None
        assert answer.multi == (None if binary else True)
        np.testing.assert_array_equal(answer.ids, rows)
        np.testing.assert_array_equal(answer.scores, scores)
        assert answer.ids.dtype == np.int64 and answer.scores.dtype == np.float32


def test_a_single_json_answer_and_a_cos_body_decode_as_one_row() -> None:
    rows, scores = results(1, 3, seed=0)
    query = CODEC.parse_text(encode_request(np.ones(DIM), 3).frame(1))
    single = decode_answer(Codec.encode_result(query, rows, scores).decode())
    cos = decode_cos_answer(Codec.encode_cos(rows, scores))
    for answer in (single, cos):
        assert answer.multi is False and answer.ids.shape == (1, 3)
        np.testing.assert_array_equal(answer.scores, scores)


def test_an_error_decodes_to_its_code_and_message() -> None:
    answer = decode_answer(encode_error(5, "bad_k", "k must be at most 20.").decode())
    assert (answer.id, answer.error, answer.ids) == (5, ("bad_k", "k must be at most 20."), None)


@pytest.mark.parametrize(
    "data", ["not json", "[1, 2]", '{"id": 1}', '{"result": [[1]]}', b"\x01\x02", SHORT]
)
def test_a_malformed_answer_is_one_protocol_error(data: str | bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_answer(data)
    assert caught.value.code == "internal"
