"""In-process throughput of the engine on generated data, beside the machine's ceiling, FAISS
and ScaNN.

For each dimension one demo matrix is built once; for each batch size the same queries go to
  - the engine (`Engine.search`, exact top-k),
  - TensorFlow matmul-only (`Engine.matmul_only`: the engine's own conversion, call and
    matmul over all N rows, then just a row max fetched to the host: TensorFlow's ceiling),
  - BLAS: numpy's float32 GEMM, scores only, no top-k, over the same normalized matrix (the
    engine's own host buffers on CPU: the same memory) into a preallocated output. This is
    the machine's ceiling: TensorFlow's own can be slow in the same way as the engine (on
    CPUs where its default kernels are slow, it hid a 3x gap),
  - FAISS `IndexFlatIP` (exact, float32, CPU, its default OpenMP threads) over the same
    normalized rows with the same normalized queries, and
  - ScaNN's brute force (exact, float32, dot product), in a subprocess (`bench_scann`), its
    fastest call per batch size (single, batched or batched-parallel),
  - with a narrow --dtype, the float32 engine over the same rows (exact float32), so that
    the narrow engine's speed-up is a ratio measured in the same run.
With a certified narrow dtype (the default for bfloat16/float16), each cell also reports the
fraction of queries that fell back to float32 and the mean certified candidates per query.
`--data clustered` replaces the Gaussian rows with tight clusters and near-duplicates, and
the queries with perturbed rows: many rows tie within the narrow error there.
Each is called once untimed first, then timed for `seconds` in turns taken in rotation with the
others (ScaNN alone in its process, while this one waits); q/s = batch / median seconds per call.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import machine as host
from .blas_search import BlasSearch
from .engine import Engine, EngineConfig, unit_queries
from .errors import ConfigError
from .reference import chunked_top_k
from .settings import DTYPES, TF32_NEEDS_FLOAT32
from .timing import ROUNDS, time_calls
from .vectors import load_matrix, open_targets, prepare, source_from_array

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_DIMS = (100, 300, 512, 768, 1024, 2048)
DATA = ("gaussian", "clustered")

# Flasma's published q/s on an RTX 3090 with 100k targets, keyed by (batch, dim): shown beside
# ours when --n is 100000 too.
FLASMA_N = 100_000
FLASMA_RTX3090: dict[tuple[int, int], float] = {
    (1, 100): 393,
    (128, 100): 4424,
    (1, 768): 365,
    (16, 768): 655,
    (1, 2048): 192,
    (4, 2048): 260,
}

Progress = Callable[[str, int], None]  # (what runs now, cells finished so far)


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = DEFAULT_BATCHES
    dims: tuple[int, ...] = DEFAULT_DIMS
    n: int = 100_000
    k: int = 10
    dtype: str = "float32"
    device: str = "auto"
    seconds: float = 1.0
    compare: bool = False
    recall: bool = False
    seed: int = 0
    approximate: bool = False
    data: str = "gaussian"
    tf32: bool = False

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError("--batches must list batch sizes of at least 1, e.g. 1,8,128.")
        if not self.dims or min(self.dims) < 1:
            raise ConfigError("--dims must list dimensions of at least 1, e.g. 100,768.")
        if self.n < 1:
            raise ConfigError(f"--n must be at least 1, got {self.n}.")
        if not 1 <= self.k <= self.n:
            raise ConfigError(f"--k must be between 1 and --n ({self.n}), got {self.k}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.tf32 and self.dtype != "float32":
            raise ConfigError(TF32_NEEDS_FLOAT32)
        if not self.seconds > 0:
            raise ConfigError(f"--seconds must be positive, got {self.seconds}.")
        if self.data not in DATA:
            raise ConfigError(f"--data must be one of {', '.join(DATA)}, got {self.data!r}.")

    @property
    def cells(self) -> int:
        return len(self.batches) * len(self.dims)


@dataclass
class Result:
    batch: int
    dim: int
    n: int
    k: int
    device: str
    dtype: str
    qps: float
    matmul_qps: float | None = None
    blas_qps: float | None = None
    faiss_qps: float | None = None
    scann_qps: float | None = None
    flasma_rtx3090_qps: float | None = None
    recall: float | None = None  # with --recall: recall@k of this dim's queries vs float64
    max_score_error: float | None = None
    float32_qps: float | None = None  # narrow dtype with --compare: the float32 engine
    fallback_fraction: float | None = None  # certified: queries recomputed in float32
    mean_candidates: float | None = None  # certified: candidates rescored per query

    @property
    def over_float32(self) -> float | None:
        return self.qps / self.float32_qps if self.float32_qps else None

    @property
    def over_matmul(self) -> float | None:
        return self.qps / self.matmul_qps if self.matmul_qps else None

    @property
    def over_blas(self) -> float | None:
        return self.qps / self.blas_qps if self.blas_qps else None

    @property
    def over_faiss(self) -> float | None:
        return self.qps / self.faiss_qps if self.faiss_qps else None

    @property
    def over_scann(self) -> float | None:
        return self.qps / self.scann_qps if self.scann_qps else None

    def to_json(self) -> dict[str, Any]:
        out = {key: value for key, value in asdict(self).items() if value is not None}
        ratios = {
            "engine_over_matmul": self.over_matmul,
            "engine_over_blas": self.over_blas,
            "engine_over_faiss": self.over_faiss,
            "engine_over_scann": self.over_scann,
            "engine_over_float32": self.over_float32,
        }
        out.update({name: value for name, value in ratios.items() if value is not None})
        return out


@dataclass
class Accuracy:
    """The engine's answers for the bench queries against a float64 numpy brute force."""

    dim: int
    dtype: str
    queries: int
    k: int
    recall: float  # mean |engine top-k & exact top-k| / k
    max_score_error: float  # largest |engine score - exact score| at the same rank


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); '1,2,4,...,128' continues the doubling up to 128."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if len(parts) >= 3 and parts[-2] in ("...", "…"):
            head = [int(p) for p in parts[:-2]]
            last, step = int(parts[-1]), head[-1] // head[-2] if len(head) > 1 else 2
            while head[-1] * step <= last and step > 1:
                head.append(head[-1] * step)
            return tuple(sorted({*head, last}))
        return tuple(int(p) for p in parts)
    except (ValueError, IndexError, ZeroDivisionError):
        raise ConfigError(f"{option} takes integers separated by commas, got {text!r}.") from None


def load_faiss() -> Any | None:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


def accuracy(engine: Engine, queries: np.ndarray, k: int) -> Accuracy:
    """Recall@k and the largest rank-by-rank score error against the float64 brute force."""
    rows, scores = engine.search(queries, k)
    exact_rows, exact_scores = chunked_top_k(engine.targets.chunks(8192), queries, k)
    exact_rows = engine.targets.original_index(exact_rows)
    hits = [len(set(r.tolist()) & set(e.tolist())) for r, e in zip(rows, exact_rows, strict=True)]
    return Accuracy(
        dim=engine.dim,
        dtype=engine.config.dtype,
        queries=len(rows),
        k=k,
        recall=float(np.mean(hits)) / k,
        max_score_error=float(np.abs(scores - exact_scores).max()),
    )


class _Subject:
    """One dimension's data and the searchers under test."""

    def __init__(self, config: BenchConfig, dim: int, faiss: Any | None) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, dim])
        if config.data == "clustered":
            rows = clustered_rows(config.n, dim, rng)
            self.targets = prepare(source_from_array(rows, "clustered rows"), False)
            self.queries = perturbed(rows, max(config.batches), rng)
        else:
            self.targets = open_targets(None, dim, demo_size=config.n, demo_seed=config.seed)
            self.queries = rng.standard_normal((max(config.batches), dim), dtype=np.float32)
        engine_config = EngineConfig(
            max_batch=max(config.batches),
            max_k=config.k,
            top_k=config.k,
            device=config.device,
            dtype=config.dtype,
            approximate=config.approximate,
            tf32=config.tf32,
        )
        self.engine = Engine(self.targets, engine_config)
        self.engine.warmup()
        self.unit_queries = unit_queries(self.queries)
        self.index = None
        self.blas: BlasSearch | None = None
        self.scann: dict[int, float] = {}
        self.float32: Engine | None = None
        if config.compare and (config.dtype != "float32" or config.tf32):
            exact = dataclasses.replace(engine_config, dtype="float32", tf32=False)
            self.float32 = Engine(self.targets, exact)
            self.float32.warmup()
        if config.compare:
            self.blas = blas_ceiling(self.float32 or self.engine, max(config.batches))
            self.scann = scann_qps(config, dim, self.unit_queries)
        if config.compare and faiss is not None:
            self.index = faiss.IndexFlatIP(dim)
            self.index.add(load_matrix(self.targets))
        self.accuracy = accuracy(self.engine, self.queries, config.k) if config.recall else None

    def measure(self, batch: int) -> Result:
        config, queries = self.config, self.queries[:batch]
        calls: dict[str, Callable[[], object]] = {
            "engine": lambda: self.engine.search(queries, config.k)
        }
        unit = self.unit_queries[:batch]
        if config.compare:
            calls["matmul"] = lambda: self.engine.matmul_only(queries)
        blas, index, float32 = self.blas, self.index, self.float32
        if float32 is not None:
            calls["float32"] = lambda: float32.search(queries, config.k)
        if blas is not None:
            calls["blas"] = lambda: blas.scores(unit)
        if index is not None:
            calls["faiss"] = lambda: index.search(unit, config.k)
        certified = self.engine.certified
        before = certified.stats.snapshot() if certified is not None else None
        qps = {
            name: batch / per_call for name, per_call in time_calls(calls, config.seconds).items()
        }
        result = Result(
            batch=batch,
            dim=self.targets.dim,
            n=config.n,
            k=config.k,
            device=self.engine.device,
            dtype=config.dtype,
            qps=qps["engine"],
            matmul_qps=qps.get("matmul"),
            blas_qps=qps.get("blas"),
            faiss_qps=qps.get("faiss"),
            scann_qps=self.scann.get(batch),
            float32_qps=qps.get("float32"),
            flasma_rtx3090_qps=(
                FLASMA_RTX3090.get((batch, self.targets.dim)) if config.n == FLASMA_N else None
            ),
        )
        if self.accuracy is not None:
            result.recall = self.accuracy.recall
            result.max_score_error = self.accuracy.max_score_error
        if certified is not None and before is not None:
            now = certified.stats
            asked = now.queries - before.queries
            fallbacks = now.fallbacks - before.fallbacks
            result.fallback_fraction = fallbacks / asked
            rescored = max(asked - fallbacks, 1)
            result.mean_candidates = (now.candidates - before.candidates) / rescored
        return result


def clustered_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Clusters of ~100 rows at cosine ~0.98 to their centre, a tenth of them near-duplicates
    (another row plus noise of 1e-4 per unit length): the narrow type ties many rows here."""
    centres = rng.standard_normal((max(n // 100, 1), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = centres[rng.integers(0, len(centres), n)]
    rows += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.2 / np.sqrt(dim))
    twins = rng.choice(n, n // 10, replace=False)
    rows[twins] = rows[rng.integers(0, n, len(twins))] + rng.standard_normal(
        (len(twins), dim), dtype=np.float32
    ) * np.float32(1e-4 / np.sqrt(dim))
    return rows


def perturbed(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Queries near random rows (noise half the clusters' spread)."""
    picked = rows[rng.integers(0, len(rows), count)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32) * np.float32(0.1)
    return picked + noise / np.float32(np.sqrt(rows.shape[1]))


def run_bench(
    config: BenchConfig, progress: Progress | None = None, faiss: Any | None = None
) -> Iterator[Result]:
    """Yield one Result per (dim, batch) cell, dims outermost. Pass `load_faiss()` as faiss
    to include FAISS when `config.compare` is set."""
    done = 0
    for dim in config.dims:
        if progress is not None:
            progress(f"d={dim}: building {config.n:,} x {dim}, tracing, checking", done)
        subject = _Subject(config, dim, faiss)
        for batch in config.batches:
            if progress is not None:
                progress(f"d={dim}: batch {batch}", done)
            yield subject.measure(batch)
            done += 1
        del subject
        gc.collect()  # free this dimension's matrices before the next one is built
    if progress is not None:
        progress("done", done)


def blas_ceiling(engine: Engine, max_batch: int) -> BlasSearch:
    """numpy GEMM over the engine's own host buffers (CPU, float32: the same memory), else
    over a float32 host copy of the same normalized rows."""
    slabs = engine.host_slabs() or [(0, np.ascontiguousarray(load_matrix(engine.targets).T))]
    return BlasSearch(slabs, engine.n, engine.block, engine.n_main, max_rows=max_batch)


def scann_qps(config: BenchConfig, dim: int, queries: np.ndarray) -> dict[int, float]:
    """ScaNN's q/s per batch size, from `bench_scann` in a subprocess; {} (with a note on
    stderr) where ScaNN is not installed or fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/queries.npy"
        np.save(path, queries)
        request = {
            "n": config.n,
            "dim": dim,
            "seed": config.seed,
            "k": config.k,
            "seconds": config.seconds,
            "batches": list(config.batches),
            "queries": path,
        }
        done = subprocess.run(
            [sys.executable, "-m", "flasma_ws.bench_scann"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
        )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"error": f"ScaNN's benchmark failed: {done.stderr.strip()[-500:]}"}
    if "error" in answer:
        print(answer["error"], file=sys.stderr)
        return {}
    return {int(batch): qps for batch, qps in answer["qps"].items()}


def machine() -> dict[str, Any]:
    import tensorflow as tf

    from .tf_runtime import onednn_state

    return {
        "platform": platform.platform(),
        "processor": host.cpu_model(),
        "cpu": host.describe_cpu(),
        "blas": host.blas(),
        "onednn": onednn_state().describe(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "faiss": getattr(load_faiss(), "__version__", None),
    }


def machine_line() -> str:
    """The bench's header: the CPU, its flags, numpy's BLAS and TensorFlow's oneDNN state."""
    from .tf_runtime import onednn_state

    return host.summary_line(onednn_state().enabled)


def report(config: BenchConfig, results: list[Result]) -> dict[str, Any]:
    """The JSON document `--json-out` writes."""
    first = results[0] if results else None
    return {
        "device": first.device if first else config.device,
        "dtype": config.dtype,
        "approximate": config.approximate,
        "tf32": config.tf32,
        "data": config.data,
        "n": config.n,
        "k": config.k,
        "seconds_per_cell": config.seconds,
        "qps_is": (
            "batch size / median wall seconds per call, after one untimed call; the methods "
            f"are timed in {ROUNDS} alternating turns"
        ),
        "machine": machine(),
        "matmul_qps_includes": (
            "query normalization and conversion, the TensorFlow call, the "
            "matmul over all N rows, a row max, and fetching B floats to the host"
        ),
        "blas_qps_includes": (
            "numpy's float32 GEMM of the normalized queries against the same normalized "
            "matrix into a preallocated (B, N) output; no top-k"
        ),
        "results": [r.to_json() for r in results],
    }


def format_qps(qps: float | None) -> str:
    if qps is None or not math.isfinite(qps):
        return "-"
    return f"{qps:,.0f}" if qps >= 10 else f"{qps:.1f}"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def grid(
    results: list[Result], cell: Callable[[Result], str]
) -> tuple[list[int], list[int], dict[tuple[int, int], str]]:
    """Batches (rows), dims (columns) and cell text, in the order measured."""
    batches = sorted({r.batch for r in results})
    dims = sorted({r.dim for r in results})
    return batches, dims, {(r.batch, r.dim): cell(r) for r in results}


def markdown_table(results: list[Result], cell: Callable[[Result], str]) -> str:
    batches, dims, cells = grid(results, cell)
    lines = [
        "| batch | " + " | ".join(f"d={d}" for d in dims) + " |",
        "|---:|" + "---:|" * len(dims),
    ]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(cells.get((b, d), "") for d in dims) + " |")
    return "\n".join(lines)


def engine_cell(result: Result) -> str:
    text = format_qps(result.qps)
    if result.flasma_rtx3090_qps is not None:
        text += f" (3090: {format_qps(result.flasma_rtx3090_qps)})"
    return text
