"""flasma-ws: exact cosine-similarity top-k over WebSocket and HTTP, batched on TensorFlow.

Importing the package does not import TensorFlow: the engine loads only when serving or
benchmarking, so clients stay light.
"""

import os

# OpenBLAS's idle worker threads spin for ~2^28 cycles after every call before they sleep.
# The engine sends one-row batches through numpy's BLAS (blas_search.py): at a trickle of
# such queries the spinner took most of a core, time that every other thread and process
# (the event loop, the clients) then lacked (docs/reliability.md, hostile clients). 2^4
# cycles keeps both threads' memory bandwidth at a ~0.1 ms wake-up. Set before numpy loads
# OpenBLAS, which reads it once; a value already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

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
