"""The package's exceptions. Every message tells the user what to do next.

FlasmaError
├── ConfigError          bad settings or flags
├── VectorFileError      a target-vector file that cannot be used
├── KeyFileError         a --keys file that cannot be used
├── StorageError         the data directory (WAL, snapshots) cannot be read or written
├── EngineError          TensorFlow failed while loading or searching
│   ├── EngineOutOfMemory
│   └── ShardsUnavailable  a shard did not answer in time (carries the wire `code`)
├── LoadCancelled        loading stopped because the server is shutting down
├── Overloaded           the batcher's queue is full (answered `overloaded` at once)
├── ProtocolError        a request that cannot be answered (carries a wire `code`)
├── ServerError          raised by the client when the server answers with an error
└── ConnectionLost       the client's connection dropped (also a builtin ConnectionError)
    └── AuthError        the server refused the token or the Origin
"""

from __future__ import annotations


class FlasmaError(Exception):
    """Base of every error raised on purpose by flasma-ws."""


class ConfigError(FlasmaError):
    """A setting is invalid or settings contradict each other."""


class VectorFileError(FlasmaError):
    """A vector file is missing, malformed, or holds values we cannot use."""


class KeyFileError(FlasmaError):
    """A --keys file is missing, malformed, or its keys break a rule (count, range, duplicates)."""


class StorageError(FlasmaError):
    """The data directory is corrupt, belongs to another collection, or a write/fsync failed."""


class EngineError(FlasmaError):
    """The TensorFlow engine failed; TensorFlow's own errors are translated into this."""


class EngineOutOfMemory(EngineError):
    """The device ran out of memory for a batch or for the matrix."""


class ShardsUnavailable(EngineError):
    """A shard of a sharded engine did not answer: its whole batch fails with `code`
    (`unavailable`, or `timeout` once the batch's deadline passed), never a partial answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LoadCancelled(FlasmaError):
    """Loading stopped because the server is shutting down."""


class Overloaded(FlasmaError):
    """The batcher's queue cannot take a request's rows; the caller answers `overloaded`."""


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


class ConnectionLost(FlasmaError, ConnectionError):
    """The server could not be reached, or the connection dropped with requests in flight.

    Also a builtin ConnectionError, so `except ConnectionError` catches it too.
    """


class AuthError(ConnectionLost):
    """The server refused the token (401) or the browser Origin (403); retrying will not help.

    A ConnectionLost too, so code written before it existed still catches it.
    """
