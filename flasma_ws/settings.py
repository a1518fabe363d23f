"""The one settings object: built once by the CLI (or a test), passed down to every layer."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError

Dtype = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
MAX_PORT = 65_535
# What --device may say; whether that GPU exists is known only once TensorFlow has loaded.
DEVICE_PATTERN = re.compile(r"auto|(?i:(/device:|/)?(cpu(:0)?|gpu(:\d+)?))")


@dataclass(frozen=True)
class Settings:
    # Target vectors
    npy: Path | None = None
    dim: int | None = None
    demo_size: int = 10_000
    demo_seed: int = 0
    drop_zero: bool = False
    # Engine
    device: str = "auto"
    dtype: Dtype = "float32"
    max_batch: int = 128
    top_k: int = 10
    max_k: int = 100
    block_size: int | None = None  # columns per top-k block; None = chosen from N and top_k
    score_memory_mib: int = 512  # engine working memory: scores of one slab of columns
    tf_interop_threads: int = 1  # TensorFlow inter-op threads; 0 = TensorFlow's default
    # Batcher
    max_wait_ms: float = 0.0
    queue_size: int = 8192  # queries waiting for the engine, all connections together
    timeout_ms: int = 10_000
    # Server
    host: str = "0.0.0.0"
    port: int = 8080
    max_inflight: int = 1024  # per connection: queries sent and not yet answered
    max_frame_bytes: int = 4 * 1024 * 1024
    max_queries_per_frame: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    ws_compression: bool = False
    max_connections: int | None = None  # open WebSocket connections; None = no limit
    token: str | None = None  # Bearer token for /ws, /cos and /info; None = open
    certfile: Path | None = None  # TLS: serve wss:// and https://
    keyfile: Path | None = None
    allowed_origins: tuple[str, ...] | None = None  # browser Origins allowed; None = any
    drain_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = {
            "demo_size": self.demo_size,
            "max_batch": self.max_batch,
            "top_k": self.top_k,
            "max_k": self.max_k,
            "queue_size": self.queue_size,
            "timeout_ms": self.timeout_ms,
            "max_inflight": self.max_inflight,
            "max_frame_bytes": self.max_frame_bytes,
            "max_queries_per_frame": self.max_queries_per_frame,
            "max_body_bytes": self.max_body_bytes,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"--dim must be at least 1, got {self.dim}.")
        if self.top_k > self.max_k:
            raise ConfigError(f"--top-k ({self.top_k}) must not exceed --max-k ({self.max_k}).")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.score_memory_mib < 1:
            raise ConfigError(
                f"--score-memory-mib must be at least 1, got {self.score_memory_mib}."
            )
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"--block-size must be at least 1, got {self.block_size}.")
        for flag, seconds in (
            ("--max-wait-ms", self.max_wait_ms),
            ("--drain-timeout", self.drain_timeout_s),
        ):
            if seconds < 0:
                raise ConfigError(f"{flag} must not be negative, got {seconds:g}.")
        if not 0 <= self.port <= MAX_PORT:
            raise ConfigError(
                f"--port must be from 0 to {MAX_PORT} (0 = any free port), got {self.port}."
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}."
            )
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"--device must be auto, cpu or gpu:N (gpu = gpu:0), got {self.device!r}."
            )
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}.")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("Give both --certfile and --keyfile to serve TLS, or neither.")
        for tls_file in (self.certfile, self.keyfile):
            if tls_file is not None and not Path(tls_file).is_file():
                raise ConfigError(f"TLS file {tls_file} does not exist; check the path.")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token must not be empty; omit it to serve without auth.")
        if self.npy is None and self.dim is None:
            raise ConfigError("Give --npy FILE, or --dim D to serve a generated demo set.")

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
