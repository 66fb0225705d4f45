"""BatchReader: the files of batch i in order, read ahead on threads while the caller works."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from augmix_gpu.data.reading import BatchReader, read_bytes


def test_batches_in_order_with_sizes_and_unreadable_files_empty(tmp_path):
    from PIL import Image

    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.JPEG"
        Image.new("RGB", (10 + i, 20)).save(p, format="JPEG")
        paths.append(str(p))
    paths.append(str(tmp_path / "missing.JPEG"))
    order = np.array([7, 3, 0, 1, 6, 5, 2, 4])
    reader = BatchReader(paths, order, 3, threads=2, ahead=1, sizes=True)
    try:
        files, sizes = reader.get(0)
        assert [len(f) for f in files] == [0, *(len(read_bytes(paths[i])) for i in (3, 0))]
        assert sizes == [None, (20, 13), (20, 10)]  # the missing file: no bytes, no size
        files, sizes = reader.get(1)
        assert sizes == [(20, 11), (20, 16), (20, 15)]
        assert reader._next == 2  # 2 full batches of 3 out of 8 indices: nothing past the end
    finally:
        reader.close()
    assert len(reader.waits) == 2


def test_reads_overlap_the_callers_work():
    """With a slow filesystem (20 ms per file, sleeping: the GIL is free, as in a real read), a
    caller that works 150 ms per batch never waits after the first read-ahead window."""
    lock, active, peak = threading.Lock(), [0], [0]

    def slow_read(path: str) -> np.ndarray:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return np.frombuffer(path.encode(), dtype=np.uint8)

    paths = [f"f{i}" for i in range(48)]
    reader = BatchReader(paths, np.arange(48), 8, threads=8, ahead=2, sizes=False, read=slow_read)
    try:
        for i in range(6):
            files, _ = reader.get(i)
            assert [f.tobytes().decode() for f in files] == paths[8 * i : 8 * (i + 1)]
            time.sleep(0.15)  # the caller's "training step"
    finally:
        reader.close()
    assert peak[0] > 4  # reads run concurrently
    assert reader.waits[0] > 0.01  # the first batch is read on demand...
    assert max(reader.waits[1:]) < 0.05, reader.waits  # ...the rest was ready (inline: 0.16 s)


def test_bad_arguments():
    with pytest.raises(ValueError, match="read threads must be >= 1"):
        BatchReader([], np.arange(0), 1, threads=0, ahead=1, sizes=False)
    with pytest.raises(ValueError, match="read-ahead must be >= 0"):
        BatchReader([], np.arange(0), 1, threads=1, ahead=-1, sizes=False)
