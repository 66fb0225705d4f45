"""Input checks shared by the package.

Every check raises ``ValueError`` whose message says what was received and what is expected, so a
wrong call fails at the boundary with a fix instead of deep inside a kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_image_batch",
    "check_in_range",
    "check_int_at_least",
    "check_positive",
]


def check_image_batch(x: object, name: str = "x", *, check_values: bool = True) -> None:
    """Check that ``x`` is an RGB image batch: uint8 ``[B,3,H,W]`` or float ``[B,3,H,W]`` in [0,1].

    Float batches are checked for NaN/inf and range with one fused ``aminmax`` pass and one host
    sync (the only sync it costs); uint8 needs no value check. ``check_values=False`` skips it.
    """
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name}: expected a torch.Tensor image batch [B,3,H,W], got {type(x).__name__}"
        )
    shape = tuple(x.shape)
    if x.dim() != 4:
        hint = ": add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{name}: expected a [B,3,H,W] batch, got shape {shape}{hint}")
    if shape[1] != 3:
        hint = (
            ": the batch looks channels-last, use x.permute(0, 3, 1, 2)"
            if shape[3] == 3
            else ": convert the images to RGB"
        )
        raise ValueError(f"{name}: expected 3 (RGB) channels in dim 1, got shape {shape}{hint}")
    if shape[0] == 0 or shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {shape}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(
            f"{name}: expected dtype uint8 (0..255) or a floating dtype (values in [0,1]), "
            f"got {x.dtype}: convert with x.to(torch.uint8) or x.float() / 255"
        )
    if check_values and x.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{name}: expected finite values in [0,1], got NaN")
        if lo < 0.0 or hi > 1.0:
            hint = ": divide 0..255 images by 255" if hi > 1.0 and math.isfinite(hi) else ""
            raise ValueError(
                f"{name}: expected float values in [0,1], got values in [{lo:g}, {hi:g}]{hint}"
            )


def check_positive(value: float, name: str) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ``ValueError``."""
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_in_range(value: float, name: str, low: float, high: float) -> float:
    """Return ``float(value)`` if ``low <= value <= high``, else raise ``ValueError``."""
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return v


def check_int_at_least(value: int, name: str, minimum: int) -> int:
    """Return ``value`` if it is an int (not bool) ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value
