"""Fuzz a live flasma-ws server with mutated WebSocket frames, and check every answer.

    python -m reliability.fuzz --frames 100000                  # in-process server on loopback
    python -m reliability.fuzz --url ws://127.0.0.1:8080/ws --frames 100000

Frames start valid (JSON single and multi-query, binary single and multi) and are mutated:
bit flips, byte overwrites, truncation, splicing with another frame, chunk deletion and
duplication, type swaps, huge/NaN/denormal numbers, extra and duplicate keys, deep nesting,
unicode ids, binary header fields, text sent as binary and binary as text. One frame in six
goes out unmutated as a control.

A violation (exit 1) is any of:
- a frame not answered exactly once. Answers are matched to frames by the id a client can
  read from the frame (the JSON object's string or integer "id", or the binary header's
  u64), and by null for frames whose id is destroyed: answers per id must equal frames per id;
- an answer no frame asked for, an error code outside ERROR_CODES, any `internal` error (bad
  input must get a bad_* code), a control frame answered with anything but a result;
- the server closing a connection on us; /healthz not 200 afterwards; flasma_open_connections
  not back where it started once our connections are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import random
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from flasma_ws.protocol import BINARY_HEADER, ERROR_CODES, MAX_ID_CHARS

from .common import healthz, open_connections, wait_open_connections

if TYPE_CHECKING:
    from flasma_ws.settings import Settings

CONTROL_RATE = 1 / 6
MAX_SHOWN = 12


@dataclass
class ServerLimits:
    """What the server tells /info: enough to build valid frames."""

    dim: int
    max_k: int
    max_queries_per_frame: int


@dataclass
class Sent:
    """One frame on the wire and the id a client can expect in its answer."""

    payload: str | bytes  # str: a text frame; bytes: a binary frame
    expected: object
    mutators: tuple[str, ...]
    control: bool


@dataclass
class Violation:
    kind: str
    detail: str
    frame: Sent | None = None

    def describe(self) -> str:
        text = f"{self.kind}: {self.detail}"
        if self.frame is not None:
            shown = repr(self.frame.payload)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            text += f"\n    frame ({'+'.join(self.frame.mutators) or 'control'}): {shown}"
        return text


@dataclass
class Report:
    frames: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    mutators: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    reconnects: int = 0
    elapsed_s: float = 0.0
    healthz: int | None = None
    open_connections: tuple[float, float] = (0.0, 0.0)  # before, after

    def violate(self, kind: str, detail: str, frame: Sent | None = None) -> None:
        self.violations.append(Violation(kind, detail, frame))

    def summary(self) -> str:
        rate = self.frames / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"frames sent: {self.frames} in {self.elapsed_s:.1f} s ({rate:.0f}/s), "
            f"answers: {sum(self.answers.values())}, reconnects: {self.reconnects}",
            "answers by outcome: " + ", ".join(f"{k} {v}" for k, v in self.answers.most_common()),
            "frames by mutator: " + ", ".join(f"{k} {v}" for k, v in sorted(self.mutators.items())),
            f"/healthz after: {self.healthz}; flasma_open_connections before/after: "
            f"{self.open_connections[0]:.0f}/{self.open_connections[1]:.0f}",
        ]
        kinds = Counter(v.kind for v in self.violations)
        lines.append(f"violations: {len(self.violations)} {dict(kinds) if kinds else ''}")
        lines += [v.describe() for v in self.violations[:MAX_SHOWN]]
        return "\n".join(lines)


# -- valid frames -------------------------------------------------------------------------


class Frames:
    """Valid requests with unique random ids, and their mutations."""

    def __init__(self, target: ServerLimits, rng: random.Random) -> None:
        self.target = target
        self.rng = rng
        self.used: set[object] = set()

    def unique_id(self, binary: bool) -> int | str:
        while True:
            rng = self.rng
            if binary or rng.random() < 0.5:
                value: int | str = rng.getrandbits(52 if binary else 47)
            else:
                value = f"s{rng.getrandbits(40):x}"
            if value not in self.used:
                self.used.add(value)
                return value

    def vector(self) -> list[float]:
        return [round(self.rng.uniform(-1, 1), 5) or 0.5 for _ in range(self.target.dim)]

    def json_request(self) -> dict[str, object]:
        rng = self.rng
        request: dict[str, object] = {"id": self.unique_id(binary=False)}
        if rng.random() < 0.7:
            request["embedding"] = self.vector()
        else:
            request["embeddings"] = [self.vector() for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:
            request["k"] = rng.randint(1, min(self.target.max_k, 20))
        if rng.random() < 0.2:
            request["timeout_ms"] = rng.randint(5_000, 60_000)
        return request

    def binary_request(self) -> bytes:
        rng = self.rng
        rows = rng.randint(1, 3) if rng.random() < 0.3 else 1
        values = [x for _ in range(rows) for x in self.vector()]
        header = BINARY_HEADER.pack(self.unique_id(binary=True), rng.randint(0, 20), rows, 0)
        return header + struct.pack(f"<{len(values)}f", *values)

    def valid(self) -> tuple[dict[str, object] | None, str | bytes]:
        if self.rng.random() < 0.3:
            return None, self.binary_request()
        request = self.json_request()
        return request, orjson.dumps(request).decode()


# -- mutations ----------------------------------------------------------------------------

ODD_VALUES: list[object] = [None, True, False, "x", "", 1.5, -1, 0, [], {}, [1, 2], {"a": 1}, "🙂"]
HUGE_VALUES: list[object] = [2**63, 2**64 - 1, -(2**63), 1e308, 1e39, -1e39, 1e-320, -0.0, 0]
ODD_STRINGS = ["é", "🙂" * 3, "\u0000", "\u202eabc", "a\u0301", "中文", "\ufeff", " ", "\\", '"']
ODD_KEYS = ["topk", "ID", "embedding ", "Embedding", "é", "", "x" * 300, "k\u0000"]
JSON_BYTES = b'{}[]",:\\0123456789-+.eEntfalsuNI '

StructuredMutator = Callable[[dict, Frames], str]
ByteMutator = Callable[[bytes, Frames], bytes]


FIELDS = ("id", "embedding", "embeddings", "k", "timeout_ms")


def pick_key(rng: random.Random) -> str:
    return rng.choice(FIELDS)


def m_type_swap(request: dict, frames: Frames) -> str:
    request[pick_key(frames.rng)] = frames.rng.choice(ODD_VALUES)
    return json.dumps(request)


def m_extra_key(request: dict, frames: Frames) -> str:
    request[frames.rng.choice(ODD_KEYS)] = frames.rng.choice(ODD_VALUES)
    return json.dumps(request, ensure_ascii=frames.rng.random() < 0.5)


def m_drop_key(request: dict, frames: Frames) -> str:
    request.pop(pick_key(frames.rng), None)
    return json.dumps(request)


def m_huge_number(request: dict, frames: Frames) -> str:
    rng = frames.rng
    value = rng.choice([*HUGE_VALUES, 10 ** rng.randint(20, 400)])
    row = first_row(request)
    if row is not None and rng.random() < 0.5:
        row[rng.randrange(len(row))] = value
    else:  # ids beyond 64 bits are left to the known-bug mutator bigint_id_nan
        key = pick_key(rng)
        request[key] = rng.choice(HUGE_VALUES) if key == "id" else value
    return json.dumps(request)


def m_nan(request: dict, frames: Frames) -> str:
    """NaN/Infinity in a vector, or as k/timeout_ms (json.dumps writes the bare tokens)."""
    rng = frames.rng
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    row = first_row(request)
    if row is not None and rng.random() < 0.7:
        row[rng.randrange(len(row))] = value
    else:
        request[rng.choice(["k", "timeout_ms"])] = value
    return json.dumps(request)


def m_zero_or_bool(request: dict, frames: Frames) -> str:
    row = first_row(request)
    if row is not None:
        if frames.rng.random() < 0.5:
            row[:] = [0] * len(row)
        else:
            row[frames.rng.randrange(len(row))] = frames.rng.choice([True, False])
    return json.dumps(request)


def m_wrong_dim(request: dict, frames: Frames) -> str:
    row = first_row(request)
    if row is not None:
        if frames.rng.random() < 0.5 and row:
            row.pop()
        else:
            row.extend([0.5] * frames.rng.randint(1, 3))
    return json.dumps(request)


def m_both_or_many(request: dict, frames: Frames) -> str:
    rng, target = frames.rng, frames.target
    if rng.random() < 0.5:
        request["embeddings" if "embedding" in request else "embedding"] = frames.vector()
    else:
        request.pop("embedding", None)
        count = rng.choice([0, target.max_queries_per_frame + 1])
        request["embeddings"] = [frames.vector() for _ in range(count)]
    return json.dumps(request)


def m_deep_nesting(request: dict, frames: Frames) -> str:
    depth = frames.rng.choice([3, 100, 600, 1100, 5000, 100_000])
    key = frames.rng.choice(["id", "embedding", "k", "x"])
    inner = json.dumps(request.get(key, 1))
    request[key] = "@NEST@"
    return json.dumps(request).replace('"@NEST@"', "[" * depth + inner + "]" * depth)


def m_unicode(request: dict, frames: Frames) -> str:
    rng = frames.rng
    request["id"] = "".join(rng.choice(ODD_STRINGS) for _ in range(rng.randint(1, 4)))
    request["id"] += str(frames.unique_id(binary=False))  # still unique
    return json.dumps(request, ensure_ascii=rng.random() < 0.5)


def m_duplicate_key(request: dict, frames: Frames) -> str:
    text = json.dumps(request)
    return '{"id": ' + json.dumps(frames.rng.choice(ODD_VALUES)) + ", " + text[1:]


def m_numeric_strings(request: dict, frames: Frames) -> str:
    row = first_row(request)
    if row is not None:
        row[:] = [str(x) for x in row]
    return json.dumps(request)


# Regressions: these found server bugs, since fixed (docs/reliability.md) ---------------------


def m_surrogate_id(request: dict, frames: Frames) -> str:
    request["id"] = "\ud800" + str(frames.unique_id(binary=False))  # written as "\ud800..."
    return json.dumps(request)


def m_bigint_id_nan(request: dict, frames: Frames) -> str:
    request["id"] = 10**25 + frames.rng.getrandbits(40)
    row = first_row(request)
    if row is not None:
        row[0] = float("nan")
    return json.dumps(request)


def m_nested_rows(request: dict, frames: Frames) -> str:
    if "embedding" in request:
        request["embedding"] = [[x] for x in request["embedding"]]
    else:
        request["embeddings"] = [[[x] for x in row] for row in request["embeddings"]]
    return json.dumps(request)


def first_row(request: dict) -> list | None:
    rows = request.get("embeddings")
    row = rows[0] if isinstance(rows, list) and rows else request.get("embedding")
    return row if isinstance(row, list) and row else None


# Byte-level ---------------------------------------------------------------------------------


def b_bit_flip(data: bytes, frames: Frames) -> bytes:
    out = bytearray(data)
    for _ in range(frames.rng.randint(1, 4)):
        if out:
            out[frames.rng.randrange(len(out))] ^= 1 << frames.rng.randrange(8)
    return bytes(out)


def b_byte_set(data: bytes, frames: Frames) -> bytes:
    out, rng = bytearray(data), frames.rng
    for _ in range(rng.randint(1, 3)):
        if out:
            value = rng.choice(JSON_BYTES) if rng.random() < 0.7 else rng.randrange(256)
            out[rng.randrange(len(out))] = value
    return bytes(out)


def b_truncate(data: bytes, frames: Frames) -> bytes:
    return data[: frames.rng.randrange(len(data) + 1)]


def b_splice(data: bytes, frames: Frames) -> bytes:
    _, other = frames.valid()
    other_bytes = other.encode() if isinstance(other, str) else other
    rng = frames.rng
    return data[: rng.randrange(len(data) + 1)] + other_bytes[rng.randrange(len(other_bytes) + 1) :]


def b_delete_chunk(data: bytes, frames: Frames) -> bytes:
    start = frames.rng.randrange(len(data) + 1)
    return data[:start] + data[start + frames.rng.randint(1, 32) :]


def b_duplicate_chunk(data: bytes, frames: Frames) -> bytes:
    rng = frames.rng
    start = rng.randrange(len(data) + 1)
    chunk = data[start : start + rng.randint(1, 64)]
    at = rng.randrange(len(data) + 1)
    return data[:at] + chunk * rng.randint(1, 3) + data[at:]


def b_insert_random(data: bytes, frames: Frames) -> bytes:
    at = frames.rng.randrange(len(data) + 1)
    return data[:at] + frames.rng.randbytes(frames.rng.randint(1, 16)) + data[at:]


def b_header_field(data: bytes, frames: Frames) -> bytes:
    if len(data) < BINARY_HEADER.size:
        return data
    out, rng = bytearray(data), frames.rng
    where, fmt = rng.choice([(8, "<H"), (10, "<H"), (12, "<I")])
    bits = 16 if fmt == "<H" else 32
    value = rng.choice([0, 1, 2, 3, frames.target.max_queries_per_frame + 1, 2**bits - 1])
    struct.pack_into(fmt, out, where, value if rng.random() < 0.7 else rng.getrandbits(bits))
    return bytes(out)


def b_bad_float(data: bytes, frames: Frames) -> bytes:
    values = (len(data) - BINARY_HEADER.size) // 4
    if values < 1:
        return data
    out, rng = bytearray(data), frames.rng
    bad = rng.choice([float("nan"), float("inf"), float("-inf"), 0.0])
    if bad == 0.0:  # a whole zero row
        dim = frames.target.dim
        row = rng.randrange(max(1, values // dim))
        out[BINARY_HEADER.size + 4 * dim * row : BINARY_HEADER.size + 4 * dim * (row + 1)] = bytes(
            4 * dim
        )
    else:
        struct.pack_into("<f", out, BINARY_HEADER.size + 4 * rng.randrange(values), bad)
    return bytes(out[: len(data)])


STRUCTURED: dict[str, StructuredMutator] = {
    "type_swap": m_type_swap,
    "extra_key": m_extra_key,
    "drop_key": m_drop_key,
    "huge_number": m_huge_number,
    "nan": m_nan,
    "zero_or_bool": m_zero_or_bool,
    "wrong_dim": m_wrong_dim,
    "both_or_many": m_both_or_many,
    "deep_nesting": m_deep_nesting,
    "unicode": m_unicode,
    "duplicate_key": m_duplicate_key,
    "numeric_strings": m_numeric_strings,
    "surrogate_id": m_surrogate_id,
    "bigint_id_nan": m_bigint_id_nan,
    "nested_rows": m_nested_rows,
}
BYTES_ANY: dict[str, ByteMutator] = {
    "bit_flip": b_bit_flip,
    "byte_set": b_byte_set,
    "truncate": b_truncate,
    "splice": b_splice,
    "delete_chunk": b_delete_chunk,
    "duplicate_chunk": b_duplicate_chunk,
    "insert_random": b_insert_random,
}
BYTES_BINARY: dict[str, ByteMutator] = {"header_field": b_header_field, "bad_float": b_bad_float}
CROSS = ("text_as_binary", "binary_as_text")
ALL_MUTATORS = frozenset([*STRUCTURED, *BYTES_ANY, *BYTES_BINARY, *CROSS])


def mutate(frames: Frames, allowed: frozenset[str]) -> Sent:
    """One valid frame, maybe mutated; `expected` is computed from what is actually sent."""
    rng = frames.rng
    request, payload = frames.valid()
    if rng.random() < CONTROL_RATE:
        return Sent(payload, expected_id(payload), (), True)
    applied: list[str] = []
    structured = [name for name in STRUCTURED if name in allowed]
    if request is not None and structured and rng.random() < 0.5:
        name = rng.choice(structured)
        payload = STRUCTURED[name](request, frames)
        applied.append(name)
    byte_level = [n for n in BYTES_ANY if n in allowed]
    if payload is not None and isinstance(payload, bytes):
        byte_level += [n for n in BYTES_BINARY if n in allowed]
    if byte_level and (not applied or rng.random() < 0.3):
        for _ in range(rng.randint(1, 2)):
            name = rng.choice(byte_level)
            payload = apply_bytes(payload, BYTES_ANY.get(name) or BYTES_BINARY[name], frames)
            applied.append(name)
    payload, crossed = maybe_cross(payload, rng, allowed)
    applied += crossed
    return Sent(payload, expected_id(payload), tuple(applied), False)


def apply_bytes(payload: str | bytes, mutator: ByteMutator, frames: Frames) -> str | bytes:
    if isinstance(payload, bytes):
        return mutator(payload, frames)
    # Text frames must stay valid UTF-8 (else the WebSocket layer, not the codec, refuses them).
    return mutator(payload.encode(), frames).decode("utf-8", "replace")


def maybe_cross(
    payload: str | bytes, rng: random.Random, allowed: frozenset[str]
) -> tuple[str | bytes, list[str]]:
    if rng.random() >= 0.05:
        return payload, []
    if isinstance(payload, str) and "text_as_binary" in allowed:
        return payload.encode(), ["text_as_binary"]
    if isinstance(payload, bytes) and "binary_as_text" in allowed:
        return payload.decode("latin-1"), ["binary_as_text"]
    return payload, []


def expected_id(payload: str | bytes) -> object:
    """The id a client can expect in the answer, reading the frame as the protocol says."""
    if isinstance(payload, bytes):
        return BINARY_HEADER.unpack_from(payload)[0] if len(payload) >= BINARY_HEADER.size else None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:  # the codec also reads NaN/Infinity this way, to answer bad_value
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, dict):
        return None
    return readable_id(obj.get("id"))


def readable_id(value: object) -> object:
    """Ids the server can write back: 64-bit integers, valid Unicode strings up to a length."""
    if type(value) is int:
        return value if -(2**63) <= value < 2**64 else None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate, from a "\ud800" escape
            return None
        return value
    return None


def key_of(request_id: object) -> tuple[str, object]:
    """Dictionary key that keeps 1, "1" and True apart."""
    return type(request_id).__name__, request_id


# -- running ------------------------------------------------------------------------------


@dataclass
class Config:
    frames: int = 100_000
    seed: int = 0
    connections: int = 8
    window: int = 64  # unanswered frames per connection
    max_seconds: float = 600.0
    answer_timeout_s: float = 15.0
    skip: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    url: str | None = None
    token: str | None = None
    save: Path | None = None

    @property
    def mutators(self) -> frozenset[str]:
        return (self.only or ALL_MUTATORS) - self.skip


class Session:
    """One WebSocket connection: sends frames within the window, matches every answer."""

    def __init__(self, ws: ClientConnection, report: Report) -> None:
        self.ws = ws
        self.report = report
        self.pending: dict[tuple[str, object], deque[Sent]] = {}
        self.outstanding = 0
        self.progress = asyncio.Event()

    def add(self, sent: Sent) -> None:
        self.pending.setdefault(key_of(sent.expected), deque()).append(sent)
        self.outstanding += 1

    async def read(self) -> None:
        async for message in self.ws:
            self.on_answer(message)
            self.progress.set()

    def on_answer(self, message: str | bytes) -> None:
        report = self.report
        if isinstance(message, bytes):
            if len(message) < BINARY_HEADER.size:
                report.violate("bad answer", f"short binary answer {message!r}")
                return
            request_id, outcome = BINARY_HEADER.unpack_from(message)[0], "result"
        else:
            try:
                answer = orjson.loads(message)
                request_id = answer["id"]
                outcome = "result" if "result" in answer or "results" in answer else None
                outcome = outcome or answer["error"]["code"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                report.violate("bad answer", f"not a protocol answer: {message[:200]!r}")
                return
        queue = self.pending.get(key_of(request_id))
        if not queue:
            report.violate("unmatched answer", f"{message[:200]!r}")
            return
        sent = queue.popleft()
        self.outstanding -= 1
        report.answers[outcome] += 1
        self.check(sent, outcome, message)

    def check(self, sent: Sent, outcome: str, message: str | bytes) -> None:
        if outcome != "result" and outcome not in ERROR_CODES:
            self.report.violate("unknown error code", f"{message[:200]!r}", sent)
        elif outcome == "internal":
            self.report.violate("internal error", f"{message[:200]!r}", sent)
        elif sent.control and outcome != "result":
            self.report.violate("control frame refused", f"{message[:200]!r}", sent)

    def lost(self) -> list[Sent]:
        return [sent for queue in self.pending.values() for sent in queue]

    async def wait_for_room(self, window: int, timeout_s: float) -> bool:
        """Until fewer than `window` frames are unanswered; False if answers stop coming."""
        while self.outstanding >= window:
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True


async def run_connection(url: str, frames: Iterator[Sent], config: Config, report: Report) -> None:
    """Send this connection's share; reconnect (counting a violation) if the server drops us."""
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else None
    backlog: list[Sent] = []
    while True:
        async with connect(
            url, additional_headers=headers, max_size=None, compression=None, proxy=None
        ) as ws:
            session = Session(ws, report)
            reader = asyncio.create_task(session.read())
            todo = itertools.chain(backlog, frames)  # a frame held back by a lost connection first
            backlog = []
            finished = await send_all(session, todo, backlog, config, report, reader)
            await ws.close()
            await asyncio.gather(reader, return_exceptions=True)
        if not finished:
            report.reconnects += 1
        for sent in session.lost():
            report.violate("no answer", f"expected id {sent.expected!r}", sent)
        if finished:
            return


async def send_all(
    session: Session,
    frames: Iterator[Sent],
    backlog: list[Sent],
    config: Config,
    report: Report,
    reader: asyncio.Task[None],
) -> bool:
    """True once every frame is sent and answered; False if the connection was lost."""
    try:
        for sent in frames:
            if reader.done() or not await session.wait_for_room(
                config.window, config.answer_timeout_s
            ):
                backlog.append(sent)
                break
            session.add(sent)
            report.frames += 1
            report.mutators.update(sent.mutators or ("control",))
            await session.ws.send(sent.payload)
        else:
            if await session.wait_for_room(1, config.answer_timeout_s):
                return True
    except ConnectionClosed:
        pass
    if reader.done():
        exc = reader.exception()
        report.violate("connection closed by the server", repr(exc) if exc else "closed cleanly")
    else:
        report.violate("answers stopped", f"{session.outstanding} unanswered after a pause")
    return False


def frame_stream(
    target: ServerLimits, seed: int, count: int, config: Config, deadline: float
) -> Iterator[Sent]:
    frames = Frames(target, random.Random(seed))
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        yield mutate(frames, config.mutators)


async def fuzz(url: str, http_url: str, config: Config) -> Report:
    report = Report()
    auth = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    info = httpx.get(f"{http_url}/info", headers=auth, timeout=10).raise_for_status().json()
    target = ServerLimits(info["dim"], info["max_k"], info["max_queries_per_frame"])
    before = open_connections(http_url)
    started = time.monotonic()
    deadline = started + config.max_seconds
    shares = [config.frames // config.connections] * config.connections
    shares[0] += config.frames - sum(shares)
    await asyncio.gather(
        *(
            run_connection(
                url,
                frame_stream(target, config.seed * 1000 + c, n, config, deadline),
                config,
                report,
            )
            for c, n in enumerate(shares)
        )
    )
    report.elapsed_s = time.monotonic() - started
    report.healthz = healthz(http_url)
    report.open_connections = (before, wait_open_connections(http_url, before))
    if report.healthz != 200:
        report.violate("unhealthy", f"/healthz answered {report.healthz}")
    if report.open_connections[1] != before:
        report.violate("open connections", f"flasma_open_connections {report.open_connections}")
    if report.frames < config.frames:
        print(f"note: stopped at --max-seconds after {report.frames} of {config.frames} frames")
    return report


def run(config: Config) -> Report:
    """Fuzz `config.url`, or a server started in this process on a loopback port."""
    if config.url is not None:
        report = asyncio.run(fuzz(config.url, http_base(config.url), config))
    else:
        from flasma_ws.server import BackgroundServer

        with BackgroundServer(server_settings()) as server:
            report = asyncio.run(fuzz(server.url, server.http_url, config))
    if config.save is not None:
        save(report, config.save)
    return report


def server_settings() -> Settings:
    """The in-process server: small vectors, so that frames are cheap and many."""
    from flasma_ws.settings import Settings

    return Settings(dim=16, demo_size=2000, port=0, max_batch=64)


def http_base(ws_url: str) -> str:
    scheme, rest = ws_url.split("://", 1)
    return ("https" if scheme == "wss" else "http") + "://" + rest.split("/", 1)[0]


def save(report: Report, path: Path) -> None:
    """Violating frames as JSON lines, to replay them one by one."""
    with path.open("w") as out:
        for v in report.violations:
            record: dict[str, object] = {"kind": v.kind, "detail": v.detail}
            if v.frame is not None:
                payload = v.frame.payload
                record["mutators"] = list(v.frame.mutators)
                if isinstance(payload, bytes):
                    record["binary_base64"] = base64.b64encode(payload).decode()
                else:
                    record["text"] = payload
            out.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=64, help="unanswered frames per connection")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument(
        "--answer-timeout", type=float, default=15.0, help="seconds without an answer = lost"
    )
    parser.add_argument(
        "--url", help="fuzz this server (ws://HOST:PORT/ws) instead of one in-process"
    )
    parser.add_argument("--token", help="Bearer token for the WebSocket handshake")
    parser.add_argument("--only", help="comma-separated mutators to use (default: all)")
    parser.add_argument("--skip", help="comma-separated mutators to leave out")
    parser.add_argument("--save", type=Path, help="write violating frames here (JSON lines)")
    args = parser.parse_args(argv)
    config = Config(
        frames=args.frames,
        seed=args.seed,
        connections=args.connections,
        window=args.window,
        max_seconds=args.max_seconds,
        answer_timeout_s=args.answer_timeout,
        url=args.url,
        token=args.token,
        skip=frozenset(args.skip.split(",")) if args.skip else frozenset(),
        only=frozenset(args.only.split(",")) if args.only else None,
        save=args.save,
    )
    unknown = ((config.only or frozenset()) | config.skip) - ALL_MUTATORS
    if unknown:
        parser.error(f"unknown mutators {sorted(unknown)}; known: {sorted(ALL_MUTATORS)}")
    report = run(config)
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
