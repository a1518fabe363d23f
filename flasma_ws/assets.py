"""The dashboard's static files, shipped inside the package (flasma_ws/dashboard/), read once.

`GET /` is dashboard/index.html and `GET /dashboard/<path>` the rest. Nothing is built at
install and nothing comes from a CDN: the page loads only what this server serves.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

FOLDER = "dashboard"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
# The page runs only its own scripts and talks only to this server: a script injected into
# it (by a crafted row of data, say) could not load or send anything elsewhere.
HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


@functools.cache
def assets() -> dict[str, tuple[bytes, bytes]]:
    """{relative path: (content type, body)} of every servable file in the folder."""
    found: dict[str, tuple[bytes, bytes]] = {}
    _walk(resources.files("flasma_ws") / FOLDER, "", found)
    return found


def _walk(folder: Traversable, prefix: str, found: dict[str, tuple[bytes, bytes]]) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            _walk(entry, f"{prefix}{entry.name}/", found)
            continue
        kind = CONTENT_TYPES.get("." + entry.name.rpartition(".")[2])
        if kind is not None:  # licences and notes ship, but are not served
            found[prefix + entry.name] = (kind, entry.read_bytes())


def asset(path: str) -> tuple[bytes, bytes] | None:
    """(content type, body) for a request path ('/' or '/dashboard/...'), or None."""
    name = INDEX if path == "/" else path.removeprefix(f"/{FOLDER}/")
    return assets().get(name)
