"""The queries of a run and their frames, encoded once before it starts: each send only
prepends the request id."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..protocol import EncodedRequest, encode_cos_request, encode_request
from .config import LoadConfig

MIN_POOL = 1024  # distinct random queries cycled through during a run


@dataclass(frozen=True)
class Workload:
    """The query pool (rows × dim) and its frames: frame j holds rows [j*multi, (j+1)*multi)."""

    queries: np.ndarray
    frames: list[EncodedRequest] | list[bytes]  # bytes: POST /cos bodies
    multi: int
    verify_frames: int  # frames 0..verify_frames-1 hold the rows to verify


def load_queries(path: Path, dim: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--queries {path} is not a readable .npy file: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim:
        shape = getattr(array, "shape", "?")
        raise ConfigError(f"--queries {path} has shape {shape}; the server needs (Q, {dim}).")
    if array.shape[0] == 0:
        raise ConfigError(f"--queries {path} holds no rows.")
    return np.ascontiguousarray(array, dtype=np.float32)


def build_workload(config: LoadConfig, dim: int) -> Workload:
    queries = _full_frames(_pool(config, dim), config.multi)
    verify_rows = min(config.verify, len(queries))
    frames = _encode(config, queries)
    return Workload(queries, frames, config.multi, math.ceil(verify_rows / config.multi))


def _pool(config: LoadConfig, dim: int) -> np.ndarray:
    """--queries, or random Gaussian queries (enough to verify and to fill 8 frames)."""
    if config.queries is not None:
        return load_queries(config.queries, dim)
    rows = max(MIN_POOL, config.verify, 8 * config.multi)
    return np.random.default_rng(config.seed).standard_normal((rows, dim), dtype=np.float32)


def _full_frames(queries: np.ndarray, multi: int) -> np.ndarray:
    """The pool wrapped around so that every frame of `multi` rows is full."""
    padded = math.ceil(len(queries) / multi) * multi
    return queries if padded == len(queries) else queries[np.arange(padded) % len(queries)]


def _encode(config: LoadConfig, queries: np.ndarray) -> list[EncodedRequest] | list[bytes]:
    multi = config.multi
    if config.http:
        return [encode_cos_request(q, config.k) for q in queries]
    if multi == 1:
        return [encode_request(q, config.k, binary=config.binary) for q in queries]
    return [
        encode_request(queries[i : i + multi], config.k, multi=True, binary=config.binary)
        for i in range(0, len(queries), multi)
    ]
