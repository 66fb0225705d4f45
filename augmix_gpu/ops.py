"""The AugMix op table: each of the 13 ops declared once, batched over samples.

Every op maps float images ``x [N,3,H,W]`` in [0,1] and a per-sample parameter ``param [N]``
(sign included) to ``[N,3,H,W]`` in [0,1]. Semantics follow google-research/augmix
``augmentations.py`` (PIL ops on uint8, one image at a time) with two deliberate changes:

* magnitudes are continuous (``level * max / 10``, no ``int()``), so they carry a gradient;
* values are not re-quantised to uint8 between ops (PIL rounds after every op).

Parity with PIL at PIL's own (integer) parameters is pinned by ``tests/test_ops.py``.

Where Kornia's functional layer matches PIL we call it (``color``: grey blend with
L = 0.299R + 0.587G + 0.114B). We write our own where it deviates or is slow: Kornia's brightness is
additive (PIL multiplies), its posterize takes integer bits only, its equalize truncates ``x*255``
(we round, as a uint8 image would be) and has no gradient path, ``warp_affine`` cannot express
PIL's "clamp inside, fill 0 outside" sampling, and its sharpness (which matches PIL) costs ~5x
a separable box sum on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kornia.enhance as KE
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AUGMENTATIONS",
    "AUGMENTATIONS_ALL",
    "GRADIENT_KINDS",
    "OPS",
    "Op",
    "SOLARIZE_TEMPERATURE",
    "get_ops",
    "warp_affine",
]

# Inputs that came from uint8 sit exactly on k/255; comparisons at a threshold are made with this
# margin (in 0..255 units) so that float rounding of k/255*255 cannot flip PIL's integer decision.
_TIE_MARGIN = 1e-3
# Temperature of the solarize relaxation, in 0..255 units: pixels within a few levels of the
# threshold carry the gradient. Smaller is closer to the hard op but noisier.
SOLARIZE_TEMPERATURE = 4.0


@dataclass(frozen=True)
class Op:
    """One AugMix op: its batched function and how its magnitude is defined.

    ``parameter(level) = level * max_param / 10 + offset`` (official ``float_parameter``; the
    official ``int_parameter`` truncates, we do not). ``gradient`` says how d(output)/d(param)
    is obtained: ``"exact"``, ``"straight_through"`` (exact forward, surrogate backward) or
    ``"none"`` (the op has no magnitude).
    """

    name: str
    apply: Callable[[Tensor, Tensor], Tensor]
    max_param: float | None
    signed: bool
    overlaps_imagenet_c: bool
    gradient: str
    affine: Callable[[Tensor, int, int], Tensor] | None = None
    offset: float = 0.0

    def parameter(self, level: Tensor) -> Tensor:
        """Map ``level`` (0..10 scale, any shape) to this op's parameter, continuously."""
        if self.max_param is None:
            return torch.zeros_like(level)
        return level * (self.max_param / 10.0) + self.offset


def _col(p: Tensor, x: Tensor) -> Tensor:
    """Per-sample parameter ``[N]`` as ``[N,1,1,1]`` in ``x``'s dtype, for broadcasting."""
    return p.to(dtype=x.dtype).reshape(-1, 1, 1, 1)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value of ``hard``, gradient of ``soft``."""
    return soft + (hard - soft).detach()


# ---------------------------------------------------------------------------------------------
# Histogram / lookup ops (PIL ImageOps)
# ---------------------------------------------------------------------------------------------


def _clamp01(t: Tensor) -> Tensor:
    """Clamp to [0, 1], in place when no gradient is tracked (one allocation fewer)."""
    return t.clamp(0.0, 1.0) if _needs_grad(t) else t.clamp_(0.0, 1.0)


# Full-size ``torch.where`` and ``masked_fill_`` cost 2-7x an arithmetic pass on the CPU, so the
# ops below select with per-channel scale/offset, lookup tables or float masks instead.


def autocontrast(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel's [min, max] to [0, 1].

    PIL truncates ``(v - lo) * 255 / (hi - lo)`` to an integer; we keep it continuous, so the
    result is above PIL's by less than 1/255. A flat channel (``hi <= lo``) is left unchanged.
    """
    del param  # no magnitude
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    flat = span <= 0
    scale = torch.where(
        flat, torch.ones_like(span), 1.0 / torch.where(flat, torch.ones_like(span), span)
    )
    offset = torch.where(flat, torch.zeros_like(lo), -lo * scale)
    return _clamp01(torch.addcmul(offset, x, scale))


def equalize(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize``: per-(sample, channel) 256-bin histogram equalisation.

    Values are rounded to their 8-bit level first (as a uint8 image would be). PIL's lookup:
    ``step = (count - count_of_last_nonzero_bin) // 255``; ``lut[i] = (step//2 + cdf_excl[i]) // step``
    clipped to 255; the identity when ``step == 0`` (then our output is ``x`` rounded to a level).
    Backward: straight-through identity in ``x``, so a gradient from earlier ops in the chain
    passes (the op itself has no magnitude).
    """
    del param
    n, c, h, w = x.shape
    levels = (x.detach() * 255.0 + 0.5).floor_().clamp_(0, 255).long().reshape(n * c, h * w)
    counts = torch.zeros(n * c, 256, dtype=torch.float32, device=x.device)
    # float32 counts are exact up to 2**24 pixels per channel (4096 x 4096).
    ones = torch.ones((), dtype=torch.float32, device=x.device).expand_as(levels)
    counts.scatter_add_(1, levels, ones)
    bins = torch.arange(256, device=x.device)
    last_bin = torch.where(counts > 0, bins, torch.zeros_like(bins)).amax(dim=1, keepdim=True)
    step = torch.div(h * w - counts.gather(1, last_bin), 255, rounding_mode="floor")  # [n*c, 1]
    cdf_excl = counts.cumsum(dim=1) - counts
    half = torch.div(step, 2, rounding_mode="floor")
    lut = torch.div(cdf_excl + half, step.clamp_min(1), rounding_mode="floor").clamp_max_(255.0)
    lut = torch.where(step == 0, bins.to(lut.dtype), lut).to(x.dtype).div_(255.0)  # [n*c, 256]
    hard = lut.gather(1, levels).reshape(n, c, h, w)
    return _straight_through(hard, x) if _needs_grad(x) else hard


def posterize(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.posterize`` keeping ``4 - param`` bits (param = official int_parameter(l, 4)).

    Continuous bits: quantisation step ``2**(4 + param)`` levels (of 255), equal to PIL's
    ``v & ~(2**(8-bits) - 1)`` at integer bits; bits = 0 (param 4) gives black, as older PIL did.
    Backward (straight-through): the surrogate ``x - step/2`` is the expectation of the hard op
    over the position of ``x`` within its bin (E[x - step*floor(x/step)] = step/2), so
    d out/d step = -1/2 per pixel and d out/d x = 1.
    """
    step = torch.exp2(4.0 + _col(param, x))  # in 0..255 units
    sd = step.detach()
    # floor((255 x + margin) / step) * step / 255, as one fused multiply-add, floor, multiply
    hard = torch.addcmul(_TIE_MARGIN / sd, x.detach(), 255.0 / sd).floor_().mul_(sd / 255.0)
    if not _needs_grad(x, step):
        return hard
    soft = x - step / (2.0 * 255.0)
    return _straight_through(hard, soft)


def solarize(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.solarize`` at threshold ``256 - param`` (0..255 units): v < t stays, else 255 - v.

    Backward (straight-through): a sigmoid relaxation of the threshold,
    ``soft = x + sigmoid((255 x - t) / T) * (1 - 2x)`` with ``T = SOLARIZE_TEMPERATURE`` levels.
    """
    t = 256.0 - _col(param, x)  # threshold in 0..255 units
    xd = x.detach()
    inverted = torch.ge(xd, (t.detach() - _TIE_MARGIN) / 255.0).to(x.dtype)
    hard = torch.sub(xd, inverted).abs_()  # x where kept, 1 - x where inverted (x in [0,1])
    if not _needs_grad(x, t):
        return hard
    gate = torch.sigmoid((x * 255.0 - t) / SOLARIZE_TEMPERATURE)
    soft = x + gate * (1.0 - 2.0 * x)
    return _straight_through(hard, soft)


# ---------------------------------------------------------------------------------------------
# Geometric ops: PIL AFFINE matrices, one shared warp
# ---------------------------------------------------------------------------------------------


def warp_affine(x: Tensor, matrix: Tensor) -> Tensor:
    """Warp ``x [N,C,H,W]`` by per-sample PIL AFFINE matrices ``[N,2,3]``, bilinear, fill 0.

    PIL's convention: output pixel (i, j) samples the input at ``matrix @ (j+0.5, i+0.5, 1)``
    (pixel units, origin at the top-left corner); a point outside [0,W) x [0,H) gets the fill 0,
    a point inside is interpolated with neighbour indices clamped to the edge. That is
    ``grid_sample(padding_mode="border", align_corners=False)`` with the outside set to 0.
    Differentiable in ``matrix`` and ``x``.
    """
    n, c, h, w = x.shape
    m = matrix.to(x.dtype)
    a, b, tx = m[:, 0, 0, None, None], m[:, 0, 1, None, None], m[:, 0, 2, None, None]
    d, e, ty = m[:, 1, 0, None, None], m[:, 1, 1, None, None], m[:, 1, 2, None, None]
    # Normalised coordinates (align_corners=False): g = 2 q / size - 1 for a point q in pixels.
    # Pixel centres of the output, in pixels: px = j + 0.5 along a row, py = i + 0.5 down a column.
    px = torch.arange(w, dtype=x.dtype, device=x.device).add_(0.5).view(1, 1, w)
    py = torch.arange(h, dtype=x.dtype, device=x.device).add_(0.5).view(1, h, 1)
    # The grid is built by broadcasting a [N,1,W] row term and a [N,H,1] column term (one pass
    # over [N,H,W] per coordinate; F.affine_grid's batched matmul is ~3x slower on the CPU).
    row_x, col_x = (2.0 / w) * (a * px + tx) - 1.0, (2.0 / w) * (b * py)
    row_y, col_y = (2.0 / h) * (d * px + ty) - 1.0, (2.0 / h) * (e * py)
    if _needs_grad(m):
        grid = torch.stack((row_x + col_x, row_y + col_y), dim=-1)
    else:  # write both coordinates in place: saves a pass over the grid
        grid = torch.empty((n, h, w, 2), dtype=x.dtype, device=x.device)
        torch.add(row_x, col_x, out=grid[..., 0])
        torch.add(row_y, col_y, out=grid[..., 1])
    gx, gy = grid[..., 0], grid[..., 1]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gx, gy = gx.detach(), gy.detach()
    # PIL fills unless 0 <= q < size, i.e. -1 <= g < 1 (a float mask: 3x cheaper than masked_fill_).
    inside = (gx >= -1.0) & (gx < 1.0) & (gy >= -1.0) & (gy < 1.0)
    return out.mul_(inside.unsqueeze(1).to(x.dtype))


def _affine(rows: tuple[Tensor, ...]) -> Tensor:
    """Six ``[N]`` tensors (a, b, c, d, e, f) -> ``[N,2,3]``."""
    return torch.stack(rows, dim=-1).reshape(-1, 2, 3)


def _rotate_affine(deg: Tensor, h: int, w: int) -> Tensor:
    """PIL ``Image.rotate(deg)``: counter-clockwise about the centre (W/2, H/2), no expand."""
    r = torch.deg2rad(-deg)
    cos, sin = torch.cos(r), torch.sin(r)
    cx, cy = w / 2.0, h / 2.0
    return _affine((cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def _shear_x_affine(s: Tensor, h: int, w: int) -> Tensor:
    """PIL AFFINE (1, s, 0, 0, 1, 0): origin at the top-left corner, as the official code."""
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _affine((one, s, zero, zero, one, zero))


def _shear_y_affine(s: Tensor, h: int, w: int) -> Tensor:
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _affine((one, zero, zero, s, one, zero))


def _translate_x_affine(frac: Tensor, h: int, w: int) -> Tensor:
    """PIL AFFINE (1, 0, frac*W, 0, 1, 0): a positive parameter moves the content left."""
    one, zero = torch.ones_like(frac), torch.zeros_like(frac)
    return _affine((one, zero, frac * w, zero, one, zero))


def _translate_y_affine(frac: Tensor, h: int, w: int) -> Tensor:
    one, zero = torch.ones_like(frac), torch.zeros_like(frac)
    return _affine((one, zero, zero, zero, one, frac * h))


def _warp_op(affine: Callable[[Tensor, int, int], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def apply(x: Tensor, param: Tensor) -> Tensor:
        return warp_affine(x, affine(param.to(x.dtype), x.shape[-2], x.shape[-1]))

    apply.__doc__ = affine.__doc__
    return apply


# ---------------------------------------------------------------------------------------------
# Enhance ops (PIL ImageEnhance): blend with a degenerate image, factor = level*1.8/10 + 0.1
# ---------------------------------------------------------------------------------------------


def color(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Color``: blend with the grey L = 0.299R + 0.587G + 0.114B (Kornia)."""
    return KE.adjust_saturation_with_gray_subtraction(x, factor.to(x.dtype))


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the constant mean of L, rounded to a level."""
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    mean = mean + (torch.floor(mean.detach() * 255.0 + 0.5) / 255.0 - mean.detach())
    f = _col(factor, x)
    return (mean + f * (x - mean)).clamp(0.0, 1.0)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black, i.e. ``factor * x`` clipped."""
    return (x * _col(factor, x)).clamp(0.0, 1.0)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with SMOOTH ([[1,1,1],[1,5,1],[1,1,1]]/13), border kept.

    SMOOTH = (box3x3 sum + 4 * centre) / 13 with the box sum separable (4 shifted adds): the same
    result as Kornia's depthwise conv + masks at ~5x less CPU time. PIL leaves the 1-pixel border
    unfiltered, so the blend leaves it unchanged.
    """
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.clone()
    inner = x[..., 1:-1, 1:-1]
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = torch.add(box, inner, alpha=4.0).div_(13.0).clamp(0.0, 1.0)
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.lerp(smooth, inner, _col(factor, x)).clamp(0.0, 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# The table (official order: augmentations.py ``augmentations_all``)
# ---------------------------------------------------------------------------------------------

_ENHANCE_MAX, _ENHANCE_OFFSET = 1.8, 0.1  # factor = float_parameter(level, 1.8) + 0.1

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("autocontrast", autocontrast, None, False, False, "none"),
        Op("equalize", equalize, None, False, False, "none"),
        # bits removed (keep 4 - param bits); official: 4 - int_parameter(level, 4)
        Op("posterize", posterize, 4.0, False, False, "straight_through"),
        # degrees, counter-clockwise; official: int_parameter(level, 30)
        Op("rotate", _warp_op(_rotate_affine), 30.0, True, False, "exact", _rotate_affine),
        # threshold = 256 - param (0..255 units); official: int_parameter(level, 256)
        Op("solarize", solarize, 256.0, False, False, "straight_through"),
        Op("shear_x", _warp_op(_shear_x_affine), 0.3, True, False, "exact", _shear_x_affine),
        Op("shear_y", _warp_op(_shear_y_affine), 0.3, True, False, "exact", _shear_y_affine),
        # fraction of the width/height; official: int_parameter(level, IMAGE_SIZE / 3) pixels
        Op(
            "translate_x",
            _warp_op(_translate_x_affine),
            1.0 / 3.0,
            True,
            False,
            "exact",
            _translate_x_affine,
        ),
        Op(
            "translate_y",
            _warp_op(_translate_y_affine),
            1.0 / 3.0,
            True,
            False,
            "exact",
            _translate_y_affine,
        ),
        Op("color", color, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("contrast", contrast, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("brightness", brightness, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("sharpness", sharpness, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
    )
}

AUGMENTATIONS: tuple[str, ...] = tuple(n for n, op in OPS.items() if not op.overlaps_imagenet_c)
AUGMENTATIONS_ALL: tuple[str, ...] = tuple(OPS)

GRADIENT_KINDS = ("exact", "straight_through", "none")


def get_ops(all_ops: bool = False) -> tuple[Op, ...]:
    """The op tuple AugMix draws from: the paper's 9, or all 13 with ``all_ops``."""
    return tuple(OPS[n] for n in (AUGMENTATIONS_ALL if all_ops else AUGMENTATIONS))
