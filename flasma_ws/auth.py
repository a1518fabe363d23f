"""The token check, for headers and for browsers' WebSocket subprotocols. Pure: no sockets.

A browser cannot set an `Authorization` header on a WebSocket, only `Sec-WebSocket-Protocol`.
So `/ws` also takes the token as one offered subprotocol, `flasma.bearer.<base64url(token)>`
(no padding; base64url keeps any token within the header's token characters), offered beside
the plain name `flasma.bearer`. The server selects `flasma.bearer` and never echoes the token:
RFC 6455 lets it select only a name the client offered, and browsers fail a handshake whose
offered names were all ignored, so the plain name is the one to select.
"""

from __future__ import annotations

import base64
import hmac

BEARER_PROTOCOL = "flasma.bearer"
TOKEN_PREFIX = BEARER_PROTOCOL + "."


def token_protocol(token: str) -> str:
    """The subprotocol that carries `token`: flasma.bearer.<base64url of its UTF-8, unpadded>."""
    encoded = base64.urlsafe_b64encode(token.encode()).rstrip(b"=").decode("ascii")
    return TOKEN_PREFIX + encoded


def header_ok(authorization: bytes, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    # compare_digest: the time taken does not reveal how much of the token matched.
    return hmac.compare_digest(authorization, f"Bearer {token}".encode())


def subprotocol_ok(offered: list[str], token: str) -> bool:
    """Whether one of the offered subprotocols carries `token` (constant-time compare)."""
    expected = token_protocol(token).encode()
    carriers = [name for name in offered if name.startswith(TOKEN_PREFIX)]
    return any(hmac.compare_digest(name.encode(), expected) for name in carriers)


def selected_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol the server selects: the plain name when offered, else none."""
    return BEARER_PROTOCOL if BEARER_PROTOCOL in offered else None
