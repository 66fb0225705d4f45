"""Worker processes for the data makers, started without forking the caller.

The -C maker and the held-out maker run inside the trainer too (``train/data.py``), after CUDA,
NCCL and DALI have started their threads: a forked child inherits their state but not the threads
that own it, and CUDA cannot be used in it at all; a lock held by one of those threads at the
fork stays held forever. ``forkserver`` forks the workers from a small server process started
fresh, so they begin clean.

Its cost is the imports: each worker imports the caller's main module again (as ``spawn`` does;
the main script needs its ``if __name__ == "__main__":`` guard) and whatever its tasks need. The
server imports ``preload`` once and every worker forked from it has them for free (Python 3.11's
server does not preload the main module itself, so torch must be named, or come with a module
that imports it). Only the first pool of a process starts the server: its ``preload`` counts,
with what ``preload_workers`` named before it (the trainer names its three makers' modules).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# named ahead by preload_workers; the server imports them when the first pool starts it
_PRELOAD: list[str] = []


def preload_workers(modules: Sequence[str]) -> None:
    """Have the server import ``modules`` too when the first pool starts it: a caller that opens
    several pools in turn (the trainer: the synthetic set, then its -C and -P sets) names what
    they all need before the first, or each later pool's workers import it again themselves."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def process_pool(workers: int, preload: Sequence[str] = (), **kwargs: Any) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes forked by the forkserver, which has
    imported the modules ``preload`` and ``preload_workers`` name (one that cannot be imported is
    skipped)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*_PRELOAD, *(m for m in preload if m not in _PRELOAD)])
    return ProcessPoolExecutor(workers, mp_context=context, **kwargs)
