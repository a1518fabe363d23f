"""Start-up of the keyed engine: a read-only one over --npy (or the demo set), or a durable
live collection in --data-dir (imported on its first start, recovered on later ones).

Runs in the loading thread, before the batcher exists: recovery applies the log directly.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .collection import Collection
from .engine import Engine
from .errors import ConfigError
from .keys import load_keys_file
from .live_engine import LiveEngine, key_array
from .settings import Settings
from .snapshot import create_collection, latest_snapshot, read_collection, write_snapshot
from .text import counted
from .vectors import Targets, open_npy, open_targets
from .wal import WriteAheadLog

log = logging.getLogger("flasma_ws")

Progress = Callable[[int], None]


def row_keys(settings: Settings, targets: Targets) -> np.ndarray:
    """--keys, else the file's row numbers (as strings on a str-key demo set)."""
    s = settings
    if s.keys is not None:
        return key_array(load_keys_file(s.keys, targets.n, s.key_type), s.key_type)  # type: ignore[arg-type]
    rows = targets.original_index(np.arange(targets.n, dtype=np.int64))
    return key_array([str(r) for r in rows.tolist()] if s.key_type == "str" else rows, s.key_type)


def read_only_engine(settings: Settings, targets: Targets, progress: Progress) -> LiveEngine:
    base = Engine(targets, settings.engine, progress=progress)
    return LiveEngine(base, row_keys(settings, targets), settings.key_type, settings.engine)


def default_max_rows(dim: int) -> int:
    """A third of physical memory at float32: the base, compaction's new base, and room."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = 8 << 30
    return max(int(memory // 3 // (4 * dim)), 1)


def open_collection(settings: Settings, progress: Progress) -> tuple[LiveEngine, Collection]:
    """Import on the first start, then load the newest snapshot and replay the log."""
    s = settings
    assert s.data_dir is not None
    directory = Path(s.data_dir)
    existing = read_collection(directory)
    if existing is not None and latest_snapshot(directory) is None:
        existing = None  # the first import did not finish: do it again
    imported = existing is None
    if existing is None:
        _import(s, directory, progress)
    else:
        _check_conflicts(s, directory, *existing)
    snapshot = latest_snapshot(directory)
    assert snapshot is not None
    key_type = snapshot.key_type
    began = time.perf_counter()
    targets = Targets(open_npy(snapshot.vectors_path, snapshot.dim))
    base = Engine(targets, s.engine, progress=progress, masked=True)
    engine = LiveEngine(base, key_array(snapshot.keys(), key_type), key_type, s.engine)
    loaded = time.perf_counter()
    wal = WriteAheadLog(directory, snapshot.dim, key_type)
    replayed = 0
    for record in wal.replay(snapshot.lsn):
        engine.apply(record.lsn, record.upsert_keys, record.vectors, record.delete_keys)
        replayed += 1
    engine.applied_lsn = max(engine.applied_lsn, snapshot.lsn)
    log.info(
        "Collection %s: snapshot %d (%s) loaded in %.2f s, %s replayed in %.2f s; %s live.",
        directory,
        snapshot.lsn,
        counted(snapshot.n, "row"),
        loaded - began,
        counted(replayed, "log record"),
        time.perf_counter() - loaded,
        counted(engine.n, "row"),
    )
    max_rows = s.max_rows or default_max_rows(snapshot.dim)
    collection = Collection(engine, directory, wal, s.collection, max_rows)
    collection.imported = imported
    return engine, collection


def _import(settings: Settings, directory: Path, progress: Progress) -> None:
    s = settings
    targets = open_targets(s.npy, s.dim, s.demo_size, s.demo_seed, s.drop_zero, progress)
    keys = row_keys(s, targets)
    create_collection(directory, targets.dim, s.key_type)  # type: ignore[arg-type]
    write_snapshot(
        directory,
        0,
        targets.dim,
        s.key_type,  # type: ignore[arg-type]
        targets.n,
        lambda out: targets.fill_columns(out, 0),
        keys,
    )
    log.info(
        "Imported %s of dim %d into %s (%s keys).",
        counted(targets.n, "row"),
        targets.dim,
        directory,
        s.key_type,
    )


def _check_conflicts(settings: Settings, directory: Path, dim: int, key_type: str) -> None:
    s = settings
    if s.npy is not None:
        raise ConfigError(
            f"{directory} already holds a collection; start with --data-dir alone (drop --npy), "
            "or give a new directory to import the file."
        )
    if s.dim is not None and s.dim != dim:
        raise ConfigError(
            f"{directory} holds vectors of dimension {dim}, but --dim is {s.dim}; drop --dim."
        )
    if s.keys is not None:
        raise ConfigError(f"{directory} already holds its keys; drop --keys.")
    if s.key_type != key_type and s.key_type != "int":
        raise ConfigError(f"{directory} holds {key_type} keys, but --key-type is {s.key_type}.")
