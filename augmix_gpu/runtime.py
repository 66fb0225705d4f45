"""Process settings that decide CPU speed: measured, not folklore.

On a CPU shared with other processes two defaults cost AugMix most of its speed (measured on this
project's 2-core machine; see benchmarks/bench_augment.py): OpenMP threads that spin while idle
(``OMP_WAIT_POLICY=ACTIVE`` behaviour, 10x fewer images/s under load) and glibc returning every
large freed block to the OS (2-3x). train.py applies both on the CPU; GPUs are unaffected.

The library applies the second itself: ``AugMixBatch`` calls ``tune_for_cpu_augmentation`` on its
first call with CPU tensors, so a plain script is as fast as train.py. Opt out with the
environment variable ``AUGMIX_GPU_DEFAULT_MALLOC=1`` or ``runtime.AUTO_REUSE_FREED_MEMORY = False``
before that call. The first must be set before torch is imported, so only train.py (and a user's
own launcher) can apply it.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

# The training precisions (flag values) and the autocast dtype of each (None: fp32, no autocast).
PRECISIONS = ("32", "16", "bf16")

# AugMixBatch's first CPU call applies reuse_freed_memory() unless this is False or the
# environment has AUGMIX_GPU_DEFAULT_MALLOC=1.
AUTO_REUSE_FREED_MEMORY = True
_tuned: bool | None = None  # None: not tried yet; else what reuse_freed_memory returned


def prefer_passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning. Must run before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def reuse_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    Batched CPU augmentation allocates tens to hundreds of MB per call. glibc serves blocks above
    its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and unmaps them on free, so every
    call pays page faults and zeroing for all of them: measured here, a 2-3x slowdown of
    AugMixBatch on the CPU. Raising the mmap threshold and the trim threshold (the same as
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment) keeps the pages.
    Process-wide and inherited by forked workers. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    )
    return ok


def tune_for_cpu_augmentation() -> bool:
    """Apply ``reuse_freed_memory`` once per process, unless opted out; True if it is in effect.

    Process-wide: freed memory stays with the process for reuse (its resident size stays at its
    peak) instead of going back to the OS after every call.
    """
    global _tuned
    if _tuned is None:
        opted_out = os.environ.get("AUGMIX_GPU_DEFAULT_MALLOC", "") not in ("", "0")
        _tuned = False if opted_out or not AUTO_REUSE_FREED_MEMORY else reuse_freed_memory()
    return _tuned


def amp_dtype(precision: str) -> Any:
    """``"32"`` -> None, ``"16"`` -> ``torch.float16``, ``"bf16"`` -> ``torch.bfloat16``.

    torch is imported here, not at module level: this module must be importable before torch
    (``prefer_passive_openmp``)."""
    import torch

    table = {"32": None, "16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return table[precision]
