"""Target vectors: open `.npy` files (standard or Flasma legacy) memory-mapped, or a demo set.

Rows are read in chunks so that loading never holds a second full host copy of the matrix:
the engine copies chunk by chunk straight onto its device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from .errors import VectorFileError
from .text import counted

Layout = Literal["standard", "legacy", "demo"]
RowsDone = Callable[[int], None]  # called with the number of rows just processed

CHUNK_BYTES = 32 * 1024 * 1024  # per chunk read: bounded temporaries whatever the dim
DEMO_CHUNK_VALUES = 1 << 20  # demo rows come from one RNG stream per ~4 MiB, so slices are cheap
# A row whose float64 norm is within this of 1 is already unit length in float32 and is
# kept bit for bit, so legacy files (stored normalized) load exactly as written.
UNIT_NORM_TOLERANCE = 4 * float(np.finfo(np.float32).eps)
# A legacy file holds unit-norm rows, so a wrong --dim shows in the norms of a few sampled
# rows: on the 10,000 x 100 fixture --dim 64 gives 0.61-0.97 and --dim 1000 gives 3.16, while
# float16 files round true norms by ~1e-3. Dims above the cap are not guessed (nor served).
LEGACY_NORM_TOLERANCE = 1e-2
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive, refused below with its own message
LEGACY_SAMPLE_ROWS = 8
MAX_GUESSED_DIM = 65_536


@dataclass(frozen=True)
class VectorSource:
    """Raw rows of an opened vector file or demo set; `rows()` returns float32, unnormalized."""

    n: int
    dim: int
    layout: Layout
    label: str  # the file path, or "demo"
    array: np.ndarray | None = None  # the memory map (None for demo)
    seed: int = 0
    offset: int = 0  # the file's (or demo stream's) row that is row 0 here: see row_range

    def row_range(self, start: int, stop: int) -> VectorSource:
        """Rows start..stop as a source of their own, read from the same file or demo stream
        (a shard's rows: flasma_ws/shards.py)."""
        if not 0 <= start < stop <= self.n:
            raise VectorFileError(f"Rows {start}..{stop} are not within the {self.n} rows.")
        array = self.array
        if self.layout == "standard" and array is not None:
            array = array[start:stop]
        return dataclasses.replace(self, n=stop - start, array=array, offset=self.offset + start)

    @property
    def integer_dtype(self) -> str | None:
        """The file's dtype when it holds integers (read as float32, with a note), else None."""
        if self.array is None or not np.issubdtype(self.array.dtype, np.integer):
            return None
        return np.dtype(self.array.dtype).name

    def release_pages(self) -> None:
        """Once loaded, the file's pages need not count in our RSS; reads fault them back."""
        _release(self.array)

    def _legacy_columns(self, start: int, stop: int) -> np.ndarray:
        """A view of rows start..stop of a legacy file: column j of its (dim, N) matrix is row j."""
        assert self.array is not None
        first = self.offset + start  # a legacy file's array is always the whole file
        return self.array.reshape(self.dim, -1)[:, first : first + stop - start]

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.layout == "demo":
            return _demo_rows(self.seed, self.dim, self.offset + start, self.offset + stop)
        assert self.array is not None
        block = (
            self._legacy_columns(start, stop).T
            if self.layout == "legacy"
            else self.array[start:stop]
        )
        return np.ascontiguousarray(block, dtype=np.float32)

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as the columns of a (dim, rows) float32 block: the engine's layout.
        A legacy file is stored this way already, so it is read without any transpose."""
        if self.layout == "legacy":
            return np.array(self._legacy_columns(start, stop), dtype=np.float32)
        return self.rows(start, stop).T

    def copy_columns(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write rows start..stop into the (dim, stop - start) array `out`, unnormalized:
        a legacy file goes straight from the page cache into `out`, with no chunk between."""
        if self.layout == "legacy":
            np.copyto(out, self._legacy_columns(start, stop), casting="unsafe")
        else:
            out[...] = self.rows(start, stop).T

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        return self._chunked(self.rows, chunk_rows)

    def column_chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        return self._chunked(self.columns, chunk_rows)

    def _chunked(
        self, read: Callable[[int, int], np.ndarray], chunk_rows: int | None
    ) -> Iterator[tuple[int, np.ndarray]]:
        chunk_rows = chunk_rows or chunk_rows_for(self.dim)
        for start in range(0, self.n, chunk_rows):
            yield start, read(start, min(start + chunk_rows, self.n))
            # Each chunk is read once: drop its pages so a pass over a large file does not
            # grow our RSS by the file's size.
            self.release_pages()


def _release(array: np.ndarray | None) -> None:
    """Drop a memory map's resident pages from this process (they stay in the page cache)."""
    while array is not None and not isinstance(array, np.memmap):
        base = getattr(array, "base", None)
        array = base if isinstance(base, np.ndarray) else None
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(ValueError, OSError):
            raw.madvise(mmap.MADV_DONTNEED)


def chunk_rows_for(dim: int) -> int:
    return max(CHUNK_BYTES // (4 * dim), 1)


def _demo_rows(seed: int, dim: int, start: int, stop: int) -> np.ndarray:
    rows = max(DEMO_CHUNK_VALUES // dim, 1)
    first, last = start // rows, (stop - 1) // rows
    parts = []
    for chunk in range(first, last + 1):
        rng = np.random.default_rng([seed, chunk])
        part = rng.standard_normal((rows, dim), dtype=np.float32)
        lo = max(start - chunk * rows, 0)
        hi = min(stop - chunk * rows, rows)
        parts.append(part[lo:hi])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def open_demo(n: int, dim: int, seed: int = 0) -> VectorSource:
    if n < 1 or dim < 1:
        raise VectorFileError(
            f"A demo set needs at least one row and one dimension, got {n}x{dim}."
        )
    return VectorSource(n=n, dim=dim, layout="demo", label="demo", seed=seed)


def open_npy(
    path: str | Path,
    dim: int | None = None,
    *,
    convert_hint: bool = True,
    dim_for_legacy_only: bool = False,
) -> VectorSource:
    """Open a standard (N, dim) or legacy (dim*N,) `.npy` memory-mapped, checking its shape.

    `convert_hint`: a file that is not .npy is pointed to `flasma-ws convert` (not from inside
    convert). `dim_for_legacy_only`: `dim` only reads a 1-D file (the caller has no --dim flag).
    """
    path = Path(path)
    array = _load_npy(path, convert_hint)
    if dim_for_legacy_only and array.ndim != 1:
        dim = None
    return source_from_array(array, str(path), dim)


def source_from_array(array: np.ndarray, label: str, dim: int | None = None) -> VectorSource:
    """Check the dtype and shape of a 2-D (standard) or 1-D (legacy) array and wrap it.

    Shared by `open_npy` and the readers in `formats` (.npz members, .fvecs, .hdf5).
    """
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise VectorFileError(
            f"{label} holds {array.dtype} values; expected floating-point numbers."
        )
    if array.ndim == 2:
        n, file_dim = array.shape
        if dim is not None and dim != file_dim:
            raise VectorFileError(
                f"{label} has rows of dimension {file_dim}, but --dim is {dim}; "
                f"drop --dim or pass --dim {file_dim}."
            )
        layout: Layout = "standard"
    elif array.ndim == 1:
        if dim is None:
            raise VectorFileError(
                f"{label} is 1-D (a Flasma legacy file of length dim*N); pass --dim to read it."
            )
        if array.shape[0] % dim:
            raise VectorFileError(
                f"{label} has {array.shape[0]} values, which is not a multiple of --dim {dim}; "
                "check --dim."
            )
        n, file_dim, layout = array.shape[0] // dim, dim, "legacy"
        _check_legacy_dim(array, label, dim)
    else:
        raise VectorFileError(
            f"{label} is {array.ndim}-D with shape {array.shape}; expected (N, dim) or a "
            "1-D Flasma legacy array. Reshape it to (N, dim) and save it again."
        )
    if n == 0 or file_dim == 0:
        raise VectorFileError(
            f"{label} holds no vectors (shape {array.shape}); give a file with at least one "
            "non-empty row."
        )
    return VectorSource(n=n, dim=file_dim, layout=layout, label=label, array=array)


def _check_legacy_dim(array: np.ndarray, label: str, dim: int) -> None:
    """Refuse a --dim under which a legacy file's rows are not of unit norm, naming the dims
    under which they are."""
    norms = _legacy_sample_norms(array, dim)
    if norms.size == 0 or np.all(np.abs(norms - 1.0) <= LEGACY_NORM_TOLERANCE):
        return
    lowest, highest = f"{norms.min():.2f}", f"{norms.max():.2f}"
    seen = f"rows of norm {lowest}" + ("" if lowest == highest else f" to {highest}")
    guesses = [d for d in _divisors(array.shape[0]) if d != dim and _has_unit_rows(array, d)]
    if guesses:
        hint = f"so --dim {dim} is wrong; pass --dim " + " or --dim ".join(map(str, guesses))
    else:
        hint = (
            "and no --dim gives unit-norm rows, so it is not a Flasma legacy file; "
            "save it as an (N, dim) array instead"
        )
    raise VectorFileError(
        f"{label} read with --dim {dim} has {seen}, but a Flasma legacy file holds "
        f"unit-norm rows, {hint}."
    )


def _legacy_sample_norms(array: np.ndarray, dim: int) -> np.ndarray:
    """Float64 norms of a few rows spread over a legacy file read with `dim`. NaN and zero
    rows are left out: the full scan refuses them later with its own message."""
    n = array.shape[0] // dim
    picked = np.unique(np.linspace(0, n - 1, min(n, LEGACY_SAMPLE_ROWS)).astype(np.int64))
    block = np.asarray(array.reshape(dim, n)[:, picked], dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->j", block, block))
    return norms[np.isfinite(norms) & (norms > 0)]


def _has_unit_rows(array: np.ndarray, dim: int) -> bool:
    norms = _legacy_sample_norms(array, dim)
    return norms.size > 0 and bool(np.all(np.abs(norms - 1.0) <= LEGACY_NORM_TOLERANCE))


def _divisors(length: int) -> list[int]:
    """Candidate dims of a legacy file: divisors of its length from 2 to MAX_GUESSED_DIM."""
    small = [d for d in range(1, math.isqrt(length) + 1) if length % d == 0]
    both = set(small) | {length // d for d in small}
    return sorted(d for d in both if 2 <= d <= MAX_GUESSED_DIM)


def _load_npy(path: Path, convert_hint: bool = True) -> np.ndarray:
    if not path.exists():
        raise VectorFileError(f"{path} does not exist; check the path given to --npy.")
    if path.is_dir():
        raise VectorFileError(f"{path} is a directory; give the path of a .npy file.")
    hint = f"; convert it with `flasma-ws convert {path} OUT.npy`" if convert_hint else ""
    with path.open("rb") as fh:
        head = fh.read(len(NPY_MAGIC))
    # Without this check numpy takes any other file for pickled data and blames allow_pickle.
    if head != NPY_MAGIC and head[:4] != ZIP_MAGIC:
        raise VectorFileError(f"{path} is not a readable .npy file (no .npy header){hint}.")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise VectorFileError(
            f"{path} is not a readable .npy file ({exc}); check that the file is complete."
        ) from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive
        loaded.close()
        raise VectorFileError(
            f"{path} is an .npz archive; run `flasma-ws convert {path} OUT.npy --key NAME` first."
        )
    return loaded


def row_norms(block: np.ndarray) -> np.ndarray:
    """Float64 norms: float32 squares could overflow. einsum accumulates in float64 without a
    float64 copy of the block, about 5x faster than np.linalg.norm on a cast."""
    return np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))


def normalize_rows(block: np.ndarray) -> np.ndarray:
    """L2-normalize float32 rows (no zero rows); rows already of unit norm stay bit-exact."""
    return normalize_columns(block.T).T


def normalize_columns(block: np.ndarray, in_place: bool = False) -> np.ndarray:
    """normalize_rows for a (dim, rows) block, the engine's layout."""
    norms = row_norms(block.T)
    off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
    if not off.any():
        return block
    out = block if in_place else block.copy()
    out[:, off] = (block[:, off].astype(np.float64) / norms[off]).astype(np.float32)
    return out


class ColumnSource(Protocol):
    """What the engine loads from: normalized rows written as columns of its (dim, width)
    buffers. `Targets` (a file or the demo set) is one; a live collection's compaction another."""

    @property
    def n(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def fill_columns(
        self, out: np.ndarray, first: int, progress: RowsDone | None = None
    ) -> None: ...

    def release_pages(self) -> None: ...

    def original_index(self, rows: np.ndarray) -> np.ndarray: ...

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass(frozen=True)
class Targets:
    """A validated source plus which of its rows to keep; yields normalized float32 chunks.

    `keep` holds original row indices when zero rows were dropped (results use these), else None.
    """

    source: VectorSource
    keep: np.ndarray | None = None
    zero_rows: int = 0

    @property
    def n(self) -> int:
        return self.source.n if self.keep is None else int(self.keep.shape[0])

    @property
    def dim(self) -> int:
        return self.source.dim

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first destination row, normalized rows) for the kept rows, in order."""
        if self.keep is None:
            for start, block in self.source.chunks(chunk_rows):
                yield start, normalize_rows(block)
            return
        written = 0
        for start, block in self.source.chunks(chunk_rows):
            kept = self.keep[(self.keep >= start) & (self.keep < start + block.shape[0])]
            if kept.size:
                yield written, normalize_rows(block[kept - start])
                written += kept.size

    def fill_columns(self, out: np.ndarray, first: int, progress: RowsDone | None = None) -> None:
        """Write normalized kept rows first..first+width as the columns of `out` (dim, width),
        chunk by chunk, without an intermediate chunk when no row was dropped."""
        width = out.shape[1]
        if self.keep is not None:
            for start, block in self.column_chunks():
                lo, hi = max(start, first), min(start + block.shape[1], first + width)
                if lo < hi:
                    out[:, lo - first : hi - first] = block[:, lo - start : hi - start]
                    if progress is not None:
                        progress(hi - lo)
            return
        step = chunk_rows_for(self.dim)
        for lo in range(0, width, step):
            hi = min(lo + step, width)
            self.source.copy_columns(first + lo, first + hi, out[:, lo:hi])
            normalize_columns(out[:, lo:hi], in_place=True)
            self.source.release_pages()
            if progress is not None:
                progress(hi - lo)

    def column_chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Like chunks(), but each block is (dim, rows): what the engine stores."""
        if self.keep is None:
            for start, block in self.source.column_chunks(chunk_rows):
                yield start, normalize_columns(block)
            return
        for start, block in self.chunks(chunk_rows):
            yield start, block.T

    def release_pages(self) -> None:
        self.source.release_pages()

    def original_index(self, rows: np.ndarray) -> np.ndarray:
        """Map engine row numbers back to row numbers of the file."""
        return rows if self.keep is None else self.keep[rows]


def prepare(
    source: VectorSource, drop_zero: bool = False, progress: RowsDone | None = None
) -> Targets:
    """Scan every row once: refuse NaN/Inf, find zero-norm rows, refuse or drop them."""
    if source.layout == "demo":
        return Targets(source)  # Gaussian rows: finite, and zero with probability 0
    zero_parts = []
    for start, columns in source.column_chunks():
        block = columns.T  # a view: rows again, without a copy
        finite = np.isfinite(block)
        if not finite.all():
            bad_row = start + int(np.argwhere(~finite)[0][0])
            raise VectorFileError(
                f"{source.label} holds NaN or infinite values (first in row {bad_row}); "
                "clean the file and try again."
            )
        zero = np.flatnonzero(row_norms(block) == 0.0)
        if zero.size:
            zero_parts.append(zero + start)
        if progress is not None:
            progress(block.shape[0])
    zeros = np.concatenate(zero_parts) if zero_parts else np.empty(0, dtype=np.int64)
    if zeros.size == 0:
        return Targets(source)
    if not drop_zero:
        raise VectorFileError(
            f"{source.label} has {counted(int(zeros.size), 'zero-norm row')} "
            f"(first at row {int(zeros[0])}); "
            "a zero vector has no cosine similarity. Remove them, or pass --drop-zero to skip "
            "them (results keep the original row numbers)."
        )
    if zeros.size == source.n:
        raise VectorFileError(f"Every row of {source.label} has zero norm; nothing to serve.")
    keep = np.setdiff1d(np.arange(source.n, dtype=np.int64), zeros, assume_unique=True)
    return Targets(source, keep=keep, zero_rows=int(zeros.size))


def load_matrix(targets: ColumnSource) -> np.ndarray:
    """The whole normalized (n, dim) float32 matrix on the host (for tools and tests)."""
    out = np.empty((targets.n, targets.dim), dtype=np.float32)
    for start, block in targets.chunks():
        out[start : start + block.shape[0]] = block
    return out


def open_targets(
    npy: str | Path | None,
    dim: int | None,
    demo_size: int = 10_000,
    demo_seed: int = 0,
    drop_zero: bool = False,
    progress: RowsDone | None = None,
) -> Targets:
    """Open and validate what the settings name: a file, or the demo set when npy is None."""
    if npy is None:
        if dim is None:
            raise VectorFileError("Give --npy FILE, or --dim D to use a generated demo set.")
        return prepare(open_demo(demo_size, dim, demo_seed), drop_zero, progress)
    return prepare(open_npy(npy, dim), drop_zero, progress)
