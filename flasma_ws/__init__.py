"""flasma-ws: exact cosine-similarity top-k over WebSocket and HTTP, batched on TensorFlow.

Importing the package does not import TensorFlow: the engine loads only when serving or
benchmarking, so clients stay light.
"""

from .client import Client, SyncClient, TopK, server_info
from .errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    EngineError,
    EngineOutOfMemory,
    FlasmaError,
    ProtocolError,
    ServerError,
    VectorFileError,
)
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Client",
    "ConfigError",
    "ConnectionLost",
    "EngineError",
    "EngineOutOfMemory",
    "FlasmaError",
    "ProtocolError",
    "ServerError",
    "Settings",
    "SyncClient",
    "TopK",
    "VectorFileError",
    "__version__",
    "server_info",
]
