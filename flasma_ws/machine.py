"""What this machine offers the engine: CPU model, the instruction-set flags that decide which
kernels run, and numpy's BLAS. Figures mean little without these (the team's CPUs differ:
an AVX2-only Zen 3 and an AVX-512 Zen 4 ran the same engine 3x apart)."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

# The flags that change which kernels TensorFlow, oneDNN and BLAS pick.
FLAGS_THAT_MATTER = (
    *("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni"),
    *("amx_bf16", "amx_fp16"),
)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The model name with its family and model numbers: "AMD EPYC" alone names no core."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_flags() -> list[str]:
    """Which of FLAGS_THAT_MATTER this CPU has."""
    have = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in FLAGS_THAT_MATTER if flag in have]


def blas() -> list[dict[str, Any]]:
    """numpy's BLAS, its kernel architecture and threads (threadpoolctl). Other packages may
    load BLAS libraries of their own (FAISS does); only numpy's serves `np.matmul`."""
    import numpy as np
    from threadpoolctl import threadpool_info

    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    return [
        {
            "library": pool.get("internal_api"),
            "version": pool.get("version"),
            "architecture": pool.get("architecture"),
            "threads": pool.get("num_threads"),
        }
        for pool in threadpool_info()
        if pool.get("user_api") == "blas" and _is_numpys(pool.get("filepath", ""), numpy_dir)
    ]


def _is_numpys(library: str, site_dir: str) -> bool:
    """numpy's wheels keep their BLAS in numpy.libs (or numpy/.dylibs) beside the package."""
    return os.path.relpath(library, site_dir).split(os.sep)[0] in ("numpy.libs", "numpy")


def describe_cpu() -> dict[str, Any]:
    """The CPU part of /info and of the bench report."""
    return {"model": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags()}


def gpu_model(device: str) -> str | None:
    """The GPU's name (e.g. "NVIDIA H200") when `device` is a GPU, else None. TensorFlow is
    already loaded by then: the engine placed the matrix on that device."""
    if "GPU" not in device.upper():
        return None
    import tensorflow as tf

    index = int(device.rsplit(":", 1)[-1]) if device[-1:].isdigit() else 0
    gpus = tf.config.list_physical_devices("GPU")
    if index >= len(gpus):
        return None
    return str(tf.config.experimental.get_device_details(gpus[index]).get("device_name", "GPU"))


def summary_line(onednn: bool) -> str:
    """One line for the bench header: CPU, flags, BLAS, oneDNN."""
    pools = ", ".join(
        f"{p['library']} {p['version']} ({p['architecture']}, {p['threads']} threads)"
        for p in blas()
    )
    flags = " ".join(cpu_flags()) or "none of " + " ".join(FLAGS_THAT_MATTER)
    return (
        f"CPU: {cpu_model()} x{os.cpu_count()}; flags: {flags}; numpy BLAS: {pools or 'unknown'};"
        f" TensorFlow oneDNN: {'on' if onednn else 'off'}"
    )
