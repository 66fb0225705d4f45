"""Shared fixtures: natural-looking test images (not uniform noise).

PIL parity is only meaningful on images with smooth regions, edges and texture, where a
half-pixel shift or a wrong rounding shows; uniform noise hides both. ``natural_image`` builds such
an image deterministically from a seed: smooth colour gradients, a few filled shapes with soft
edges, a low-amplitude texture and mild sensor noise, with a value range that does not span 0..255
(so autocontrast and equalize have work to do).

Use the fixtures (``natural_images``), or import the functions: ``from conftest import natural_batch``.

Every test not marked ``cuda`` runs on the CPU, on a GPU machine too (``_cpu_unless_marked_cuda``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Asked once, before any test hides the GPU: the CUDA driver reads CUDA_VISIBLE_DEVICES when it
# starts and torch caches the device count, so a first look made inside a CPU test (where the
# fixture below empties that variable) would hide the GPU from the later `cuda` tests as well.
CUDA_AT_START = torch.cuda.is_available()

# The fused AugMix form's Triton kernels run on the CPU under Triton's interpreter (test_fused.py).
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA_AT_START else "1")


def natural_image(size: int | tuple[int, int] = 64, seed: int = 0) -> np.ndarray:
    """A deterministic natural-looking RGB image, uint8 ``[H, W, 3]``."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    img = np.empty((h, w, 3))
    for ch in range(3):  # smooth background: a linear ramp plus one slow wave per channel
        a, b, c = rng.uniform(-0.35, 0.35, size=3)
        fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        img[..., ch] = (
            0.5
            + a * (xx - 0.5)
            + b * (yy - 0.5)
            + 0.12 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
            + c * 0.2
        )
    for _ in range(rng.integers(3, 6)):  # soft-edged discs and boxes
        colour = rng.uniform(0.05, 0.95, size=3)
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.08, 0.3)
        edge = 1.5 / max(h, w)  # about 1.5 px of anti-aliasing
        if rng.random() < 0.5:
            dist = np.hypot(yy - cy, xx - cx) - r
        else:
            dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx) * rng.uniform(0.5, 2.0)) - r
        alpha = 1.0 / (1.0 + np.exp(dist / edge))
        img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    texture = np.sin(2 * np.pi * (xx * rng.uniform(6, 12) + yy * rng.uniform(6, 12)))
    img += 0.03 * texture[..., None] + rng.normal(0.0, 0.012, size=img.shape)
    lo, hi = rng.uniform(0.03, 0.12), rng.uniform(0.85, 0.95)  # keep off 0 and 255
    img = lo + (hi - lo) * np.clip(img, 0.0, 1.0)
    return np.round(img * 255.0).astype(np.uint8)


def natural_batch(n: int = 4, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    """``n`` different natural-looking images as a uint8 ``[n, 3, H, W]`` tensor."""
    return torch.stack(
        [torch.from_numpy(natural_image(size, seed + i)).permute(2, 0, 1) for i in range(n)]
    ).contiguous()


@pytest.fixture
def natural_images():
    """A factory: ``natural_images(n=4, size=64, seed=0) -> uint8 [n,3,H,W]``."""
    return natural_batch


@pytest.fixture
def natural_image_np():
    """A factory: ``natural_image_np(size=64, seed=0) -> uint8 [H,W,3]`` numpy array (for PIL)."""
    return natural_image


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is faster and does not fight the other test processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Pin every test not marked ``cuda`` to the CPU, so ``make test`` means the same on a GPU
    machine: ``--device auto`` would otherwise train there on CUDA, where cudnn.benchmark and
    atomic adds break the bit-exact resume checks. In this process ``torch.cuda.is_available()``
    says False (the library asks nothing else); subprocesses (train.py, evaluate.py, torchrun)
    inherit an empty CUDA_VISIBLE_DEVICES. The ``cuda`` tests are the only ones on the GPU."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
