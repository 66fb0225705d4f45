"""File reads off the training thread: a thread pool reads each batch's files ahead of DALI.

Why: DALI calls a (non-parallel) `external_source` callback inside `pipe.run()`, on the thread
that trains. Reading 256 files there (and, for train crops, parsing their headers) stalls the step
by the full I/O latency: small on a warm local disk, milliseconds per file on a network
filesystem. Here `BatchReader.get(i)` returns batch `i`'s bytes, read by `threads` worker threads
while the earlier batches were decoded and trained on; the reads for batches `i+1 .. i+ahead` are
already queued when it returns. `waits` holds how long the caller still had to wait, per batch.

Why threads and not DALI's `parallel=True` process workers: reads release the GIL (the header
parse holds it for ~2 us per JPEG), so threads overlap I/O as well as processes do, and they
start in microseconds. DALI's workers are per pipeline (we build one per epoch, and one per
ImageNet-C folder: 75 per evaluation), cannot be forked once CUDA is initialised (the trainer's
case) and would have to be spawned, importing torch and pickling the 1.28M paths, on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .crops import encoded_size

EMPTY = np.empty(0, dtype=np.uint8)


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as uint8 [n]; an unreadable file gives 0 bytes, which the decoder rejects
    (the loader then names the file with the reason, see `DaliLoader._find_corrupt`)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return EMPTY


class BatchReader:
    """Reads batch `i` (`indices[i*bs:(i+1)*bs]` of `paths`) on threads, `ahead` batches early.

    `sizes=True` also parses each file's `(height, width)` from its header in the same worker
    (train crop windows; None when the header cannot be read). Batches must be requested in
    increasing order (DALI's callbacks are). `close()` cancels what is still queued.
    """

    def __init__(
        self,
        paths: Sequence[str],
        indices: np.ndarray,
        batch_size: int,
        *,
        threads: int,
        ahead: int,
        sizes: bool,
        read: Callable[[str], np.ndarray] = read_bytes,
    ) -> None:
        if threads < 1:
            raise ValueError(f"read threads must be >= 1, got {threads}")
        if ahead < 0:
            raise ValueError(f"read-ahead must be >= 0 batches, got {ahead}")
        self._paths, self._indices, self._bs = paths, indices, int(batch_size)
        self._steps = len(indices) // self._bs
        self._threads, self._ahead, self._sizes, self._read = int(threads), int(ahead), sizes, read
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="reader")
        self._pending: dict[int, list[Future]] = {}
        self._next = 0  # the next batch to submit
        self.waits: list[float] = []  # per batch: how long `get` blocked on unfinished reads

    def _chunk(self, names: list[str]) -> tuple[list[np.ndarray], list]:
        files = [self._read(p) for p in names]
        return files, [encoded_size(f) for f in files] if self._sizes else []

    def _submit(self, upto: int) -> None:
        while self._next <= min(upto, self._steps - 1):
            batch = self._indices[self._next * self._bs : (self._next + 1) * self._bs]
            names = [self._paths[i] for i in batch]
            # One task per thread and batch: a few futures per batch, all threads busy.
            per = -(-len(names) // self._threads)
            self._pending[self._next] = [
                self._pool.submit(self._chunk, names[k : k + per])
                for k in range(0, len(names), per)
            ]
            self._next += 1

    def get(self, i: int) -> tuple[list[np.ndarray], list]:
        """Batch `i`'s encoded files (and header sizes when `sizes=True`)."""
        self._submit(i + self._ahead)
        futures = self._pending.pop(i)
        start = time.perf_counter()
        parts = [f.result() for f in futures]
        self.waits.append(time.perf_counter() - start)
        files = [x for part in parts for x in part[0]]
        sizes = [x for part in parts for x in part[1]]
        return files, sizes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()
