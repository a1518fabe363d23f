"""`flasma-ws serve`: parse flags (or FLASMA_* variables) into Settings, run the server."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import FlasmaError
from ..settings import Settings
from . import app, fail, quiet_tensorflow

STARTED = time.perf_counter()  # cold-start time is measured from CLI import


def _opt(help_text: str, name: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, envvar=f"FLASMA_{name}", show_default=True)


def build_settings(options: dict[str, Any]) -> Settings:
    """Settings from the command's options: names match Settings fields, but for two."""
    options = dict(options)
    options["drain_timeout_s"] = options.pop("drain_timeout")
    options["allowed_origins"] = _origins(options["allowed_origins"])
    return Settings(**options)


def _origins(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())


@app.command()
def serve(
    npy: Annotated[
        Path | None,
        _opt(
            "Target vectors: (N, dim) .npy, or Flasma's legacy 1-D file "
            "(needs --dim). Omit to serve a demo set.",
            "NPY",
        ),
    ] = None,
    dim: Annotated[
        int | None, _opt("Vector dimension: required for legacy files and the demo set.", "DIM")
    ] = None,
    demo_size: Annotated[int, _opt("Rows of the generated demo set.", "DEMO_SIZE")] = 10_000,
    demo_seed: Annotated[int, _opt("Seed of the generated demo set.", "DEMO_SEED")] = 0,
    drop_zero: Annotated[
        bool, _opt("Skip zero-norm rows (results keep file row numbers).", "DROP_ZERO")
    ] = False,
    host: Annotated[str, _opt("Address to listen on.", "HOST")] = "0.0.0.0",
    port: Annotated[
        int, _opt("Port for /ws, /cos, /healthz, /info and /metrics (0 = any free).", "PORT")
    ] = 8080,
    device: Annotated[
        str, _opt("TensorFlow device: auto (GPU if present), cpu, gpu:N.", "DEVICE")
    ] = "auto",
    dtype: Annotated[
        str, _opt("Stored matrix type: float32, float16 or bfloat16.", "DTYPE")
    ] = "float32",
    max_batch: Annotated[int, _opt("Most query rows per engine batch.", "MAX_BATCH")] = 128,
    top_k: Annotated[int, _opt("Results per query when the request gives no k.", "TOP_K")] = 10,
    max_k: Annotated[int, _opt("Largest k a request may ask for.", "MAX_K")] = 100,
    block_size: Annotated[
        int | None,
        _opt(
            "Columns per block of the two-stage top-k (default: chosen from N and --top-k).",
            "BLOCK_SIZE",
        ),
    ] = None,
    score_memory_mib: Annotated[
        int,
        _opt(
            "MiB of scores per slab of columns for a full batch: the engine's working memory. "
            "Less memory costs speed (128 saves ~400 MiB at 1M x 768 for ~17 % fewer q/s).",
            "SCORE_MEMORY_MIB",
        ),
    ] = 512,
    tf_interop_threads: Annotated[
        int,
        _opt(
            "TensorFlow inter-op threads (0 = TensorFlow's default); 1 leaves the other cores "
            "to the event loop.",
            "TF_INTEROP_THREADS",
        ),
    ] = 1,
    max_wait_ms: Annotated[
        float,
        _opt("Milliseconds an idle engine waits to fill a batch (0 = run at once).", "MAX_WAIT_MS"),
    ] = 0.0,
    queue_size: Annotated[
        int,
        _opt(
            "Query rows that may wait for the engine, all clients together; "
            "beyond it requests get 'overloaded'.",
            "QUEUE_SIZE",
        ),
    ] = 8192,
    timeout_ms: Annotated[
        int, _opt("Default deadline per request, in milliseconds.", "TIMEOUT_MS")
    ] = 10_000,
    max_inflight: Annotated[
        int, _opt("Unanswered queries per connection before we stop reading it.", "MAX_INFLIGHT")
    ] = 1024,
    max_frame_bytes: Annotated[
        int, _opt("Largest WebSocket message, in bytes.", "MAX_FRAME_BYTES")
    ] = 4 * 1024 * 1024,
    max_queries_per_frame: Annotated[
        int, _opt("Most queries in one multi-query frame.", "MAX_QUERIES_PER_FRAME")
    ] = 1024,
    max_body_bytes: Annotated[
        int, _opt("Largest POST /cos body, in bytes (413 beyond).", "MAX_BODY_BYTES")
    ] = 4 * 1024 * 1024,
    ws_compression: Annotated[
        bool,
        _opt("Accept permessage-deflate (costs CPU; vectors barely compress).", "WS_COMPRESSION"),
    ] = False,
    max_connections: Annotated[
        int | None,
        _opt(
            "Most open WebSocket connections; more are refused with 503 (default: no limit).",
            "MAX_CONNECTIONS",
        ),
    ] = None,
    token: Annotated[
        str | None, _opt("Require 'Authorization: Bearer TOKEN' on /ws, /cos and /info.", "TOKEN")
    ] = None,
    certfile: Annotated[
        Path | None, _opt("TLS certificate (PEM): serve wss:// and https://.", "CERTFILE")
    ] = None,
    keyfile: Annotated[
        Path | None, _opt("TLS private key (PEM) for --certfile.", "KEYFILE")
    ] = None,
    allowed_origins: Annotated[
        str | None,
        _opt(
            "Comma-separated browser Origins allowed on /ws and /cos (default: any).",
            "ALLOWED_ORIGINS",
        ),
    ] = None,
    drain_timeout: Annotated[
        float,
        _opt(
            "Seconds to answer queued requests on SIGTERM before closing anyway.", "DRAIN_TIMEOUT"
        ),
    ] = 30.0,
    log_level: Annotated[str, _opt("debug, info, warning or error.", "LOG_LEVEL")] = "info",
) -> None:
    """Serve exact cosine top-k over WebSocket (/ws) and HTTP (POST /cos) on one port."""
    options = dict(locals())  # every flag, so none can be forgotten on the way to Settings
    try:
        settings = build_settings(options)  # bad values refused before anything slow starts
        quiet_tensorflow(debug=settings.log_level.lower() == "debug")
        _configure_logging(settings.log_level)
        if npy is not None:
            from ..vectors import open_npy

            open_npy(npy, dim)  # shape errors now, before we listen
        from ..server import serve as run_server  # uvicorn loads only when serving

        run_server(settings, STARTED)  # TensorFlow loads in the background once listening
    except FlasmaError as exc:
        fail(exc)


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_level.lower() != "debug":  # one line per connection is too chatty for long-lived clients
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
