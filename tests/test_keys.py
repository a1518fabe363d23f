"""Keys: the validation rules, the binary codec, and `--keys FILE` with one clear line per
problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flasma_ws.errors import KeyFileError
from flasma_ws.keys import (
    MAX_INT_KEY,
    MAX_KEY_BYTES,
    decode_keys,
    encode_keys,
    key_error,
    load_keys_file,
)


@pytest.mark.parametrize("key", [0, 1, MAX_INT_KEY, np.int64(7), np.uint64(MAX_INT_KEY)])
def test_valid_int_keys(key: object) -> None:
    assert key_error(key, "int") is None


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (-1, "out of range"),
        (MAX_INT_KEY + 1, "out of range"),
        (np.uint64(MAX_INT_KEY + 1), "out of range"),
        (True, "not an integer"),
        (1.0, "not an integer"),
        ("1", "not an integer"),
        (None, "not an integer"),
    ],
)
def test_invalid_int_keys(key: object, rule: str) -> None:
    error = key_error(key, "int")
    assert error is not None and rule in error


@pytest.mark.parametrize("key", ["a", "x" * MAX_KEY_BYTES, "é" * (MAX_KEY_BYTES // 2), "a b\n"])
def test_valid_str_keys(key: str) -> None:
    assert key_error(key, "str") is None


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("", "has 0 UTF-8 bytes"),
        ("x" * (MAX_KEY_BYTES + 1), f"has {MAX_KEY_BYTES + 1} UTF-8 bytes"),
        ("é" * (MAX_KEY_BYTES // 2 + 1), f"has {MAX_KEY_BYTES + 2} UTF-8 bytes"),
        ("a\ud800", "lone surrogate"),
        (5, "not a string"),
        (b"ab", "not a string"),
    ],
)
def test_invalid_str_keys(key: object, rule: str) -> None:
    error = key_error(key, "str")
    assert error is not None and rule in error


def test_a_huge_bad_key_is_quoted_short() -> None:
    error = key_error("y" * 10_000, "str")
    assert error is not None and len(error) < 200


@given(st.lists(st.integers(0, MAX_INT_KEY), max_size=20), st.binary(max_size=5))
def test_int_codec_round_trip(keys: list[int], prefix: bytes) -> None:
    buf = prefix + encode_keys(keys, "int") + b"tail"
    decoded, end = decode_keys(buf, len(prefix), len(keys), "int")
    assert decoded == keys and buf[end:] == b"tail"


str_keys = st.text(min_size=1, max_size=MAX_KEY_BYTES // 4).filter(
    lambda key: key_error(key, "str") is None
)


@given(st.lists(str_keys, max_size=20), st.binary(max_size=5))
def test_str_codec_round_trip(keys: list[str], prefix: bytes) -> None:
    buf = prefix + encode_keys(keys, "str") + b"tail"
    decoded, end = decode_keys(buf, len(prefix), len(keys), "str")
    assert decoded == keys and buf[end:] == b"tail"


def test_decoding_bytes_that_end_early_raises() -> None:
    with pytest.raises(ValueError):
        decode_keys(encode_keys([1, 2], "int")[:-1], 0, 2, "int")
    with pytest.raises(ValueError):
        decode_keys(encode_keys(["abc"], "str")[:-1], 0, 1, "str")


def test_int_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.npy"
    np.save(path, np.array([5, 0, MAX_INT_KEY], dtype=np.int64))
    keys = load_keys_file(path, 3, "int")
    assert isinstance(keys, np.ndarray) and keys.dtype == np.int64
    assert keys.tolist() == [5, 0, MAX_INT_KEY]


def test_int_keys_of_a_narrower_integer_dtype_are_accepted(tmp_path: Path) -> None:
    np.save(tmp_path / "keys.npy", np.array([3, 1, 2], dtype=np.uint16))
    assert load_keys_file(tmp_path / "keys.npy", 3, "int").tolist() == [3, 1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("keys", "n", "message"),
    [
        (
            np.arange(9_999, dtype=np.int64),
            10_000,
            "has 9,999 keys but the vectors have 10,000 rows",
        ),
        (np.array([4, 1, 2, 1, 4], dtype=np.int64), 5, "rows 1 and 3 both hold key 1"),
        (np.array([0, -3, 2], dtype=np.int64), 3, "row 1: key -3 is out of range"),
        (np.array([0, 2**63], dtype=np.uint64), 2, f"row 1: key {2**63} is out of range"),
        (np.array([0.0, 1.0]), 2, "holds float64 values; int keys must be int64"),
        (np.zeros((2, 2), dtype=np.int64), 2, r"shape \(2, 2\); int keys must be a 1-D"),
    ],
)
def test_bad_int_keys_files(tmp_path: Path, keys: np.ndarray, n: int, message: str) -> None:
    path = tmp_path / "keys.npy"
    np.save(path, keys)
    with pytest.raises(KeyFileError, match=f"{path}.*{message}"):
        load_keys_file(path, n, "int")


def test_str_keys_file_with_crlf_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_bytes("alpha\r\nbéta\r\n🙂".encode())
    assert load_keys_file(path, 3, "str") == ["alpha", "béta", "🙂"]
    path.write_bytes(b"a\nb\n")
    assert load_keys_file(path, 2, "str") == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "n", "message"),
    [
        (b"a\nb\n", 3, "has 2 keys but the vectors have 3 rows"),
        (b"a\nb\nc\nb\na\n", 5, "lines 2 and 4 both hold key 'b'"),
        (b"a\n\nc\n", 3, "line 2: key '' has 0 UTF-8 bytes"),
        (b"a\n" + b"x" * 300 + b"\n", 2, "line 2: key 'xxx.*has 300 UTF-8 bytes"),
        (b"a\nb\n\xff\n", 3, "line 3 is not valid UTF-8"),
    ],
)
def test_bad_str_keys_files(tmp_path: Path, content: bytes, n: int, message: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=f"{path}.*{message}"):
        load_keys_file(path, n, "str")


def test_a_keys_file_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "keys.npy", np.arange(3))
    (tmp_path / "keys.txt").write_text("a\nb\nc\n")
    with pytest.raises(KeyFileError, match="--key-type is str"):
        load_keys_file(tmp_path / "keys.npy", 3, "str")
    with pytest.raises(KeyFileError, match="not a .npy file.*--key-type str"):
        load_keys_file(tmp_path / "keys.txt", 3, "int")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keys_file(tmp_path / "nope", 3, "int")
