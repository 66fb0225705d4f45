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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kornia.enhance as KE
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AFFINE_TERMS",
    "AUGMENTATIONS",
    "AUGMENTATIONS_ALL",
    "GRADIENT_KINDS",
    "OPS",
    "Op",
    "SOLARIZE_TEMPERATURE",
    "get_ops",
    "pil_affine",
    "warp_affine",
]

# Inputs that came from uint8 sit exactly on k/255; comparisons at a threshold are made with this
# margin (in 0..255 units) so that float rounding of k/255*255 cannot flip PIL's integer decision.
_TIE_MARGIN = 1e-3
# Temperature of the solarize relaxation, in 0..255 units: pixels within a few levels of the
# threshold carry the gradient. Smaller is closer to the hard op but noisier.
SOLARIZE_TEMPERATURE = 4.0


# ``Op.official`` as a code in the magnitude tables (execute.op_tables, read by the kernels too):
# 0 none (float_parameter), 1 whole units, -1 / -2 whole pixels of the width / height.
OFFICIAL_CODES = {"float": 0.0, "int": 1.0, "width": -1.0, "height": -2.0}


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
    affine_term: int | None = None  # geometric ops: the AFFINE_TERMS entry the parameter sets
    # Optional split apply(x, param) = kernel(x, coefficient(param)): the per-sample work that
    # depends on the parameter only, so AugMixBatch computes it once per call for every step.
    coefficient: Callable[[Tensor], Tensor] | None = None
    kernel: Callable[[Tensor, Tensor], Tensor] | None = None
    # prepare(0) makes apply_prepared the exact identity on [0,1] (no gradient tracked)
    identity_at_zero: bool = False
    # How the official code maps a level to this op's parameter: "float" (float_parameter, as
    # ours), "int" (int_parameter: truncated to whole units of the parameter: degrees, bits,
    # levels) or "width" / "height" (int_parameter of a translation in whole pixels of that side).
    official: str = "float"

    def parameter(self, level: Tensor) -> Tensor:
        """Map ``level`` (0..10 scale, any shape) to this op's parameter, continuously."""
        if self.max_param is None:
            return torch.zeros_like(level)
        return level * (self.max_param / 10.0) + self.offset

    def official_parameter(self, level: Tensor, h: int, w: int) -> Tensor:
        """The official code's parameter at ``level`` on an ``h x w`` image (``levels="official"``):
        ``int_parameter`` truncates ``level * max / 10`` to whole units (``self.official``)."""
        unit = {"int": 1, "width": w, "height": h}.get(self.official)
        if self.max_param is None or unit is None:
            return self.parameter(level)
        return torch.trunc(level * (self.max_param / 10.0) * unit) / unit + self.offset

    def prepare(self, param: Tensor) -> Tensor:
        """The per-sample coefficient ``apply_prepared`` takes (the parameter itself by default)."""
        return param if self.coefficient is None else self.coefficient(param)

    def apply_prepared(self, x: Tensor, coef: Tensor) -> Tensor:
        """``apply(x, param)`` given ``coef = prepare(param)``."""
        return self.apply(x, coef) if self.kernel is None else self.kernel(x, coef)


def _col(p: Tensor, x: Tensor) -> Tensor:
    """Per-sample parameter ``[N]`` as ``[N,1,1,1]`` in ``x``'s dtype, for broadcasting."""
    return p.to(dtype=x.dtype).reshape(-1, 1, 1, 1)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _StraightThrough(torch.autograd.Function):
    """``hard`` forward, the gradient of ``soft`` backward, without arithmetic (the usual
    ``soft + (hard - soft).detach()`` costs two passes and rounds the value)."""

    @staticmethod
    def forward(ctx, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.view_as(hard)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value of ``hard``, gradient of ``soft``."""
    return _StraightThrough.apply(hard.detach(), soft)


# ---------------------------------------------------------------------------------------------
# Histogram / lookup ops (PIL ImageOps)
# ---------------------------------------------------------------------------------------------


# Full-size ``torch.where`` and ``masked_fill_`` cost 2-7x an arithmetic pass on the CPU, so the
# ops below select with per-channel scale/offset, lookup tables or float masks instead.


def autocontrast(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel's [min, max] to [0, 1].

    PIL truncates ``(v - lo) * 255 / (hi - lo)`` to an integer; we keep it continuous, so the
    result is above PIL's by less than 1/255. A flat channel (``hi <= lo``) is left unchanged:
    its ``lo`` is taken as 0 and its span as 1, so the map is the identity there.
    Backward: the stretch (``lo``, ``1 / span``) is a constant, as equalize's lookup table is
    (in PIL's 8-bit ops both are piecewise constant in the image); the exact derivative through
    min/max would reach only each channel's darkest and brightest pixel.
    """
    del param  # no magnitude
    flat_x = x.detach().flatten(2)
    lo, hi = flat_x.amin(dim=-1), flat_x.amax(dim=-1)  # [N, C]; aminmax is 7x slower on the CPU
    span = hi - lo
    flat = span <= 0
    span = span.add_(flat)[..., None, None]
    # lo <= x <= hi, and rounding is monotonic: the quotient is in [0, 1] without a clamp
    return torch.sub(x, lo.masked_fill_(flat, 0.0)[..., None, None]).div_(span)


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
    # round half up to a level (x in [0,1], so the truncating cast is a floor)
    levels = x.detach().reshape(n * c, h * w).mul(255.0).add_(0.5).long()
    # float32 counts are exact up to 2**24 pixels per channel (4096 x 4096).
    counts = torch.zeros(n * c, 256, dtype=torch.float32, device=x.device)
    ones = torch.ones((), dtype=torch.float32, device=x.device).expand_as(levels)
    counts.scatter_add_(1, levels, ones)  # 10x faster on the CPU than scatter_(reduce="add")
    cdf_excl = counts.cumsum(dim=1).sub_(counts)  # pixels below each level
    # count minus the count of the last non-empty bin = the pixels below the highest level used
    step = cdf_excl.gather(1, levels.amax(dim=1, keepdim=True)).div_(255, rounding_mode="floor")
    # PIL's (cdf_excl + step // 2) // step, in integers; equal to floor((cdf_excl + step / 2) / step)
    lut = torch.div(cdf_excl.add_(step, alpha=0.5), step, rounding_mode="floor")
    lut = lut.clamp_max_(255.0)  # inf/nan at step 0:
    bins = torch.arange(256, dtype=lut.dtype, device=x.device)  # replaced by the identity here
    lut = torch.where(step > 0, lut, bins).div_(255.0).to(x.dtype)  # [n*c, 256]
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
    return _posterize_kernel(x, _posterize_step(param))


def _posterize_step(param: Tensor) -> Tensor:
    """``posterize``'s coefficients ``[..., 3]``: the quantisation step in [0,1] units,
    ``2**(4 + param) / 255`` (with its gradient), its reciprocal and the tie margin over it."""
    step = torch.exp2(param + 4.0) / 255.0
    inv = step.detach().reciprocal()
    return torch.stack((step, inv, inv * (_TIE_MARGIN / 255.0)), dim=-1)


def _posterize_kernel(x: Tensor, coef: Tensor) -> Tensor:
    step, inv, offset = (_col(c, x) for c in coef.unbind(-1))
    # floor((255 x + margin) / (255 step)) * step, as one multiply-add, floor, multiply
    hard = torch.addcmul(offset, x.detach(), inv).floor_().mul_(step.detach())
    if not _needs_grad(x, step):
        return hard
    return _straight_through(hard, torch.sub(x, step, alpha=0.5))


def solarize(x: Tensor, param: Tensor) -> Tensor:
    """PIL ``ImageOps.solarize`` at threshold ``256 - param`` (0..255 units): v < t stays, else 255 - v.

    Backward (straight-through): a sigmoid relaxation of the threshold,
    ``soft = x + sigmoid((255 x - t) / T) * (1 - 2x)`` with ``T = SOLARIZE_TEMPERATURE`` levels.
    """
    return _solarize_kernel(x, _solarize_threshold(param))


def _solarize_threshold(param: Tensor) -> Tensor:
    """The threshold of ``solarize`` in [0,1] units, less the tie margin: ``(256 - param) / 255``."""
    return torch.sub(256.0 - _TIE_MARGIN, param).div_(255.0)


def _solarize_kernel(x: Tensor, threshold: Tensor) -> Tensor:
    t = _col(threshold, x)
    xd = x.detach()
    # x where kept, 1 - x where inverted; param 0 (threshold 256) leaves every x in [0,1] as is
    hard = torch.where(xd >= t.detach(), 1.0 - xd, xd)
    if not _needs_grad(x, t):
        return hard
    gate = torch.sigmoid((x - t) * (255.0 / SOLARIZE_TEMPERATURE))
    return _straight_through(hard, torch.addcmul(x + gate, x, gate, value=-2.0))  # x + gate (1-2x)


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
    return warp_grid_terms(x, *grid_terms(matrix.to(x.dtype), x.shape[-2], x.shape[-1]))


def grid_terms(matrix: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """The sampling grid of PIL matrices ``[N,2,3]`` as a per-column term ``[N,2,1,W]`` and a
    per-row term ``[N,2,H,1]`` (x and y planes), whose broadcast sum is the grid in normalised
    coordinates, planar ``[N,2,H,W]``.

    Separate so that AugMixBatch builds them for every step of a call at once.
    """
    # Normalised coordinates (align_corners=False): g = 2 q / size - 1 for a point q in pixels,
    # so row k of the matrix is scaled by 2 / (w, h)[k] and the constant term shifted by -1.
    if h == w:
        m = matrix * (2.0 / w)
    else:
        m = torch.stack((matrix[..., 0, :] * (2.0 / w), matrix[..., 1, :] * (2.0 / h)), dim=-2)
    px = torch.arange(0.5, w, 1.0, dtype=m.dtype, device=m.device)  # output pixel centres
    py = px if h == w else torch.arange(0.5, h, 1.0, dtype=m.dtype, device=m.device)
    a, b, c = m[..., None, None].unbind(-3)  # [N, 2, 1, 1] each; one unbind: one stack backward
    along_row = torch.addcmul(c - 1.0, a, px)
    along_col = b * py[:, None]
    return along_row, along_col


def warp_grid_terms(x: Tensor, along_row: Tensor, along_col: Tensor) -> Tensor:
    """``warp_affine`` from ``grid_terms``: one broadcast add builds the grid, planar (an
    interleaved [N,H,W,2] sum is 8x slower on the CPU; ``grid_sample`` takes the permuted view at
    the same speed), where F.affine_grid's batched matmul would be ~3x slower."""
    planar = along_row + along_col  # [N, 2, H, W]
    grid = planar.permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # PIL fills unless 0 <= q < size, i.e. -1 <= g < 1 for both coordinates; we fill unless
    # |g| < 1, which differs only for a point exactly on the left or top edge (q = 0). A multiply
    # by the mask: 3x cheaper than masked_fill_ on the CPU.
    # (grid_sample's backward keeps the grid; without a gradient |g| is taken in place, 10x faster)
    size = planar.detach().abs() if _needs_grad(planar) else planar.abs_()
    return out.mul_(torch.maximum(size[:, :1], size[:, 1:]) < 1.0)


# The five geometric ops each set one term of a PIL AFFINE matrix: rotation (degrees,
# counter-clockwise about the centre), shear along x / y, translation along x / y (a fraction of
# W / H). AugMix applies one op at a time, so a warp has at most one non-zero term.
AFFINE_TERMS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def pil_affine(terms: Tensor, h: int, w: int) -> Tensor:
    """``terms [..., 5]`` (one per ``AFFINE_TERMS`` entry) -> PIL AFFINE matrices ``[..., 2, 3]``.

    With one non-zero term per sample that is exactly the op's PIL matrix (with all zero, the
    identity): ``Image.rotate(deg)`` is ``(cos, sin, cx - cos cx - sin cy, -sin, cos,
    cy + sin cx - cos cy)`` with ``r = -deg`` in radians and the centre ``(cx, cy) = (W/2, H/2)``;
    shear x is ``(1, s, 0, 0, 1, 0)`` and shear y ``(1, 0, 0, s, 1, 0)`` (origin at the top-left
    corner, as the official code); translate x is ``(1, 0, frac*W, 0, 1, 0)`` (a positive
    parameter moves the content left) and translate y ``(1, 0, 0, 0, 1, frac*H)``. Several
    non-zero terms for one sample give the sum of their deviations from the identity (not used).
    """
    deg, shear_x, shear_y, frac_x, frac_y = terms.unbind(-1)
    r = deg * (-math.pi / 180.0)
    cos, sin = torch.cos(r), torch.sin(r)
    cx, cy = w / 2.0, h / 2.0
    one_minus_cos = 1.0 - cos  # 0 exactly when deg = 0: the other terms' matrices stay exact
    tx = torch.add(one_minus_cos * cx, sin, alpha=-cy).add_(frac_x, alpha=w)
    ty = torch.add(one_minus_cos * cy, sin, alpha=cx).add_(frac_y, alpha=h)
    rows = (cos, sin + shear_x, tx, shear_y - sin, cos, ty)
    return torch.stack(rows, dim=-1).view(*terms.shape[:-1], 2, 3)


def _geometric(name: str, max_param: float, official: str = "float") -> Op:
    """A geometric op: its parameter is the ``name`` term of ``pil_affine``, applied by one warp."""
    term = AFFINE_TERMS.index(name)

    def affine(param: Tensor, h: int, w: int) -> Tensor:
        zero = torch.zeros_like(param)
        terms = [param if k == term else zero for k in range(len(AFFINE_TERMS))]
        return pil_affine(torch.stack(terms, dim=-1), h, w)

    def apply(x: Tensor, param: Tensor) -> Tensor:
        return warp_affine(x, affine(param.to(x.dtype), x.shape[-2], x.shape[-1]))

    apply.__doc__ = affine.__doc__ = pil_affine.__doc__
    return Op(name, apply, max_param, True, False, "exact", affine, affine_term=term,
              official=official)  # fmt: skip


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
        Op(
            "posterize",
            posterize,
            4.0,
            False,
            False,
            "straight_through",
            coefficient=_posterize_step,
            kernel=_posterize_kernel,
            official="int",
        ),
        # degrees, counter-clockwise; official: int_parameter(level, 30)
        _geometric("rotate", 30.0, official="int"),
        # threshold = 256 - param (0..255 units); official: int_parameter(level, 256)
        Op(
            "solarize",
            solarize,
            256.0,
            False,
            False,
            "straight_through",
            coefficient=_solarize_threshold,
            kernel=_solarize_kernel,
            identity_at_zero=True,
            official="int",
        ),
        _geometric("shear_x", 0.3),
        _geometric("shear_y", 0.3),
        # fraction of the width/height; official: int_parameter(level, IMAGE_SIZE / 3) pixels
        _geometric("translate_x", 1.0 / 3.0, official="width"),
        _geometric("translate_y", 1.0 / 3.0, official="height"),
        Op("color", color, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("contrast", contrast, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("brightness", brightness, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
        Op("sharpness", sharpness, _ENHANCE_MAX, False, True, "exact", offset=_ENHANCE_OFFSET),
    )
}

AUGMENTATIONS: tuple[str, ...] = tuple(n for n, op in OPS.items() if not op.overlaps_imagenet_c)
AUGMENTATIONS_ALL: tuple[str, ...] = tuple(OPS)

GRADIENT_KINDS = ("exact", "straight_through", "none")


def get_ops(all_ops: bool = False, names: Sequence[str] | None = None) -> tuple[Op, ...]:
    """The op tuple AugMix draws from: the paper's 9, all 13 with ``all_ops``, or the ops
    ``names`` (a subset, e.g. to study what one op does), kept in the table's order so that the
    same set draws the same chains whatever order it was written in."""
    if names is None:
        return tuple(OPS[n] for n in (AUGMENTATIONS_ALL if all_ops else AUGMENTATIONS))
    names = list(names)
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        raise ValueError(
            f"ops: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'no op named'}: "
            f"expected names among {', '.join(OPS)}"
        )
    if len(set(names)) < len(names):
        raise ValueError(f"ops: {names} names an op more than once")
    if all_ops:
        raise ValueError("ops and all_ops: pass one of them (ops names the whole set)")
    return tuple(op for n, op in OPS.items() if n in names)
