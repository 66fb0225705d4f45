"""Shared helpers for the benchmark scripts: timing, environment, tables, JSON, test images.

A benchmark here is a contract: warm-up, then repeats; the median and the spread (min-max) are
reported; the JSON records versions and hardware so a number can be traced to a machine.

    from _common import environment_info, markdown_table, measure, rate_summary, write_json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR",
    "cpu_model",
    "environment_info",
    "markdown_table",
    "measure",
    "photo_like",
    "rate_summary",
    "reuse_freed_memory",
    "write_json",
]


# --- timing ------------------------------------------------------------------------------------


def measure(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; wall and process-CPU seconds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock read, so device work
    is inside the measurement. Process CPU time counts all threads of this process (not children).
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu}


def rate_summary(
    seconds: Sequence[float], items: int, cpu_seconds: Sequence[float] | None = None
) -> dict[str, float]:
    """Items per second over repeats: median and spread (min-max), plus ms per item."""
    rates = [items / s for s in seconds]
    out = {
        "images_per_s_median": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "ms_per_image_median": 1000.0 * statistics.median(seconds) / items,
        "repeats": len(rates),
    }
    if cpu_seconds:
        out["cpu_ms_per_image_median"] = 1000.0 * statistics.median(cpu_seconds) / items
    return out


# --- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name (Linux /proc/cpuinfo; platform string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions and hardware, for the JSON beside every benchmark result."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "malloc_reuse": _MALLOC_TUNED,
        "env": {k: os.environ.get(k) for k in _ENV_KEYS},
        "gpu": None,
    }
    for dist in ("torch", "torchvision", "kornia", "numpy", "pillow", "nvidia-dali-cuda120"):
        info[dist.replace("-", "_")] = _version(dist)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


_MALLOC_TUNED = False
# Process settings that change CPU timings; recorded beside every result.
_ENV_KEYS = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
)


def reuse_freed_memory() -> bool:
    """The library's allocator setting (augmix_gpu.runtime), recorded in the JSON when applied."""
    global _MALLOC_TUNED
    from augmix_gpu.runtime import reuse_freed_memory as tune

    _MALLOC_TUNED = tune()
    return _MALLOC_TUNED


# --- output -------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def results_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or under ``RESULTS_DIR`` when it is a bare file name."""
    p = Path(path)
    return RESULTS_DIR / p if p.parent == Path(".") else p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (creating folders); a bare file name goes to ``RESULTS_DIR``."""
    p = results_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return p


# --- a photo-like test image -------------------------------------------------------------------


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    from PIL import Image

    grid = rng.uniform(0.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img), 0.0, 1.0)


def photo_like(size: int = 224, seed: int = 0) -> np.ndarray:
    """A procedural landscape, uint8 ``[size, size, 3]``: sky, clouds, sun, ridges, meadow, a tree.

    Smooth gradients, hard and soft edges, fine texture and a natural histogram: what augmentation
    ops meet in photos (uniform noise would hide blur, shifts and rounding). Deterministic.
    """
    rng = np.random.default_rng(seed)
    h = w = size
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    img = np.zeros((h, w, 3), np.float32)
    # sky: deep blue at the top to a pale horizon, clouds from two octaves of noise
    top, horizon = np.array([0.18, 0.35, 0.72]), np.array([0.78, 0.86, 0.95])
    img[:] = top + (horizon - top) * np.clip(y / 0.6, 0, 1)[..., None]
    clouds = 0.6 * _smooth_noise(h, w, 5, rng) + 0.4 * _smooth_noise(h, w, 13, rng)
    img += (np.clip((clouds - 0.55) * 3.0, 0, 1) * np.clip(1 - y / 0.5, 0, 1))[..., None] * 0.5
    sx, sy, sr = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.25), 0.06
    d = np.hypot(x - sx, y - sy)
    img += (
        np.array([1.0, 0.9, 0.6])
        * (np.clip((sr - d) / 0.008, 0, 1) + 0.35 * np.exp(-d / 0.08))[..., None]
    )
    # two mountain ridges from 1-D fractal noise, the far one hazier
    for depth, (base, amp, colour) in enumerate(
        ((0.5, 0.3, (0.45, 0.5, 0.62)), (0.62, 0.16, (0.3, 0.36, 0.3)))
    ):
        profile = 0.65 * _smooth_noise(1, w, 5, rng)[0] + 0.35 * _smooth_noise(1, w, 19, rng)[0]
        ridge = base - amp * profile  # image row of the crest, per column
        inside = np.clip((y - ridge[None, :]) * h / 1.2, 0, 1)[..., None]
        shade = 0.75 + 0.5 * _smooth_noise(h, w, 30, rng)[..., None] * (1.0 if depth else 0.4)
        peak = np.clip((profile - 0.55) * 4.0, 0, 1)[None, :] * (depth == 0)  # snow on high peaks
        snow = (np.clip((ridge[None, :] + 0.06 - y) / 0.02, 0, 1) * peak)[..., None] * 0.4
        img = img * (1 - inside) + (np.array(colour) * shade + snow) * inside
    # meadow with grass texture, and a tree
    meadow = np.clip((y - 0.66) * h / 1.5, 0, 1)[..., None]
    grass = np.array([0.25, 0.5, 0.16]) * (0.7 + 0.6 * _smooth_noise(h, w, 60, rng)[..., None])
    grass = grass * (0.8 + 0.4 * np.clip(y, 0.66, 1.0)[..., None])
    img = img * (1 - meadow) + grass * meadow
    tx = rng.uniform(0.2, 0.8)
    trunk = ((np.abs(x - tx) < 0.018) & (y > 0.55) & (y < 0.8))[..., None]
    img = np.where(trunk, np.array([0.32, 0.2, 0.1]), img)
    crown_d = np.hypot((x - tx) / 0.11, (y - 0.5) / 0.13)
    crown = np.clip((1 - crown_d) * 12, 0, 1)[..., None]
    leaves = np.array([0.12, 0.32, 0.1]) * (0.6 + 0.8 * _smooth_noise(h, w, 40, rng)[..., None])
    img = img * (1 - crown) + leaves * crown
    img += rng.normal(0.0, 0.01, img.shape)  # sensor noise, ~2.5 levels
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
