"""The direct lane: small batches to a shard over one socket of its own, beside Ray's calls.

Why: a Ray actor call costs ~1 ms of round trip on a 2-vCPU VM before any search runs
(`ray.get` of a call that returns at once: 0.99 ms), which alone used half of the 2 ms
fan-out budget at batch 1. The same query and answer over a `multiprocessing.connection`
socket to the same actor took 0.23 ms for one shard and 0.31 ms for two (10,000 rows each),
against 1.30 and 1.71 ms through Ray (docs/scale-out.md). Ray still places, restarts and
probes the shards, and every batch that does not fit the lane goes through Ray as before.

What a lane may and may not do: it answers a batch exactly as the shard's Ray `search` does
(the same engine, under the same lock), or fails it with `LaneBroken` when the socket ends
(the shard's process died) or cannot be written; the front end then sends the whole batch
through Ray, whose retries wait for the restart. So a broken lane costs a retry, never a
wrong or a second answer. The listener takes only clients that know the shard's authkey
(HMAC challenge, `multiprocessing.connection`), a secret the front end made for its shards.

Frames (little-endian; `multiprocessing.connection` frames each message with its length):
- request: REQUEST (id, k, batch), then batch x dim float32 queries;
- answer: ANSWER (id, batch, width, seconds), then batch x width int64 rows and float32
  scores; width FAILED means the shard's engine raised, and a UTF-8 message follows.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import numpy as np

log = logging.getLogger("flasma_ws")

REQUEST = struct.Struct("<QII")  # request id, k, batch rows
ANSWER = struct.Struct("<QIId")  # request id, batch rows, width, the shard's search seconds
FAILED = 0xFFFFFFFF  # the width of an answer that carries an error message instead
CONNECT_TIMEOUT_S = 2.0
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, float]]


class LaneBroken(Exception):
    """The lane cannot answer this batch (the socket ended or failed): send it through Ray."""


@dataclass(frozen=True)
class LaneAnswer:
    rows: np.ndarray  # (B, width) int64 global rows
    scores: np.ndarray  # (B, width) float32
    seconds: float


# -- the codec (no I/O) ----------------------------------------------------------------------
def encode_request(request_id: int, queries: np.ndarray, k: int) -> bytes:
    queries = np.ascontiguousarray(queries, "<f4")
    return REQUEST.pack(request_id, k, queries.shape[0]) + queries.tobytes()


def decode_request(data: bytes, dim: int) -> tuple[int, np.ndarray, int]:
    request_id, k, batch = REQUEST.unpack_from(data)
    queries = np.frombuffer(data, "<f4", offset=REQUEST.size).reshape(batch, dim)
    return request_id, queries, k


def encode_answer(request_id: int, rows: np.ndarray, scores: np.ndarray, seconds: float) -> bytes:
    batch, width = rows.shape
    head = ANSWER.pack(request_id, batch, width, seconds)
    return head + np.ascontiguousarray(rows, "<i8").tobytes() + scores.astype("<f4").tobytes()


def encode_failure(request_id: int, message: str) -> bytes:
    return ANSWER.pack(request_id, 0, FAILED, 0.0) + message.encode("utf-8", "replace")


def decode_answer(data: bytes) -> tuple[int, LaneAnswer | str]:
    """(request id, the answer, or the shard's error message)."""
    request_id, batch, width, seconds = ANSWER.unpack_from(data)
    if width == FAILED:
        return request_id, data[ANSWER.size :].decode("utf-8", "replace")
    cells = batch * width
    rows = np.frombuffer(data, "<i8", cells, ANSWER.size).reshape(batch, width)
    scores = np.frombuffer(data, "<f4", cells, ANSWER.size + 8 * cells).reshape(batch, width)
    return request_id, LaneAnswer(rows, scores, seconds)


def _no_delay(conn: Connection) -> Connection:
    """Send each frame at once. `multiprocessing.connection` writes a long message's length
    and its bytes in two sends, and Nagle's algorithm then holds the second until the first
    is acknowledged, which the peer delays: batch 128 x 100 took +45 ms instead of +3."""
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as duplicate:
        duplicate.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


# -- the shard's side ------------------------------------------------------------------------
class LaneServer:
    """In the shard actor: accepts lanes and answers each request with `search`."""

    def __init__(self, host: str, authkey: bytes, dim: int, search: Search) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address: tuple[str, int] = self._listener.address  # type: ignore[assignment]
        self._dim, self._search = dim, search
        self._closed = False
        threading.Thread(target=self._accept, name="flasma-lane-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()  # with the authkey handshake
            except Exception:  # noqa: BLE001 - a client that left or had a wrong key: go on
                if not self._closed:
                    log.warning("Refused a lane client.", exc_info=True)
                continue
            threading.Thread(target=self._serve, args=(_no_delay(conn),), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with contextlib.closing(conn):
            while True:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                request_id, queries, k = decode_request(data, self._dim)
                try:
                    rows, scores, seconds = self._search(queries, k)
                    reply = encode_answer(request_id, rows, scores, seconds)
                except Exception as exc:  # noqa: BLE001 - the front end reports it
                    reply = encode_failure(request_id, f"{type(exc).__name__}: {exc}")
                try:
                    conn.send_bytes(reply)
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        self._listener.close()


# -- the front end's side --------------------------------------------------------------------
class Lane:
    """In the front end: one connection to one shard incarnation, requests multiplexed by id
    (several batches may be in flight), answered by a reader thread."""

    def __init__(self, address: tuple[str, int], authkey: bytes, incarnation: str) -> None:
        self.incarnation = incarnation
        self._conn = _no_delay(_client(address, authkey, CONNECT_TIMEOUT_S))
        self._send = threading.Lock()
        self._pending: dict[int, Future[LaneAnswer]] = {}
        self._next = 0
        self.broken = False
        threading.Thread(target=self._read, name="flasma-lane", daemon=True).start()

    def submit(self, queries: np.ndarray, k: int) -> Future[LaneAnswer]:
        done: Future[LaneAnswer] = Future()
        with self._send:
            if self.broken:
                raise LaneBroken("the lane is closed")
            self._next += 1
            request_id = self._next
            self._pending[request_id] = done
            try:
                self._conn.send_bytes(encode_request(request_id, queries, k))
            except OSError as exc:
                self._pending.pop(request_id, None)
                self._break()
                raise LaneBroken(str(exc)) from None
        return done

    def _read(self) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except Exception:  # noqa: BLE001 - EOF, reset, or closed under us: the lane ends
                with self._send:
                    self._break()
                return
            request_id, answer = decode_answer(data)
            done = self._pending.pop(request_id, None)
            if done is None:
                continue
            if isinstance(answer, str):
                done.set_exception(RuntimeError(answer))
            else:
                done.set_result(answer)

    def _break(self) -> None:
        """Fail every pending request (caller holds the send lock)."""
        self.broken = True
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done.set_exception(LaneBroken("the shard's lane ended"))
        with contextlib.suppress(OSError):
            self._conn.close()

    def close(self) -> None:
        with self._send:
            if not self.broken:
                self._break()


def _client(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
    """`Client(address, authkey)` within timeout_s, else TimeoutError. Client() has no timeout
    of its own: a port that drops packets, or a shard that never sends its challenge, would
    hold the caller (the loading or the monitor thread) for minutes. A connection that comes
    after the timeout is closed."""
    lock = threading.Lock()
    got: list[Connection] = []
    failed: list[BaseException] = []
    gave_up = threading.Event()

    def attempt() -> None:
        try:
            conn = Client(address, authkey=authkey)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            with lock:
                failed.append(exc)
            return
        with lock:
            if gave_up.is_set():
                conn.close()
            else:
                got.append(conn)

    thread = threading.Thread(target=attempt, name="flasma-lane-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    with lock:
        if got:
            return got[0]
        if failed:
            raise failed[0]
        gave_up.set()
    raise TimeoutError(f"no lane handshake within {timeout_s:g} s")


def connect(info: dict[str, Any], authkey: bytes) -> Lane | None:
    """A lane to the shard `info` (its `describe`) names, or None where it offers none or
    cannot be reached within CONNECT_TIMEOUT_S (a firewall between nodes, say): its calls
    then all go through Ray."""
    address = info.get("lane")
    if not address:
        return None
    host, port = str(address[0]), int(address[1])
    try:
        return Lane((host, port), authkey, info["incarnation"])
    except (OSError, EOFError, TimeoutError) as exc:
        log.warning(
            "No lane to shard %s at %s:%d (%s); its calls go through Ray.",
            info.get("shard"),
            host,
            port,
            exc,
        )
        return None
