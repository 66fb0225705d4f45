"""The official CIFAR recipe: its learning-rate curve, and the preset that resolves to it."""

from __future__ import annotations

import math

import pytest

from augmix_gpu.engine import lr_factor


def official_get_lr(step: int, total_steps: int, lr_max: float, lr_min: float) -> float:
    """google-research/augmix cifar.py's `get_lr`, as its formula reads (the test's reference)."""
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(step / total_steps * math.pi))


def preset_lr(step: int, steps_per_epoch: int, epochs: int, lr: float = 0.1) -> float:
    """The project's cosine with the preset's keys: per step, floor 1e-5 x lr, no warm-up."""
    factor = lr_factor(
        step,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        schedule="cosine",
        warmup_epochs=0.0,
        min_factor=1e-5,
        per_epoch=False,
    )
    return lr * factor


def test_cosine_with_floor_is_the_official_per_step_get_lr():
    # cifar.py: LambdaLR(get_lr(step, epochs * len(loader), 1, 1e-6 / lr)), stepped per batch,
    # i.e. lr(step) = get_lr(step, total, lr, 1e-6). 390 steps: 50,000 images, batch 128.
    spe, epochs = 390, 100
    total = spe * epochs
    for step in (0, 1, 2, 389, 390, 12_345, total // 2, total - 1, total):
        assert preset_lr(step, spe, epochs) == pytest.approx(
            official_get_lr(step, total, 0.1, 1e-6), rel=1e-12, abs=1e-18
        ), step
    assert preset_lr(0, spe, epochs) == 0.1
    assert preset_lr(total // 2, spe, epochs) == pytest.approx((0.1 + 1e-6) / 2, rel=1e-12)
    assert preset_lr(total, spe, epochs) == pytest.approx(1e-6, rel=1e-9)
    assert preset_lr(total + 500, spe, epochs) == pytest.approx(1e-6, rel=1e-9)  # held
    # It moves every step (not per epoch), and never rises.
    curve = [preset_lr(s, spe, epochs) for s in range(0, total + 1, 97)]
    assert all(a > b for a, b in zip(curve, curve[1:]))
    # The floor is a ratio: lr 0.2 ends at 2e-6 (cifar.py would end at 1e-6 for any lr).
    assert preset_lr(total, spe, epochs, lr=0.2) == pytest.approx(2e-6, rel=1e-9)
