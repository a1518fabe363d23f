"""Every stage a connection waits for its client is bounded in time (issue 18): a request body
(--body-timeout-s), a WebSocket's pong (--ws-ping-interval-s, --ws-ping-timeout-s); and a
client that pipelines requests holds a bounded number of them. Real loopback sockets against
one in-process server with short limits; answers checked against the float64 oracle."""

from __future__ import annotations

import asyncio
import socket
import time

import httptools
import httpx
import numpy as np
import orjson
import websockets
from reference import assert_exact, pairs_to_arrays
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from flasma_ws.admission import MAX_PIPELINED
from flasma_ws.metrics import read_samples
from flasma_ws.server import BackgroundServer
from flasma_ws.settings import Settings

DIM = 8
BODY_TIMEOUT_S = 1.0
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 0.5
SETTINGS = Settings(
    dim=DIM,
    demo_size=300,
    port=0,
    body_timeout_s=BODY_TIMEOUT_S,
    ws_ping_interval_s=PING_INTERVAL_S,
    ws_ping_timeout_s=PING_TIMEOUT_S,
)


def samples(running: BackgroundServer) -> dict[str, float]:
    return read_samples(running.service.metrics.render().decode())


def timed_out(running: BackgroundServer, stage: str) -> float:
    return samples(running).get(f'flasma_connections_timed_out_total{{stage="{stage}"}}', 0.0)


def connect(running: BackgroundServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", running.server.port), timeout=10)


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def cos_request(vector: np.ndarray, k: int = 5) -> bytes:
    body = orjson.dumps({"embedding": vector.tolist(), "k": k})
    head = f"POST /cos HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Answers:
    """HTTP responses parsed off one socket: (status, headers, body) each."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""

    def read(self, sock: socket.socket, count: int | None = None) -> Answers:
        """Until `count` answers came, or the server closed (uvicorn closes on a half-close,
        so the client never half-closes)."""
        while count is None or len(self.done) < count:
            data = sock.recv(65536)
            if not data:
                break
            self.parser.feed_data(data)
        return self


# -- the body ------------------------------------------------------------------------------
def test_a_body_that_stops_coming_gets_408_within_the_timeout_plus_one_second(server):
    before = timed_out(server, "body")
    with connect(server) as sock:
        sock.sendall(b"POST /cos HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n{")
        started = time.monotonic()
        (status, headers, body), *rest = Answers().read(sock).done
        took = time.monotonic() - started
    assert (status, rest) == (408, [])
    assert headers[b"connection"] == b"close"
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_timeout" and "--body-timeout-s" in error["message"]
    assert BODY_TIMEOUT_S - 0.1 <= took <= BODY_TIMEOUT_S + 1, took
    assert timed_out(server, "body") == before + 1
    assert not server.server.guard.slots or all(
        slot.state.value != "handshaking" for slot in server.server.guard.slots.values()
    )


def test_a_body_sent_in_pieces_within_the_timeout_is_answered(server, matrix):
    vector = np.random.default_rng(3).standard_normal(DIM)
    request = cos_request(vector)
    head_end = request.index(b"\r\n\r\n") + 4
    with connect(server) as sock:
        sock.sendall(request[:head_end])
        for start in range(head_end, len(request), 40):  # about 0.3 s in all, under 1 s
            time.sleep(0.1)
            sock.sendall(request[start : start + 40])
        answers = Answers().read(sock, 1).done
    assert [status for status, _, _ in answers] == [200]
    rows, scores = pairs_to_arrays(orjson.loads(answers[0][2])["result"])
    assert_exact(matrix, vector[None], rows, scores, 5)


# -- pipelining ----------------------------------------------------------------------------
def test_pipelined_queries_are_all_answered_in_order(server, matrix):
    queries = np.random.default_rng(4).standard_normal((30, DIM))
    with connect(server) as sock:
        sock.sendall(b"".join(cos_request(q) for q in queries))  # one write: one read
        answers = Answers().read(sock, len(queries)).done
    assert [status for status, _, _ in answers] == [200] * len(queries)
    for query, (_, _, body) in zip(queries, answers, strict=True):
        rows, scores = pairs_to_arrays(orjson.loads(body)["result"])
        assert_exact(matrix, query[None], rows, scores, 5)


def test_a_client_pipelining_past_the_cap_is_answered_up_to_it_then_closed(server):
    reason = 'flasma_connections_refused_total{reason="max_pipelined"}'
    before = samples(server).get(reason, 0.0)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(request * (3 * MAX_PIPELINED))  # one write, never half-closed
        answers = Answers().read(sock).done  # the server closes after the last answer
    assert len(answers) == MAX_PIPELINED + 1  # the one answered first, and the queued
    assert all(status == 200 for status, _, _ in answers)
    assert answers[-1][1][b"connection"] == b"close"
    assert samples(server)[reason] == before + 1
    assert httpx.get(server.http_url + "/healthz").status_code == 200


# -- WebSocket pings -----------------------------------------------------------------------
def test_a_websocket_that_does_not_answer_pings_is_closed(server):
    before = timed_out(server, "ping")
    client = ClientProtocol(parse_uri(server.url))
    with connect(server) as sock:
        client.send_request(client.connect())
        sock.sendall(b"".join(client.data_to_send()))
        while not any(isinstance(event, Response) for event in client.events_received()):
            client.receive_data(sock.recv(65536))
        started = time.monotonic()
        rest = read_to_eof(sock)  # the pong the protocol would send is never sent
        took = time.monotonic() - started
    client.receive_data(rest)
    frames = [event for event in client.events_received() if isinstance(event, Frame)]
    assert [frame.opcode for frame in frames] == [Opcode.PING, Opcode.CLOSE]
    assert Close.parse(frames[-1].data).code == 1011
    assert took <= PING_INTERVAL_S + PING_TIMEOUT_S + 1, took
    assert timed_out(server, "ping") == before + 1


async def test_a_websocket_that_answers_pings_stays_open(server, matrix):
    vector = np.random.default_rng(5).standard_normal(DIM)
    async with websockets.connect(server.url, ping_interval=None) as ws:  # pongs, never pings
        await asyncio.sleep(4 * (PING_INTERVAL_S + PING_TIMEOUT_S))
        await ws.send(orjson.dumps({"id": 1, "embedding": vector.tolist(), "k": 5}).decode())
        answer = orjson.loads(await ws.recv())
    rows, scores = pairs_to_arrays(answer["result"])
    assert_exact(matrix, vector[None], rows, scores, 5)


# -- what is in force ----------------------------------------------------------------------
def test_info_shows_the_limits_in_force(server):
    limits = httpx.get(server.http_url + "/info").json()["connections"]
    guard = server.server.guard.limits
    assert limits["max_connections"] == guard.max_connections >= 1
    assert limits["max_connections_per_ip"] == SETTINGS.max_connections_per_ip
    assert limits["handshake_timeout_s"] == SETTINGS.handshake_timeout_s
    assert limits["body_timeout_s"] == BODY_TIMEOUT_S
    assert limits["ws_ping_interval_s"] == PING_INTERVAL_S
    assert limits["ws_ping_timeout_s"] == PING_TIMEOUT_S
    assert limits["max_pipelined"] == MAX_PIPELINED
    assert limits["open_file_limit"] >= 1
