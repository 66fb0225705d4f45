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


def encoded_size(data: np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` from an encoded image's header (PIL reads the header only), or None.

    EXIF orientation is ignored, as by PIL/torchvision and by our decoders
    (``adjust_orientation=False``).
    """
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
