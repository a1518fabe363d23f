"""Vector files of every supported format as a `VectorSource`, and normalized `.npy` output.

Inputs: `.npy` (standard or Flasma legacy), `.npz` (one member), `.fvecs` (TEXMEX /
ann-benchmarks) and ann-benchmarks `.hdf5`. Inputs are memory-mapped wherever the format allows,
and the output is written chunk by chunk into a memory-mapped file, so a conversion never holds
two full copies of the matrix in RAM.
"""

from __future__ import annotations

import errno
import math
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from .errors import VectorFileError
from .vectors import RowsDone, Targets, VectorSource, open_npy, source_from_array

OutLayout = Literal["standard", "legacy"]
FORMATS = {".npy": "npy", ".npz": "npz", ".fvecs": "fvecs", ".hdf5": "hdf5", ".h5": "hdf5"}
HDF5_DEFAULT_KEY = "train"  # ann-benchmarks keeps the database vectors here
HDF5_INSTALL_HINT = "pip install 'flasma-ws[hdf5]'"


def open_any(path: str | Path, dim: int | None = None, key: str | None = None) -> VectorSource:
    """Open a vector file, choosing the reader from its extension.

    `dim` is needed for 1-D legacy arrays and otherwise must match the file; `key` names the
    `.npz` member (optional when there is only one) or the `.hdf5` dataset (default "train").
    """
    path = Path(path)
    _check_input(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise VectorFileError(
            f"{path} has an unknown extension; give a .npy, .npz, .fvecs or .hdf5 file."
        )
    if key is not None and kind in ("npy", "fvecs"):
        raise VectorFileError(
            f"--key only applies to .npz and .hdf5 files, and {path} is {kind}; drop --key."
        )
    if kind == "npy":
        return open_npy(path, dim, convert_hint=False)  # we are inside convert
    if kind == "npz":
        return open_npz(path, dim, key)
    if kind == "fvecs":
        return open_fvecs(path, dim)
    return open_hdf5(path, dim, key)


def _check_input(path: Path) -> None:
    if not path.exists():
        raise VectorFileError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise VectorFileError(f"{path} is a directory; give the path of a vector file.")


def _pick_key(path: Path, keys: Sequence[str], key: str | None, what: str) -> str:
    """The member to read: `key` if given, else the only one; errors list what is there."""
    if not keys:
        raise VectorFileError(f"{path} holds no {what}s; give a file that holds vectors.")
    listed = ", ".join(repr(k) for k in keys)
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise VectorFileError(
            f"{path} holds {len(keys)} {what}s ({listed}); pass --key with the one to convert."
        )
    if key not in keys:
        raise VectorFileError(f"{path} has no {what} {key!r}; pass --key with one of {listed}.")
    return key


# --- .npz -------------------------------------------------------------------------------------


def open_npz(path: str | Path, dim: int | None = None, key: str | None = None) -> VectorSource:
    """Open one member of an `.npz`; stored (uncompressed) members are memory-mapped."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VectorFileError(
            f"{path} is not a readable .npz archive ({exc}); check that the file is complete."
        ) from exc
    with archive:
        members = {i.filename[:-4]: i for i in archive.infolist() if i.filename.endswith(".npy")}
        name = _pick_key(path, sorted(members), key, "array")
        array: np.ndarray | None = _map_stored_member(path, members[name])
        if array is None:
            array = _read_member(path, archive, name)
    return source_from_array(array, f"{path} (key {name!r})", dim)


def _read_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    # A compressed member cannot be memory-mapped: this is the one full copy in RAM.
    try:
        with archive.open(f"{name}.npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise VectorFileError(
            f"{path} member {name!r} is not a readable array ({exc}); save it again with np.savez."
        ) from exc


def _map_stored_member(path: Path, info: zipfile.ZipInfo) -> np.memmap | None:
    """Memory-map an uncompressed member in place (np.savez writes these), else None."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # the fixed part of the zip local file header
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return None
        except ValueError:
            return None  # let the ordinary reader produce the error message
        offset = fh.tell()
    size = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or size == 0 or offset + size > path.stat().st_size:
        return None
    order: Literal["C", "F"] = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


# --- .fvecs -----------------------------------------------------------------------------------


def open_fvecs(path: str | Path, dim: int | None = None) -> VectorSource:
    """Memory-map a `.fvecs` file: each vector is an int32 dimension, then that many float32."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise VectorFileError(f"{path} is empty; give a file with at least one vector.")
    if size % 4:
        raise VectorFileError(
            f"{path} is {size} bytes, not a multiple of 4, so it is not a .fvecs file; "
            "check the file."
        )
    file_dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if file_dim < 1 or size % (4 * (file_dim + 1)):
        raise VectorFileError(
            f"{path} is not a whole number of .fvecs records (int32 dimension {file_dim}, then "
            "that many float32 values); the file is truncated or not .fvecs."
        )
    records = np.memmap(path, dtype="<f4", mode="r").reshape(-1, file_dim + 1)
    declared = records.view("<i4")[:, 0]
    bad = np.flatnonzero(declared != file_dim)
    if bad.size:
        raise VectorFileError(
            f"{path} vector {bad[0]} declares dimension {declared[bad[0]]}, but vector 0 declares "
            f"{file_dim}; files mixing dimensions are not supported, so split the file."
        )
    return source_from_array(records[:, 1:], str(path), dim)


# --- .hdf5 ------------------------------------------------------------------------------------


def _import_h5py() -> ModuleType:
    try:
        import h5py
    except ImportError as exc:
        raise VectorFileError(
            f"Reading .hdf5 files needs the optional h5py package; install it with "
            f"{HDF5_INSTALL_HINT}"
        ) from exc
    return h5py


def open_hdf5(path: str | Path, dim: int | None = None, key: str | None = None) -> VectorSource:
    """Open an ann-benchmarks `.hdf5` dataset (default "train"), memory-mapped if contiguous."""
    path = Path(path)
    h5py = _import_h5py()
    try:
        h5file = h5py.File(path, "r")
    except OSError as exc:
        raise VectorFileError(
            f"{path} is not a readable HDF5 file ({exc}); check that the file is complete."
        ) from exc
    names: list[str] = []
    h5file.visititems(lambda name, obj: names.append(name) if _is_dataset(h5py, obj) else None)
    name = _pick_key(path, sorted(names), key or HDF5_DEFAULT_KEY, "dataset")
    dataset = h5file[name]
    array: Any = _map_contiguous(path, dataset)
    if array is not None:
        h5file.close()
    elif dataset.ndim == 2:
        array = dataset  # slices are read on demand; the dataset keeps the file open
    else:
        array = dataset[()]  # legacy rows need reshape, which only arrays have: read it whole
    return source_from_array(array, f"{path} (dataset {name!r})", dim)


def _is_dataset(h5py: ModuleType, obj: object) -> bool:
    return isinstance(obj, h5py.Dataset)


def _map_contiguous(path: Path, dataset: Any) -> np.memmap | None:
    """Map an uncompressed, contiguous dataset straight from the file, as h5py would read it."""
    if dataset.chunks is not None or dataset.external or dataset.dtype.hasobject:
        return None
    offset = dataset.id.get_offset()
    if offset is None or dataset.size == 0:
        return None
    mapped = np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    # The offset is relative to the HDF5 base address; check it against h5py once to be safe.
    head = np.asarray(dataset[:1], dtype=np.float64)
    if not np.array_equal(np.asarray(mapped[:1], dtype=np.float64), head, equal_nan=True):
        return None
    return mapped


# --- output -----------------------------------------------------------------------------------


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output path we cannot or should not write, before any work is done."""
    out = Path(out)
    if out.suffix.lower() != ".npy":
        raise VectorFileError(f"{out} does not end in .npy; the output is always a .npy file.")
    if out.is_dir():
        raise VectorFileError(f"{out} is a directory; give the path of the .npy file to write.")
    if out.exists() and not overwrite:
        raise VectorFileError(f"{out} already exists; pass --force to overwrite it.")
    if not out.parent.is_dir():
        raise VectorFileError(f"The folder {out.parent} does not exist; create it first.")
    return out


def write_npy(
    targets: Targets,
    out: str | Path,
    layout: OutLayout = "standard",
    progress: RowsDone | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the normalized float32 rows as a standard (N, dim) or legacy (dim*N,) `.npy`.

    The file is written under a temporary name and renamed at the end, so a failed run leaves
    no half-written OUT and an existing OUT (even the input itself) survives until then.
    """
    out = check_output(out, overwrite)
    partial = out.with_name(f".{out.name}.partial")
    shape = (targets.n, targets.dim) if layout == "standard" else (targets.n * targets.dim,)
    try:
        mapped = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        _reserve_space(partial, out)
        _fill(mapped, targets, layout, progress)
        mapped.flush()
        del mapped
        os.replace(partial, out)
    except OSError as exc:
        raise VectorFileError(
            f"Cannot write {out} ({exc}); check the folder and free space."
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return out


def _fill(
    mapped: np.ndarray, targets: Targets, layout: OutLayout, progress: RowsDone | None
) -> None:
    # Legacy is the transposed matrix flattened: row j of the input is column j of (dim, N).
    dest = mapped if layout == "standard" else mapped.reshape(targets.dim, targets.n)
    for start, block in targets.chunks():
        stop = start + block.shape[0]
        if layout == "standard":
            dest[start:stop] = block
        else:
            dest[:, start:stop] = block.T
        if progress is not None:
            progress(block.shape[0])


def _reserve_space(partial: Path, out: Path) -> None:
    """Allocate the whole file now: a full disk under a memory map would kill us with SIGBUS."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(partial, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise VectorFileError(
                f"Not enough disk space to write {out}; free some space or choose another folder."
            ) from exc
        # Filesystems without fallocate support: go on and write without reserving.
    finally:
        os.close(fd)
