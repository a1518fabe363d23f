"""The package's exceptions. Every message tells the user what to do next.

FlasmaError
├── ConfigError          bad settings or flags
├── VectorFileError      a target-vector file that cannot be used
├── EngineError          TensorFlow failed while loading or searching
│   └── EngineOutOfMemory
├── ProtocolError        a request that cannot be answered (carries a wire `code`)
└── ServerError          raised by the client when the server answers with an error

The client adds ConnectionLost (a FlasmaError and a builtin ConnectionError) and, under it,
AuthError: the server refused the token or the Origin (flasma_ws/client.py).
"""

from __future__ import annotations


class FlasmaError(Exception):
    """Base of every error raised on purpose by flasma-ws."""


class ConfigError(FlasmaError):
    """A setting is invalid or settings contradict each other."""


class VectorFileError(FlasmaError):
    """A vector file is missing, malformed, or holds values we cannot use."""


class EngineError(FlasmaError):
    """The TensorFlow engine failed; TensorFlow's own errors are translated into this."""


class EngineOutOfMemory(EngineError):
    """The device ran out of memory for a batch or for the matrix."""


class ProtocolError(FlasmaError):
    """A request is invalid. `code` is the wire error code; `request_id` the id if it was read."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class ServerError(FlasmaError):
    """The server answered a request with an error (client side)."""

    def __init__(self, code: str, message: str, request_id: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
