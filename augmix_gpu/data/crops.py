"""Random-resized-crop windows drawn on the host, so a train batch is a pure function of its step.

DALI's `decoders.image_random_crop` draws windows from the pipeline's own RNG stream: a pipeline
rebuilt at step k (a resumed run) cannot replay the windows the uninterrupted run drew there. We
draw them here instead, per batch, from `numpy.random.default_rng([seed, epoch, rank, step])`,
with torchvision's `RandomResizedCrop.get_params` algorithm (10 attempts at an area in `area` x the
image and a log-uniform aspect in `ratio`, then the centre-crop fallback), and hand them to DALI's
ROI decoder (`decoders.image_slice`). Same windows on the CPU and GPU paths, at any thread count.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

ATTEMPTS = 10  # torchvision's get_params


# The window given to a file whose header cannot be read: out of bounds, so DALI's decoder fails
# on it and the loader names the file (torchvision's PIL loader could not open it either).
UNREADABLE_WINDOW = (-1, -1, 1, 1)


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic):
# C0-CF except DHT (C4), JPG (C8) and DAC (CC). Their payload starts with precision, height, width.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's start-of-frame segment, or None if it is not found.

    Why not PIL: ``Image.open`` costs ~30x more per file (~45 vs ~1.5 us: plugin probing, EXIF),
    and the train loader sizes every file of every batch. The segments before the frame header
    (APPn, DQT, DHT, COM...) are skipped by their lengths; fill bytes and parameterless markers
    are stepped over. Anything unexpected returns None and the caller asks PIL.
    """
    b = memoryview(data).cast("B")
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i = 2
    while i + 3 < n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # TEM, SOI, RSTn: no length
            i += 2
        elif marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            return None
        elif marker in _SOF:
            if i + 9 > n:
                return None
            height, width = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            return (height, width) if height and width else None  # 0: defined later (DNL)
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def encoded_size(data: np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` from an encoded image's header, or None if neither we nor PIL can
    read it (the file is then treated as corrupt).

    JPEGs by `jpeg_size` (whatever the file's extension says), anything else, and JPEGs it cannot
    parse, by PIL (header only). EXIF orientation is ignored, as by PIL/torchvision and by our
    decoders (``adjust_orientation=False``).
    """
    size = jpeg_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            width, height = im.size
    except Exception:  # any header PIL cannot parse: the caller treats the file as corrupt
        return None
    return height, width


def random_resized_crops(
    sizes: np.ndarray,
    rng: np.random.Generator,
    area: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """Windows ``[B, 4]`` int32 as ``(x, y, w, h)`` for images of ``sizes [B, 2]`` = (height, width).

    torchvision's algorithm, vectorised over the batch: the first of ``ATTEMPTS`` draws that fits
    wins, its position uniform over the valid ones; if none fits, the largest centred window whose
    aspect is clamped into ``ratio``.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    height, width = sizes[:, :1], sizes[:, 1:]
    b = len(sizes)
    target = (height * width) * rng.uniform(area[0], area[1], size=(b, ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(b, ATTEMPTS)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: Python's round, half to even
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(b)
    w, h = w[rows, first], h[rows, first]
    ok = fits[rows, first]

    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fw = np.where(in_ratio > hi, np.rint(height * hi), width).astype(np.int64)
    fh = np.where(in_ratio < lo, np.rint(width / lo), height).astype(np.int64)
    w, h = np.where(ok, w, fw), np.where(ok, h, fh)

    u = rng.uniform(size=(b, 2))
    y = np.where(ok, np.floor(u[:, 0] * (height - h + 1)), (height - h) // 2)
    x = np.where(ok, np.floor(u[:, 1] * (width - w + 1)), (width - w) // 2)
    return np.stack([x, y, w, h], axis=1).astype(np.int32)
