"""The one settings tree: built once by the CLI (or a test), passed down whole; each component
takes its section. The fields are the one set of defaults: `flasma-ws serve`'s options and
FLASMA_* variables are derived from them (name, type, default, help with units).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
TF32_NEEDS_FLOAT32 = (
    "--tf32 applies to --dtype float32 only (TensorFloat-32 is how GPUs run float32 "
    "matmuls); drop --tf32, or use --dtype float32."
)
KEY_TYPES: tuple[str, ...] = ("int", "str")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
MAX_PORT = 65_535
# What --device may say; whether that GPU exists is known only once TensorFlow has loaded.
DEVICE_PATTERN = re.compile(r"auto|(?i:(/device:|/)?(cpu(:0)?|gpu(:\d+)?))")


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    cli_type: Any = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A leaf field and how the CLI shows it: `flag` when the option is not the field's name,
    `cli_type`/`parse` when the command line gives another type (a comma-separated list)."""
    metadata = {"help": help, "flag": flag, "cli_type": cli_type, "parse": parse}
    return field(default=default, metadata=metadata)


def parse_origins(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())


@dataclass(frozen=True)
class TargetSettings:
    npy: Path | None = setting(
        None,
        "Target vectors: (N, dim) .npy, or Flasma's legacy 1-D file (needs --dim). "
        "Omit to serve a demo set.",
    )
    dim: int | None = setting(None, "Vector dimension: required for legacy files and the demo set.")
    demo_size: int = setting(10_000, "Rows of the generated demo set.")
    demo_seed: int = setting(0, "Seed of the generated demo set.")
    drop_zero: bool = setting(False, "Skip zero-norm rows (results keep file row numbers).")


@dataclass(frozen=True)
class CollectionSettings:
    """A live collection (docs/protocol.md, Writes): keys, writes, durability."""

    data_dir: Path | None = setting(
        None,
        "Directory of a live, durable collection: the first start imports --npy (or the demo "
        "set) into it; later starts need only --data-dir. Without it the server is read-only.",
    )
    keys: Path | None = setting(
        None,
        "Keys of the --npy rows: an int64 .npy (--key-type int) or a text file of one key a "
        "line (--key-type str). Default: the row numbers 0..N-1.",
    )
    key_type: str = setting("int", "int (0..2^63-1) or str (1..256 UTF-8 bytes).")
    max_rows: int | None = setting(
        None,
        "Most live rows; upserts of new keys beyond it get 'full' (default: what a third of "
        "this machine's memory holds at this dimension, leaving room for compaction's copy).",
    )
    compact_fraction: float = setting(
        0.05,
        "Compact (rebuild the base from the live rows, in the background) once the appended "
        "or the deleted rows reach this share of the base...",
    )
    compact_min_rows: int = setting(
        4_096,
        "... and at least this many rows were appended or deleted. Searching appended rows "
        "costs ~4x more per row than the base, so compaction comes early.",
    )


@dataclass(frozen=True)
class ServerSettings:
    host: str = setting("0.0.0.0", "Address to listen on.")
    port: int = setting(8080, "Port for /ws, /cos, /healthz, /info and /metrics (0 = any free).")
    ws_compression: bool = setting(
        False, "Accept permessage-deflate (costs CPU; vectors barely compress)."
    )
    drain_timeout_s: float = setting(
        30.0,
        "Seconds to answer queued requests on SIGTERM before closing anyway.",
        flag="drain_timeout",
    )
    log_level: str = setting("info", "debug, info, warning or error.")


@dataclass(frozen=True)
class EngineSettings:
    """The engine's part (flasma_ws.engine.EngineConfig is this class)."""

    device: str = setting("auto", "TensorFlow device: auto (GPU if present), cpu, gpu:N.")
    dtype: str = setting(
        "float32",
        "Stored matrix type: float32, float16 or bfloat16. The narrow types still answer "
        "exactly (certified candidates rescored in float32) unless --approximate.",
    )
    approximate: bool = setting(
        False,
        "With --dtype bfloat16 or float16: return the narrow scores as they are, without the "
        "certified float32 rescore (faster, recall below 1, no float32 copy in memory).",
    )
    tf32: bool = setting(
        False,
        "On an NVIDIA GPU (Ampere or newer), run float32 matmuls on TensorFloat-32 tensor "
        "cores: answers stay exact (certified candidates rescored in float32) unless "
        "--approximate. Gains nothing on a CPU.",
    )
    max_batch: int = setting(128, "Most query rows per engine batch.")
    top_k: int = setting(10, "Results per query when the request gives no k.")
    max_k: int = setting(100, "Largest k a request may ask for.")
    block_size: int | None = setting(
        None, "Columns per block of the two-stage top-k (default: chosen from N and --top-k)."
    )
    # None: the engine's SLAB_SCORE_BYTES (512 MiB), where its measured reason is written.
    score_memory_mib: int | None = setting(
        None,
        "MiB of scores per slab of columns for a full batch (default: 512): the engine's "
        "working memory. "
        "Less memory costs speed (128 saves ~400 MiB at 1M x 768 for ~17 % fewer q/s).",
    )
    tf_interop_threads: int = setting(
        1,
        "TensorFlow inter-op threads (0 = TensorFlow's default); 1 leaves the other cores "
        "to the event loop.",
    )


@dataclass(frozen=True)
class BatcherSettings:
    max_wait_ms: float = setting(
        0.0, "Milliseconds an idle engine waits to fill a batch (0 = run at once)."
    )
    queue_size: int = setting(
        8192,
        "Query rows that may wait for the engine, all clients together; "
        "beyond it requests get 'overloaded'.",
    )
    timeout_ms: int = setting(10_000, "Default deadline per request, in milliseconds.")


@dataclass(frozen=True)
class LimitSettings:
    max_inflight: int = setting(
        1024, "Unanswered queries per connection before we stop reading it."
    )
    max_frame_bytes: int = setting(4 * 1024 * 1024, "Largest WebSocket message, in bytes.")
    max_queries_per_frame: int = setting(1024, "Most queries in one multi-query frame.")
    max_body_bytes: int = setting(4 * 1024 * 1024, "Largest POST /cos body, in bytes (413 beyond).")
    max_connections: int | None = setting(
        None,
        "Most open TCP connections, handshaking, HTTP or WebSocket; beyond it (and 4 slots kept "
        "for /healthz and /metrics) new ones get 503 and are closed (default: 80 % of the "
        "open-file limit, which start-up raises to its hard limit, less those 4).",
    )
    max_connections_per_ip: int = setting(
        256,
        "Most open TCP connections from one client address (raise it behind a proxy or NAT, "
        "where many clients share one address).",
    )
    handshake_timeout_s: float = setting(
        10.0,
        "Seconds a connection has to send a complete HTTP request head (for /ws: the "
        "WebSocket handshake request); closed after.",
    )
    body_timeout_s: float = setting(
        30.0,
        "Seconds a request body (POST /cos) has to arrive once its head has; 408 after.",
    )
    ws_ping_interval_s: float = setting(
        20.0, "Seconds between pings to each WebSocket (0 = never ping)."
    )
    ws_ping_timeout_s: float = setting(
        20.0, "Seconds a WebSocket has to answer a ping; closed (1011) after."
    )


@dataclass(frozen=True)
class SecuritySettings:
    token: str | None = setting(
        None, "Require 'Authorization: Bearer TOKEN' on /ws, /cos and /info."
    )
    certfile: Path | None = setting(None, "TLS certificate (PEM): serve wss:// and https://.")
    keyfile: Path | None = setting(None, "TLS private key (PEM) for --certfile.")
    allowed_origins: tuple[str, ...] | None = setting(
        None,
        "Comma-separated browser Origins allowed on /ws and /cos (default: any).",
        cli_type=str | None,
        parse=parse_origins,
    )


@dataclass(frozen=True)
class ShardSettings:
    """Sharding over Ray actors (flasma_ws/shards.py, docs/scale-out.md)."""

    shards: int = setting(
        0,
        "Split the matrix over this many Ray actors, each loading its own rows "
        "(needs flasma-ws[ray]); 0 = one engine in this process.",
    )
    ray_address: str | None = setting(
        None,
        "With --shards: 'auto' (the running Ray cluster) or a cluster address "
        "(default: start a local Ray on 127.0.0.1 and stop it on exit).",
    )
    shard_cpus: float = setting(1.0, "CPUs Ray reserves per shard actor (fractions allowed).")
    shard_gpus: float | None = setting(
        None, "GPUs per shard actor (default: 1 where the Ray cluster has GPUs, else 0)."
    )
    shard_restarts: int = setting(
        -1, "Times Ray restarts a dead shard actor, which reloads its rows (-1 = no limit)."
    )
    shard_inflight: int = setting(
        2, "Batches in flight across the shards at once, so that shards and front end overlap."
    )
    ray_cpus: int | None = setting(
        None, "CPUs of the local Ray (default: this machine's, at least one per shard)."
    )
    ray_object_store_mib: int | None = setting(
        None, "Object store MiB of the local Ray (default: Ray's, 30 % of memory)."
    )


SECTIONS: dict[str, type] = {
    "targets": TargetSettings,
    "collection": CollectionSettings,
    "server": ServerSettings,
    "engine": EngineSettings,
    "batcher": BatcherSettings,
    "limits": LimitSettings,
    "security": SecuritySettings,
    "sharding": ShardSettings,
}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Leaf:
    """One leaf field as the CLI sees it."""

    name: str  # the field
    flag: str  # the option's name with underscores: --drain-timeout is drain_timeout
    type: Any  # the type the command line gives
    default: Any
    help: str
    parse: Callable[[Any], Any] | None


def leaves() -> Iterator[Leaf]:
    """Every leaf field, section after section, as the CLI shows them."""
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            kind = meta["cli_type"] or hints[f.name]
            flag = meta["flag"] or f.name
            yield Leaf(f.name, flag, kind, f.default, meta["help"], meta["parse"])


@dataclass(frozen=True, init=False)
class Settings:
    """The sections, each a frozen dataclass. Leaves can be given and read by their own name
    as shorthand: `Settings(dim=8, port=0).port` is `settings.server.port`."""

    targets: TargetSettings
    collection: CollectionSettings
    server: ServerSettings
    engine: EngineSettings
    batcher: BatcherSettings
    limits: LimitSettings
    security: SecuritySettings
    sharding: ShardSettings

    def __init__(self, **values: Any) -> None:
        sections = {name: values.pop(name, None) or cls() for name, cls in SECTIONS.items()}
        changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            if name not in SECTION_OF:
                raise TypeError(f"Settings has no field {name!r}.")
            changes[SECTION_OF[name]][name] = value
        for name, section in sections.items():
            object.__setattr__(self, name, dataclasses.replace(section, **changes[name]))
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A leaf by its own name (only called when normal lookup fails)."""
        section = SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"Settings has no field {name!r}")
        return getattr(object.__getattribute__(self, section), name)

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
            "max_connections_per_ip": self.max_connections_per_ip,
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
        if self.tf32 and self.dtype != "float32":
            raise ConfigError(TF32_NEEDS_FLOAT32)
        if self.tf32 and self.data_dir is not None:
            # TF32 is process-wide; the appendable segment's float32 scores are not certified.
            raise ConfigError(
                "--tf32 cannot be combined with --data-dir yet: a live collection's newly "
                "written rows are scored in plain float32 and TF32 would make them inexact. "
                "Drop --tf32 (or serve a fixed --npy file with it)."
            )
        if self.score_memory_mib is not None and self.score_memory_mib < 1:
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
        for flag, seconds in (
            ("--handshake-timeout-s", self.handshake_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
            ("--ws-ping-timeout-s", self.ws_ping_timeout_s),
        ):
            if not seconds > 0:
                raise ConfigError(f"{flag} must be more than 0, got {seconds:g}.")
        if not self.ws_ping_interval_s >= 0:
            raise ConfigError(
                f"--ws-ping-interval-s must not be negative (0 = never ping), "
                f"got {self.ws_ping_interval_s:g}."
            )
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
        self._validate_collection()
        if self.npy is None and self.dim is None and self.data_dir is None:
            raise ConfigError("Give --npy FILE, or --dim D to serve a generated demo set.")
        self._validate_shards()

    def _validate_shards(self) -> None:
        if self.shards < 0:
            raise ConfigError(f"--shards must be 0 (no sharding) or more, got {self.shards}.")
        if self.shard_inflight < 1:
            raise ConfigError(f"--shard-inflight must be at least 1, got {self.shard_inflight}.")
        if self.shard_cpus < 0 or (self.shard_gpus is not None and self.shard_gpus < 0):
            raise ConfigError("--shard-cpus and --shard-gpus must not be negative.")
        if self.shard_restarts < -1:
            raise ConfigError(
                f"--shard-restarts must be -1 (no limit) or more, got {self.shard_restarts}."
            )
        if not self.shards:
            if self.ray_address is not None:
                raise ConfigError("--ray-address needs --shards N (N of at least 1).")
            return
        # Live collections (--data-dir) write to one engine; writes are not routed to shards.
        if self.data_dir is not None:
            raise ConfigError(
                "--data-dir (live collections) cannot be combined with --shards yet: writes "
                "are not shard-aware. Serve a fixed --npy file with --shards, or drop --shards."
            )
        if self.keys is not None or self.key_type != "int":
            raise ConfigError(
                "--keys and --key-type str cannot be combined with --shards yet: shards answer "
                "the file's row numbers. Drop --keys/--key-type, or drop --shards."
            )

    def _validate_collection(self) -> None:
        if self.key_type not in KEY_TYPES:
            raise ConfigError(f"--key-type must be int or str, got {self.key_type!r}.")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"--max-rows must be at least 1, got {self.max_rows}.")
        if not self.compact_fraction > 0:
            raise ConfigError(
                f"--compact-fraction must be more than 0, got {self.compact_fraction:g}."
            )
        if self.compact_min_rows < 1:
            raise ConfigError(
                f"--compact-min-rows must be at least 1, got {self.compact_min_rows}."
            )
        if self.keys is not None and self.npy is None:
            raise ConfigError("--keys names the keys of --npy's rows; give --npy too.")
        if self.key_type == "str" and self.keys is None and self.npy is not None:
            raise ConfigError("--key-type str needs --keys FILE: string keys for the --npy rows.")

    def replace(self, **changes: Any) -> Settings:
        """A copy with leaves (by name) or whole sections changed."""
        return Settings(**{**{name: getattr(self, name) for name in SECTIONS}, **changes})
