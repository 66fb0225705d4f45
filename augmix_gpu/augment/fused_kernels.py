"""The Triton kernels of the ``fused`` AugMix form, each registered as one torch operator.

Why Triton: AugMix is bandwidth-bound on a GPU, so its cost is the bytes its kernels move. Here
each chain image is read once and written once per depth step, whatever op it drew (a per-sample
switch inside one kernel), the mix writes the network's input itself, and no op's full-size
output, mask or sampling grid ever reaches memory. Each launcher is a ``torch.library.triton_op``
(``augmix_gpu::fused_stats`` / ``fused_step`` / ``fused_mix`` / ``fused_grad``), so the profiler,
``torch.compile`` and the byte counter (``benchmarks/count_bytes.py``) see one operator per kernel
with its inputs and outputs. On a CPU the same kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` before this module is imported).

Layouts (N = V * width * B chain images, image n = (view * width + chain) * B + sample, as in
``execute.py``): the draws are read in ``AugMixParams``' own layouts (``ops [V, width, D, B]``,
``depth [V, width, B]``), so nothing is permuted first. Chain images live in a ping-pong buffer
``[2, N, 3, H, W]``: step t reads slot (t - 1) % 2 (step 0 reads the batch itself, sample n % B,
uint8 or float) and writes slot t % 2 for the chains still running; a finished chain is not
touched again, so its last image stays in slot (depth - 1) % 2, where the mix reads it.

Intermediates are float16 holding ``255 x`` (level units): float16 is exact on every integer
0..255, so an image on the uint8 grid (the input, equalize's output, posterize's bins at PIL's
integer bits) is stored exactly and PIL's integer thresholds (posterize, solarize, equalize) see the same level as the
float32 reference; elsewhere the rounding is at most 1/16 of a level (1/8 above 128). bfloat16
(8 significant bits) cannot even hold 255 levels. All arithmetic is float32; a float64 batch runs
everything in float64 (the reference forms' float64 path, for gradient checks).

The learnable severity: with ``TANGENT`` each step also carries d(image)/ds (forward mode, one
tangent per pixel, float32) with each op's derivative as the reference backward defines it (exact
for warps and enhance ops, the straight-through surrogates for posterize and solarize, the
identity for equalize, a constant stretch for autocontrast), and the mix writes d(view)/ds. The
severity's gradient is then one reduction, ``sum(grad_view * tangent)`` per sample
(``fused_grad``). The constants of every op come from the op table (``ops.py``) through
``op_table`` and the module's magnitude table; only the formulas are written here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .ops import _TIE_MARGIN, SOLARIZE_TEMPERATURE, Op

__all__ = ["BRANCHES", "fused_grad", "fused_mix", "fused_stats", "fused_step", "op_table"]

# The kernel's branches: every geometric op is one warp (its AFFINE_TERMS entry picks the term).
WARP, AUTOCONTRAST, EQUALIZE, POSTERIZE, SOLARIZE, COLOR, CONTRAST, BRIGHTNESS, SHARPNESS = (
    tl.constexpr(code) for code in range(9)
)
BRANCHES = {
    "autocontrast": AUTOCONTRAST,
    "equalize": EQUALIZE,
    "posterize": POSTERIZE,
    "solarize": SOLARIZE,
    "color": COLOR,
    "contrast": CONTRAST,
    "brightness": BRIGHTNESS,
    "sharpness": SHARPNESS,
}
LEVEL_MAX = tl.constexpr(255.0)  # intermediates hold 255 x
_RADIANS = tl.constexpr(-math.pi / 180.0)  # ops.pil_affine: r = -degrees in radians
_LN2 = tl.constexpr(math.log(2.0))
# Kornia's grey weights (ops.color, ops.contrast: r 0.299 + g 0.587 + b 0.114)
GREY_R, GREY_G, GREY_B = tl.constexpr(0.299), tl.constexpr(0.587), tl.constexpr(0.114)


def op_table(ops: tuple[Op, ...]) -> Tensor:
    """int32 ``[ops, 2]``: each op's kernel branch and, for a warp, its ``AFFINE_TERMS`` entry."""
    rows = []
    for op in ops:
        if op.affine_term is not None:
            rows.append((WARP.value, op.affine_term))
        elif op.name in BRANCHES:
            rows.append((BRANCHES[op.name].value, -1))
        else:
            raise ValueError(f"strategy 'fused': op {op.name!r} has no branch in fused_kernels.py")
    return torch.tensor(rows, dtype=torch.int32)


# --- helpers: every tile is [4, BLOCK], the channels on the first axis (the 4th one masked) ----


@triton.jit
def _unit(v, FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr, CT: tl.constexpr):
    """A loaded value as a float in [0, 1]: uint8 / 255, a float batch clamped, a buffer / 255."""
    if FROM_BATCH:
        if SRC_U8:
            x = v.to(CT) / 255.0
        else:
            x = tl.minimum(tl.maximum(v.to(CT), 0.0), 1.0)
    else:
        x = v.to(CT) / 255.0
    return x


@triton.jit
def _clamp_unit(y, dy):
    """``clamp(y, 0, 1)`` and its derivative (torch's clamp passes the gradient at the bounds)."""
    keep = (y >= 0.0) & (y <= 1.0)
    return tl.minimum(tl.maximum(y, 0.0), 1.0), tl.where(keep, dy, 0.0)


@triton.jit
def _cast(y, kind: tl.constexpr):
    """``y`` in ``kind``, rounded to nearest even as torch casts (bfloat16 by hand: the
    interpreter's cast truncates)."""
    if kind == tl.bfloat16:
        bits = y.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(kind)


@triton.jit
def _grey(x, ch):
    """Kornia's grey of a ``[4, BLOCK]`` tile: ``(r 0.299 + g 0.587) + b 0.114``, ``[1, BLOCK]``."""
    c = ch[:, None]
    weighted = tl.where(c == 0, x * GREY_R, tl.where(c == 1, x * GREY_G, x * GREY_B))
    return tl.sum(tl.where(c < 3, weighted, 0.0), axis=0)[None, :]


# --- the pointwise ops (ops.py has each one's reference and its gradient) -------------------------


@triton.jit
def _pointwise(branch, x, d, param, dparam, row, ch, live, MARGIN: tl.constexpr,
               THRESHOLD_TOP: tl.constexpr, GAIN: tl.constexpr):  # fmt: skip
    """Every op that maps a pixel to itself, on a ``[4, BLOCK]`` tile: a switch on the op this
    image drew. ``row`` is its statistics (``[3, 256]``: see ``_stats_kernel``)."""
    y, e = x, d  # equalize passes the tangent
    if branch == AUTOCONTRAST:  # (x - lo) / span, the stretch a constant in backward
        lo = tl.load(row + ch * 256, mask=ch < 3, other=0.0)[:, None]
        span = tl.load(row + ch * 256 + 1, mask=ch < 3, other=1.0)[:, None]
        y, e = (x - lo) / span, d / span
    elif branch == EQUALIZE:  # lut[round(255 x)]
        level = tl.minimum(tl.maximum((x * 255.0 + 0.5).to(tl.int32), 0), 255)
        y = tl.load(row + ch[:, None] * 256 + level, mask=live, other=0.0)
    elif branch == POSTERIZE:  # surrogate x - step / 2; d step / d param = step ln 2
        step = tl.exp2(param + 4.0) / 255.0
        inv = 1.0 / step
        y = tl.floor(inv * MARGIN + x * inv) * step
        e = d - 0.5 * step * _LN2 * dparam
    elif branch == SOLARIZE:  # surrogate x + g (1 - 2x), g = sigmoid((x - t) GAIN), dt = -dp/255
        t = (THRESHOLD_TOP - param) / 255.0
        y = tl.where(x >= t, 1.0 - x, x)
        g = 1.0 / (1.0 + tl.exp(-(x - t) * GAIN))
        slope = g * (1.0 - g) * GAIN * (1.0 - 2.0 * x)
        e = d * (1.0 - 2.0 * g) + slope * (d + dparam / 255.0)
    elif branch == COLOR:  # blend with the grey, factor = param
        grey, dgrey = _grey(x, ch), _grey(d, ch)
        y, e = _clamp_unit(
            (1.0 - param) * grey + param * x,
            (1.0 - param) * dgrey + param * d + dparam * (x - grey),
        )
    elif branch == CONTRAST or branch == BRIGHTNESS:  # blend with the grey mean, or with black
        mean = tl.where(branch == CONTRAST, tl.load(row), 0.0)
        dmean = tl.where(branch == CONTRAST, tl.load(row + 1), 0.0)
        y, e = _clamp_unit(
            mean + param * (x - mean), dmean + param * (d - dmean) + dparam * (x - mean)
        )
    return y, e


# --- the warp (ops.warp_affine: PIL's matrix, grid_sample bilinear, border, fill 0 outside) -------


@triton.jit
def _affine(param, dparam, term, H, W):
    """``ops.pil_affine`` of one term ``(a00, a01, a02, a10, a12)`` (``a11 = a00``), and its
    derivative in the parameter."""
    r = tl.where(term == 0, param, 0.0) * _RADIANS
    cos, sin = tl.cos(r), tl.sin(r)
    cx, cy = W * 0.5, H * 0.5
    tx = ((1.0 - cos) * cx + sin * (-cy)) + tl.where(term == 3, param, 0.0) * W
    ty = ((1.0 - cos) * cy + sin * cx) + tl.where(term == 4, param, 0.0) * H
    a01 = sin + tl.where(term == 1, param, 0.0)
    a10 = tl.where(term == 2, param, 0.0) - sin
    dr = tl.where(term == 0, dparam, 0.0) * _RADIANS
    dcos, dsin = -sin * dr, cos * dr
    dtx = -dcos * cx - dsin * cy + tl.where(term == 3, dparam, 0.0) * W
    dty = -dcos * cy + dsin * cx + tl.where(term == 4, dparam, 0.0) * H
    da01 = dsin + tl.where(term == 1, dparam, 0.0)
    da10 = tl.where(term == 2, dparam, 0.0) - dsin
    return cos, a01, tx, a10, ty, dcos, da01, dtx, da10, dty


@triton.jit
def _source_index(a, b, c, da, db, dc, px, py, size):
    """One axis of an output pixel's source point: ``ops.grid_terms``' normalised coordinate g,
    unnormalised as torch's CPU grid_sample does and clipped to the border; the fill test
    ``|g| < 1``; and the point's tangent in pixels, 0 where the clip holds it (torch's backward
    counts the border as clipped)."""
    scale = 2.0 / size
    g = ((c * scale - 1.0) + (a * scale) * px) + (b * scale) * py
    raw = (g + 1.0) * (size * 0.5) - 0.5
    moves = (raw > 0.0) & (raw < size - 1.0)
    tangent = tl.where(moves, da * px + db * py + dc, 0.0)
    return tl.minimum(tl.maximum(raw, 0.0), size - 1.0), tl.abs(g) < 1.0, tangent


@triton.jit
def _warp(img, tin, offs, mask, plane, param, dparam, term, H, W, FROM_BATCH: tl.constexpr,
          SRC_U8: tl.constexpr, TANGENT: tl.constexpr, CT: tl.constexpr):  # fmt: skip
    """``ops.warp_affine`` of one pixel block, all channels: coordinates computed here, no grid.
    The four bilinear corners are one ``[4 channels, 4 corners, BLOCK]`` gather."""
    Hf, Wf = tl.cast(H, CT), tl.cast(W, CT)  # float arithmetic in CT (an int argument is int32)
    a00, a01, a02, a10, a12, da00, da01, da02, da10, da12 = _affine(param, dparam, term, Hf, Wf)
    px = (offs % W).to(CT) + 0.5
    py = (offs // W).to(CT) + 0.5
    ix, in_x, dix = _source_index(a00, a01, a02, da00, da01, da02, px, py, Wf)
    iy, in_y, diy = _source_index(a10, a00, a12, da10, da00, da12, px, py, Hf)
    keep = (in_x & in_y).to(CT)[None, :]  # PIL's fill: 0 unless the point is inside the image
    x0 = tl.floor(ix).to(tl.int32)
    y0 = tl.floor(iy).to(tl.int32)
    wx, ny = ix - x0.to(CT), iy - y0.to(CT)
    corner = tl.arange(0, 4)[:, None]  # nw, ne, sw, se
    east, south = corner % 2, corner // 2
    wx_c = tl.where(east == 1, wx[None, :], 1.0 - wx[None, :])  # [4 corners, BLOCK]
    wy_c = tl.where(south == 1, ny[None, :], 1.0 - ny[None, :])
    ok = (
        mask[None, :]
        & ((east == 0) | (x0 + 1 < W)[None, :])
        & ((south == 0) | (y0 + 1 < H)[None, :])
    )
    at = plane[:, :, None] + ((y0 * W + x0)[None, :] + south * W + east)[None, :, :]
    live = (plane < 3 * H * W)[:, :, None] & ok[None, :, :]
    v = tl.where(live, _unit(tl.load(img + at, mask=live, other=0), FROM_BATCH, SRC_U8, CT), 0.0)
    weight = (wy_c * wx_c)[None, :, :]
    value = tl.sum(v * weight, axis=1)  # ((nw + ne) + sw) + se, as grid_sample adds them
    e = tl.zeros_like(value)
    if TANGENT:  # corners' tangents, and the image's slope times the source point's tangent
        slope_x = tl.sum(v * (tl.where(east == 1, 1.0, -1.0) * wy_c)[None, :, :], axis=1)
        slope_y = tl.sum(v * (tl.where(south == 1, 1.0, -1.0) * wx_c)[None, :, :], axis=1)
        e = slope_x * dix[None, :] + slope_y * diy[None, :]
        if not FROM_BATCH:
            e += tl.sum(tl.load(tin + at, mask=live, other=0).to(CT) * weight, axis=1)
    return value * keep, e * keep


# --- sharpness (ops.sharpness: SMOOTH = (3x3 box + 4 centre) / 13, the 1-pixel border kept) --------


@triton.jit
def _sharpness(img, tin, offs, mask, plane, x, d, f, df, H, W, FROM_BATCH: tl.constexpr,
               SRC_U8: tl.constexpr, TANGENT: tl.constexpr, CT: tl.constexpr):  # fmt: skip
    """The 3x3 neighbourhood as one ``[4 channels, 16 (9 used), BLOCK]`` gather; ``x``, ``d``: the
    centre tile and its tangent."""
    i = offs // W
    j = offs % W
    inner = ((i >= 1) & (i < H - 1) & (j >= 1) & (j < W - 1) & mask)[None, :]
    k = tl.arange(0, 16)[:, None]
    step = tl.where(k < 9, (k // 3 - 1) * W + (k % 3 - 1), 0)
    at = plane[:, :, None] + (offs[None, :] + step)[None, :, :]
    near = (plane < 3 * H * W)[:, :, None] & (inner & (k < 9))[None, :, :]
    box = tl.sum(_unit(tl.load(img + at, mask=near, other=0), FROM_BATCH, SRC_U8, CT), axis=1)
    dbox = tl.zeros_like(box)
    if TANGENT and not FROM_BATCH:
        dbox = tl.sum(tl.load(tin + at, mask=near, other=0).to(CT), axis=1)
    smooth, dsmooth = _clamp_unit((box + 4.0 * x) / 13.0, (dbox + 4.0 * d) / 13.0)
    # torch.lerp(smooth, x, f), with its two-sided formula
    y = tl.where(f < 0.5, smooth + f * (x - smooth), x - (x - smooth) * (1.0 - f))
    y, e = _clamp_unit(y, (1.0 - f) * dsmooth + f * d + df * (x - smooth))
    return tl.where(inner, y, x), tl.where(inner, e, d)


# --- the step kernel -------------------------------------------------------------------------------


@triton.jit
def _draw(ops, depth, n, t, B, D):
    """Whether chain n runs at step t, its sample, and where its step-t draws sit in the
    ``[V, width, D, B]`` tensors."""
    b = n % B
    return tl.load(depth + n) > t, b, ((n // B) * D + t) * B + b


@triton.jit
def _images(src, buf, tan, n, b, t, N, HW, FROM_BATCH: tl.constexpr):
    """Step t's source image of chain n (the batch's sample b at step 0), its destination and the
    tangents of both: slot (t - 1) % 2 of the ping-pong buffer in, slot t % 2 out."""
    size = 3 * HW
    n64 = n.to(tl.int64)
    into = ((t % 2) * N + n64) * size
    come_from = (((t + 1) % 2) * N + n64) * size
    if FROM_BATCH:
        img = src + b.to(tl.int64) * size
    else:
        img = buf + come_from
    return img, buf + into, tan + come_from, tan + into


@triton.jit
def _parameter(coef, op, positive, u, span, H, W, LEVEL_LOW: tl.constexpr,
               OFFICIAL: tl.constexpr):  # fmt: skip
    """``execute.op_parameters`` of one application, and its derivative in the severity; with
    ``OFFICIAL`` truncated to whole units (the table's code: 1 units, -1 / -2 pixels of W / H)."""
    row = 2 * op + positive.to(tl.int32)
    scale = tl.load(coef + 3 * row)
    scaled = (LEVEL_LOW + u * span) * scale
    if OFFICIAL:
        code = tl.load(coef + 3 * row + 2)
        unit = tl.where(code == -1.0, W, tl.where(code == -2.0, H, code)).to(scaled.dtype)
        whole = (scaled * unit).to(tl.int32).to(scaled.dtype)  # toward zero, as int()
        scaled = tl.where(unit > 0.0, whole / tl.maximum(unit, 1.0), scaled)
    return scaled + tl.load(coef + 3 * row + 1), u * scale


@triton.jit
def _step_kernel(src, buf, tan, stats, ops, depth, level_u, signs, sev, sev_stride, span, optab,
                 coef, t, N, B, D, H, W, FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr,
                 HAS_SEV: tl.constexpr, TANGENT: tl.constexpr, OFFICIAL: tl.constexpr,
                 LEVEL_LOW: tl.constexpr,
                 MARGIN: tl.constexpr, THRESHOLD_TOP: tl.constexpr, GAIN: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """One depth step: each running chain's image, through the op it drew, read once, written once."""
    n = tl.program_id(0)
    runs, b, at = _draw(ops, depth, n, t, B, D)
    if runs:
        CT = stats.dtype.element_ty
        op = tl.load(ops + at).to(tl.int32)
        branch, term = tl.load(optab + 2 * op), tl.load(optab + 2 * op + 1)
        u = tl.load(level_u + at).to(CT)
        if HAS_SEV:
            span_b = tl.load(sev + b * sev_stride).to(CT) - LEVEL_LOW
        else:
            span_b = tl.cast(span, CT)
        param, dparam = _parameter(coef, op, tl.load(signs + at) > 0, u, span_b, H, W, LEVEL_LOW,
                                   OFFICIAL)  # fmt: skip
        HW = H * W
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        plane = tl.arange(0, 4)[:, None] * HW  # channel offsets (the 4th channel is masked)
        live = (plane < 3 * HW) & mask[None, :]
        tile = plane + offs[None, :]
        img, out, tin, tout = _images(src, buf, tan, n, b, t, N, HW, FROM_BATCH)
        x = _unit(tl.load(img + tile, mask=live, other=0), FROM_BATCH, SRC_U8, CT)
        d = tl.zeros_like(x)
        if TANGENT and not FROM_BATCH:
            d = tl.load(tin + tile, mask=live, other=0).to(CT)
        if branch == WARP:
            y, e = _warp(img, tin, offs, mask, plane, param, dparam, term, H, W, FROM_BATCH,
                         SRC_U8, TANGENT, CT)  # fmt: skip
        elif branch == SHARPNESS:
            y, e = _sharpness(img, tin, offs, mask, plane, x, d, param, dparam, H, W,
                              FROM_BATCH, SRC_U8, TANGENT, CT)  # fmt: skip
        else:
            y, e = _pointwise(branch, x, d, param, dparam, stats + n.to(tl.int64) * 768,
                              tl.arange(0, 4), live, MARGIN, THRESHOLD_TOP, GAIN)  # fmt: skip
        level = y * LEVEL_MAX
        if OFFICIAL:  # PIL stores every op's output on the uint8 grid, truncated (execute.Steps)
            level = tl.floor(level + MARGIN * 255.0)
        tl.store(out + tile, level.to(out.dtype.element_ty), mask=live)
        if TANGENT:
            tl.store(tout + tile, e.to(tout.dtype.element_ty), mask=live)


# --- the statistics kernel -------------------------------------------------------------------------


@triton.jit
def _minmax(img, row, HW, FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr, CT: tl.constexpr,
            BLOCK: tl.constexpr):  # fmt: skip
    """autocontrast's stretch per channel: lo and span (a flat channel: 0 and 1, the identity)."""
    ch = tl.arange(0, 4)
    lo = tl.full([4, BLOCK], float("inf"), CT)
    hi = tl.full([4, BLOCK], float("-inf"), CT)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = (ch < 3)[:, None] & (offs < HW)[None, :]
        v = tl.load(img + ch[:, None] * HW + offs[None, :], mask=live, other=0)
        x = _unit(v, FROM_BATCH, SRC_U8, CT)
        lo = tl.minimum(lo, tl.where(live, x, float("inf")))
        hi = tl.maximum(hi, tl.where(live, x, float("-inf")))
    low = tl.min(lo, axis=1)
    span = tl.max(hi, axis=1) - low
    tl.store(row + ch * 256, tl.where(span <= 0.0, 0.0, low), mask=ch < 3)
    tl.store(row + ch * 256 + 1, tl.where(span <= 0.0, span + 1.0, span), mask=ch < 3)


@triton.jit
def _lut(img, row, HW, FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr, CT: tl.constexpr,
         BLOCK: tl.constexpr):  # fmt: skip
    """equalize's lookup table per channel (ops.equalize: PIL's integer formula), as values / 255:
    one 1024-bin histogram of (channel, level)."""
    ch = tl.arange(0, 4)
    bins = tl.arange(0, 256)[None, :]
    hist = tl.zeros([1024], tl.int32)
    top = tl.zeros([4, BLOCK], tl.int32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = (ch < 3)[:, None] & (offs < HW)[None, :]
        v = tl.load(img + ch[:, None] * HW + offs[None, :], mask=live, other=0)
        level = tl.minimum(
            tl.maximum((_unit(v, FROM_BATCH, SRC_U8, CT) * 255.0 + 0.5).to(tl.int32), 0), 255
        )
        key = tl.reshape(ch[:, None] * 256 + level, [4 * BLOCK], can_reorder=True)
        hist += tl.histogram(key, 1024, mask=tl.reshape(live, [4 * BLOCK], can_reorder=True))
        top = tl.maximum(top, tl.where(live, level, 0))
    hist2 = tl.reshape(hist, [4, 256])
    below = tl.sum(tl.where(bins < tl.max(top, axis=1)[:, None], hist2, 0), axis=1)
    step = (below // 255)[:, None]  # pixels below the highest level used, // 255
    cdf = tl.cumsum(hist2, axis=1) - hist2
    lut = tl.minimum((cdf + step // 2) // tl.maximum(step, 1), 255)
    lut = tl.where(step > 0, lut, bins)  # the identity when step is 0
    tl.store(
        row + ch[:, None] * 256 + bins, (lut.to(tl.float32) / 255.0).to(CT), mask=(ch < 3)[:, None]
    )


@triton.jit
def _grey_mean(img, tin, row, HW, FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr,
               TANGENT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """contrast's grey mean, rounded to a level (the value; ops.contrast), and its tangent."""
    ch = tl.arange(0, 4)
    acc = tl.zeros([1, BLOCK], CT)
    dacc = tl.zeros([1, BLOCK], CT)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = (ch < 3)[:, None] & (offs < HW)[None, :]
        tile = ch[:, None] * HW + offs[None, :]
        acc += _grey(_unit(tl.load(img + tile, mask=live, other=0), FROM_BATCH, SRC_U8, CT), ch)
        if TANGENT and not FROM_BATCH:
            dacc += _grey(tl.load(tin + tile, mask=live, other=0).to(CT), ch)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / HW
    level = tl.floor(mean * 255.0 + 0.5) / 255.0
    tl.store(row, mean + (level - mean))
    tl.store(row + 1, tl.sum(tl.sum(dacc, axis=1), axis=0) / HW)


@triton.jit
def _stats_kernel(src, buf, tan, stats, ops, depth, optab, t, N, B, D, H, W,
                  FROM_BATCH: tl.constexpr, SRC_U8: tl.constexpr, TANGENT: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """The per-image statistics of step t, only for the chains that drew autocontrast (min, max),
    equalize (histogram -> lookup table) or contrast (grey mean): one program per image."""
    n = tl.program_id(0)
    runs, b, at = _draw(ops, depth, n, t, B, D)
    if runs:
        CT = stats.dtype.element_ty
        branch = tl.load(optab + 2 * tl.load(ops + at).to(tl.int32))
        HW = H * W
        img, _, tin, _ = _images(src, buf, tan, n, b, t, N, HW, FROM_BATCH)
        row = stats + n.to(tl.int64) * 768
        if branch == AUTOCONTRAST:
            _minmax(img, row, HW, FROM_BATCH, SRC_U8, CT, BLOCK)
        elif branch == EQUALIZE:
            _lut(img, row, HW, FROM_BATCH, SRC_U8, CT, BLOCK)
        elif branch == CONTRAST:
            _grey_mean(img, tin, row, HW, FROM_BATCH, SRC_U8, TANGENT, CT, BLOCK)


# --- the mix and the severity's gradient ---------------------------------------------------------


@triton.jit
def _mix_kernel(src, buf, tan, depth, weights, mix, norm, out, tout, s_n, s_c, s_h, s_w, B, N, H,
                W, WIDTH, FIRST, SRC_U8: tl.constexpr, NORMALIZE: tl.constexpr,
                TANGENT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Output image o, the clean view or ``(1-m) x + m sum_i w_i chain_i`` (a chain's last image
    is in slot (depth - 1) % 2; depth 0: the clean one), normalised with AugMixBatch's
    coefficients in the same order, written once in ``out``'s dtype and strides; with
    ``TANGENT`` d(view)/ds too (augmented views only)."""
    o = tl.program_id(0)
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, 4)
    live = (ch < 3)[:, None] & (offs < HW)[None, :]
    tile = ch[:, None] * HW + offs[None, :]
    CT = norm.dtype.element_ty
    view = o // B + FIRST
    b = o % B
    xs = _unit(
        tl.load(src + b.to(tl.int64) * (3 * HW) + tile, mask=live, other=0), True, SRC_U8, CT
    )
    inv = tl.full([4, 1], 1.0, CT)
    bias = tl.zeros([4, 1], CT)
    if NORMALIZE:
        inv = tl.load(norm + ch, mask=ch < 3, other=1.0)[:, None]
        bias = tl.load(norm + 3 + ch, mask=ch < 3, other=0.0)[:, None]
    dy = tl.zeros_like(xs)
    if view == 0:
        y = bias + xs * inv
    else:
        m = tl.load(mix + (view - 1) * B + b).to(CT)
        y = bias + xs * ((1.0 - m) * inv)
        for i in range(WIDTH):
            n = ((view - 1) * WIDTH + i) * B + b
            k = (m * tl.load(weights + ((view - 1) * B + b) * WIDTH + i).to(CT)) * inv
            d = tl.load(depth + n)
            at = (((d + 1) % 2) * N + n.to(tl.int64)) * (3 * HW) + tile
            has = live & (d > 0)
            y = y + tl.where(d > 0, tl.load(buf + at, mask=has, other=0).to(CT) / 255.0, xs) * k
            if TANGENT:
                dy = dy + tl.load(tan + at, mask=has, other=0).to(CT) * k
    at = o.to(tl.int64) * s_n + ch[:, None] * s_c + ((offs // W) * s_h + (offs % W) * s_w)[None, :]
    tl.store(out + at, _cast(y, out.dtype.element_ty), mask=live)
    if TANGENT:
        row = (o - (1 - FIRST) * B).to(tl.int64) * (3 * HW)  # tangent rows: the views only
        tl.store(tout + row + tile, dy, mask=live & (view > 0))


@triton.jit
def _grad_kernel(grad, tan, part, g_n, g_c, g_h, g_w, H, W, ROW0, NB, BLOCK: tl.constexpr):
    """Partial sums of grad(view) * d(view)/ds over a block of one augmented view image."""
    o = tl.program_id(0)
    blk = tl.program_id(1)
    HW = H * W
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, 4)
    live = (ch < 3)[:, None] & (offs < HW)[None, :]
    CT = part.dtype.element_ty
    at = (
        (o + ROW0).to(tl.int64) * g_n
        + ch[:, None] * g_c
        + ((offs // W) * g_h + (offs % W) * g_w)[None, :]
    )
    g = tl.load(grad + at, mask=live, other=0).to(CT)
    d = tl.load(
        tan + o.to(tl.int64) * (3 * HW) + ch[:, None] * HW + offs[None, :], mask=live, other=0
    )
    tl.store(part + o * NB + blk, tl.sum(tl.sum(g * d.to(CT), axis=1), axis=0))


# --- the operators -------------------------------------------------------------------------------

# Pixels per program (per loop trip of the statistics kernel), a power of 2. Under the interpreter
# each program costs Python overhead, so a small test image is one program.
_INTERPRETED = type(_step_kernel).__name__ == "InterpretedFunction"
STEP_BLOCK, MIX_BLOCK, STATS_BLOCK = (4096, 4096, 4096) if _INTERPRETED else (256, 512, 1024)


def _block(limit: int, hw: int) -> int:
    """``limit``, or the image rounded up to a power of 2 if smaller."""
    return min(limit, triton.next_power_of_2(hw))


@triton_op("augmix_gpu::fused_stats", mutates_args={"stats"})
def fused_stats(
    src: Tensor, buf: Tensor, tangent: Tensor | None, stats: Tensor, ops: Tensor, depth: Tensor,
    optab: Tensor, t: int,
) -> None:  # fmt: skip
    """Step t's statistics (``stats [N, 3, 256]``) of the chains whose op needs them."""
    n, (b, d), (h, w) = depth.numel(), (src.shape[0], ops.shape[2]), src.shape[-2:]
    wrap_triton(_stats_kernel)[(n,)](
        src, buf, buf if tangent is None else tangent, stats, ops, depth, optab, t, n, b, d, h, w,
        FROM_BATCH=t == 0, SRC_U8=src.dtype == torch.uint8, TANGENT=tangent is not None,
        BLOCK=_block(STATS_BLOCK, h * w),
    )  # fmt: skip


@triton_op("augmix_gpu::fused_step", mutates_args={"buf", "tangent"})
def fused_step(
    src: Tensor, buf: Tensor, tangent: Tensor | None, stats: Tensor, ops: Tensor, depth: Tensor,
    level_u: Tensor, signs: Tensor, severity: Tensor | None, span: float, optab: Tensor,
    coef: Tensor, t: int, official: bool = False,
) -> None:  # fmt: skip
    """Depth step t of every running chain: ``buf`` slot t % 2 (and its tangent) written. The
    severity is ``severity`` (``[]``, ``[1]`` or ``[B]``) or, without it, ``span`` = s - 0.1;
    ``official``: the official code's truncated magnitudes and uint8 after every op."""
    n, (b, d), (h, w) = depth.numel(), (src.shape[0], ops.shape[2]), src.shape[-2:]
    block = _block(STEP_BLOCK, h * w)
    sev = level_u if severity is None else severity  # never read without a severity
    wrap_triton(_step_kernel)[(n, triton.cdiv(h * w, block))](
        src, buf, buf if tangent is None else tangent, stats, ops, depth, level_u, signs, sev,
        int(sev.numel() > 1), span, optab, coef, t, n, b, d, h, w, FROM_BATCH=t == 0,
        SRC_U8=src.dtype == torch.uint8, HAS_SEV=severity is not None,
        TANGENT=tangent is not None, OFFICIAL=official, LEVEL_LOW=0.1, MARGIN=_TIE_MARGIN / 255.0,
        THRESHOLD_TOP=256.0 - _TIE_MARGIN, GAIN=255.0 / SOLARIZE_TEMPERATURE, BLOCK=block,
    )  # fmt: skip


@triton_op("augmix_gpu::fused_mix", mutates_args={"out", "out_tangent"})
def fused_mix(
    src: Tensor, buf: Tensor, tangent: Tensor | None, depth: Tensor, weights: Tensor,
    mix: Tensor, norm: Tensor, out: Tensor, out_tangent: Tensor | None, first_view: int,
    normalize: bool,
) -> None:  # fmt: skip
    """Write ``out [(V + 1 - first_view) B, 3, H, W]`` (any dtype and strides) and, given
    ``out_tangent [V B, 3, H, W]`` (and the chains' ``tangent``), the views' tangents."""
    (b, width), (h, w) = weights.shape[1:], src.shape[-2:]
    block = _block(MIX_BLOCK, h * w)
    tracked = out_tangent is not None and tangent is not None
    wrap_triton(_mix_kernel)[(out.shape[0], triton.cdiv(h * w, block))](
        src, buf, tangent if tracked else buf, depth, weights, mix, norm, out,
        out_tangent if tracked else norm, *out.stride(), b, depth.numel(), h, w, width,
        first_view, SRC_U8=src.dtype == torch.uint8, NORMALIZE=normalize, TANGENT=tracked,
        BLOCK=block,
    )  # fmt: skip


@triton_op("augmix_gpu::fused_grad", mutates_args={})
def fused_grad(grad: Tensor, tangent: Tensor, first_row: int) -> Tensor:
    """Per augmented view image, ``sum(grad * tangent)`` in blocks: ``[V B, blocks]``."""
    h, w = tangent.shape[-2:]
    block = _block(MIX_BLOCK, h * w)
    nb = triton.cdiv(h * w, block)
    part = tangent.new_empty((tangent.shape[0], nb))
    wrap_triton(_grad_kernel)[(tangent.shape[0], nb)](
        grad, tangent, part, *grad.stride(), h, w, first_row, nb, BLOCK=block
    )
    return part
