"""Row keys: validation, the WAL's binary codec, and `--keys FILE` loading. Pure: no I/O but
the one file `load_keys_file` reads.

A server uses one key type: "int" (integers 0..2^63-1, so they fit an int64 column) or "str"
(1..256 UTF-8 bytes, so their length fits the codec's u16 and one key cannot bloat a frame).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import KeyFileError

KeyType = Literal["int", "str"]
Key = int | str
KEY_TYPES: tuple[KeyType, ...] = ("int", "str")
MAX_INT_KEY = 2**63 - 1
MAX_KEY_BYTES = 256
NPY_MAGIC = b"\x93NUMPY"
_STR_LENGTH = struct.Struct("<H")
_SHOWN_CHARS = 40  # a bad key is quoted in messages up to this many characters


def shown(key: object) -> str:
    """A key as messages quote it: its repr, cut so that one huge key cannot flood a log."""
    text = repr(key)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def key_error(key: object, key_type: KeyType) -> str | None:
    """None when `key` is a valid key of `key_type`, else a message naming the rule it breaks."""
    if key_type == "int":
        if isinstance(key, bool) or not isinstance(key, int | np.integer):
            return f"key {shown(key)} is not an integer; int keys are integers 0..{MAX_INT_KEY}"
        if not 0 <= int(key) <= MAX_INT_KEY:
            return f"key {key} is out of range; int keys are integers 0..{MAX_INT_KEY}"
        return None
    if not isinstance(key, str):
        return f"key {shown(key)} is not a string; str keys have 1..{MAX_KEY_BYTES} UTF-8 bytes"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return f"key {shown(key)} holds a lone surrogate, which is not valid UTF-8"
    if not 1 <= size <= MAX_KEY_BYTES:
        return f"key {shown(key)} has {size} UTF-8 bytes; str keys have 1..{MAX_KEY_BYTES}"
    return None


def encode_keys(keys: Sequence[Key], key_type: KeyType) -> bytes:
    """Valid keys as bytes: int keys as little-endian int64, str keys as u16 length + UTF-8."""
    if key_type == "int":
        return np.asarray(keys, dtype="<i8").tobytes() if len(keys) else b""
    parts: list[bytes] = []
    for key in keys:
        raw = str(key).encode("utf-8")
        parts += (_STR_LENGTH.pack(len(raw)), raw)
    return b"".join(parts)


def decode_keys(
    buf: bytes | memoryview, offset: int, count: int, key_type: KeyType
) -> tuple[list[Key], int]:
    """`count` keys from `buf` at `offset` and the offset after them; ValueError when the bytes
    end early or hold a key no encoder writes (the caller knows which file to blame)."""
    if key_type == "int":
        end = offset + 8 * count
        if end > len(buf):
            raise ValueError(f"{count} int keys need {8 * count} bytes at {offset}")
        ints = np.frombuffer(buf, dtype="<i8", count=count, offset=offset)
        if count and int(ints.min()) < 0:
            raise ValueError("a negative int key")
        return ints.tolist(), end
    keys: list[Key] = []
    view = memoryview(buf)
    for _ in range(count):
        if offset + 2 > len(view):
            raise ValueError(f"a str key's length ends early at {offset}")
        (size,) = _STR_LENGTH.unpack_from(view, offset)
        offset += 2
        if not 1 <= size <= MAX_KEY_BYTES or offset + size > len(view):
            raise ValueError(f"a str key of {size} bytes at {offset}")
        keys.append(str(view[offset : offset + size], "utf-8"))
        offset += size
    return keys, offset


def load_keys_file(path: str | Path, n: int, key_type: KeyType) -> np.ndarray | list[str]:
    """The keys of `--keys FILE` for `n` vector rows, row by row: an int64 `.npy` (int keys,
    returned as an int64 array) or a UTF-8 text file of one key a line (str keys, a list).
    Every problem raises KeyFileError with one line naming the file, the row and the rule."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise KeyFileError(f"{path} {what}; give --keys the path of a keys file.")
    with path.open("rb") as fh:
        is_npy = fh.read(len(NPY_MAGIC)) == NPY_MAGIC
    if key_type == "int":
        if not is_npy:
            raise KeyFileError(
                f"{path} is not a .npy file; int keys come as a 1-D int64 .npy of {n:,} keys "
                "(numpy.save), or pass --key-type str for a text file of string keys."
            )
        return _int_keys(path, n)
    if is_npy:
        raise KeyFileError(
            f"{path} is a .npy file, but --key-type is str; string keys come as a UTF-8 text "
            "file of one key a line, or pass --key-type int for an int64 .npy."
        )
    return _str_keys(path, n)


def _count_error(path: Path, found: int, n: int) -> KeyFileError:
    return KeyFileError(
        f"{path} has {found:,} keys but the vectors have {n:,} rows; give one key per row."
    )


def _int_keys(path: Path, n: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KeyFileError(
            f"{path} is not a readable .npy file ({exc}); check that it is complete."
        ) from exc
    if not np.issubdtype(array.dtype, np.integer):
        raise KeyFileError(f"{path} holds {array.dtype} values; int keys must be int64.")
    if array.ndim != 1:
        raise KeyFileError(f"{path} has shape {array.shape}; int keys must be a 1-D array.")
    if array.shape[0] != n:
        raise _count_error(path, array.shape[0], n)
    below = np.flatnonzero(array < 0)
    above = np.flatnonzero(array > MAX_INT_KEY) if array.dtype == np.uint64 else below[:0]
    if below.size or above.size:
        row = int(min(below[:1].tolist() + above[:1].tolist()))
        raise KeyFileError(
            f"{path} row {row:,}: key {int(array[row])} is out of range; "
            f"int keys are integers 0..{MAX_INT_KEY}."
        )
    keys = np.array(array, dtype=np.int64)
    first, later = _first_duplicate(keys)
    if later is not None:
        raise KeyFileError(
            f"{path} rows {first:,} and {later:,} both hold key {int(keys[later])}; "
            "keys must be unique."
        )
    return keys


def _first_duplicate(keys: np.ndarray) -> tuple[int, int | None]:
    """(earlier row, row) for the first row whose key an earlier row holds; (0, None) if none.
    That row has exactly one earlier twin, or the second twin would be an earlier duplicate."""
    order = np.argsort(keys, kind="stable")
    repeats = order[1:][keys[order[1:]] == keys[order[:-1]]]
    if not repeats.size:
        return 0, None
    later = int(repeats.min())
    return int(np.flatnonzero(keys == keys[later])[0]), later


def _str_keys(path: Path, n: int) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise KeyFileError(
            f"{path} line {line:,} is not valid UTF-8 ({exc.reason}); save the file as UTF-8."
        ) from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the trailing newline (or an empty file)
    if len(lines) != n:
        raise _count_error(path, len(lines), n)
    keys = [line[:-1] if line.endswith("\r") else line for line in lines]
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        error = key_error(key, "str")
        if error is not None:
            raise KeyFileError(f"{path} line {row + 1:,}: {error}.")
        earlier = seen.setdefault(key, row)
        if earlier != row:
            raise KeyFileError(
                f"{path} lines {earlier + 1:,} and {row + 1:,} both hold key {shown(key)}; "
                "keys must be unique."
            )
    return keys
