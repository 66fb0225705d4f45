"""The fused form's host side: buffers, the launch sequence, and the severity's gradient.

A call is ``2 * depth + 1`` kernels (``fused_kernels.py``): per depth step the statistics of the
chains that drew autocontrast / equalize / contrast, then the step itself; then one mix that
writes the network's input (any dtype, contiguous or channels_last). Nothing is read back to the
host and no shape depends on the draw. With a severity that needs a gradient the same kernels
carry d(image)/ds forward, and the backward is one reduction (``_Tracked``): the severity is the
only input with a gradient (a batch that requires grad is refused: use ``static`` or ``grouped``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import fused_kernels as K

__all__ = ["run_fused_call"]


def _span(severity: float) -> float:
    """``severity - 0.1`` rounded as a float32 tensor computes it (``execute.level_span``)."""
    return float(np.float32(severity) - np.float32(0.1))


def _severity(
    severity: Tensor | float, x: Tensor, compute: torch.dtype
) -> tuple[Tensor | None, float]:
    """The severity as the step kernel takes it: a ``[1]``/``[B]`` tensor, or (a Python float,
    float32) no tensor and ``span``; a float64 call always gets a tensor (a kernel float is
    float32)."""
    if isinstance(severity, Tensor):
        return severity.to(x.device).reshape(-1), 0.0
    if compute == torch.float64:
        return torch.tensor([float(severity)], dtype=compute, device=x.device), 0.0
    return None, _span(float(severity))


class _Plan:
    """One fused call's fixed inputs: the batch, the draws, the tables and the output wanted."""

    def __init__(self, x, params, optab, coef, norm, normalize, clean, dtype, channels_last,
                 official=False):  # fmt: skip
        self.x = x.contiguous()
        self.ops, self.depth = params.ops.contiguous(), params.depth.contiguous()
        self.level_u, self.signs = params.level_u.contiguous(), params.signs.contiguous()
        self.weights, self.mix = params.weights.contiguous(), params.mix.contiguous()
        self.compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.store = torch.float64 if x.dtype == torch.float64 else torch.float16
        self.optab, self.coef, self.normalize = optab, coef, normalize
        self.norm = norm.to(self.compute)
        self.first = 0 if clean else 1
        self.dtype = dtype or self.compute
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.official = official

    def run(
        self, severity: Tensor | None, span: float, tracked: bool
    ) -> tuple[Tensor, Tensor | None]:
        """All kernels of the call: the network's input and, if ``tracked``, its tangent."""
        x, (v, width, depth, b) = self.x, self.ops.shape
        n, (h, w) = v * width * b, x.shape[-2:]
        buf = x.new_empty((2, n, 3, h, w), dtype=self.store)
        tangent = x.new_empty((2, n, 3, h, w), dtype=self.compute) if tracked else None
        stats = x.new_empty((n, 3, 256), dtype=self.compute)
        for t in range(depth):
            K.fused_stats(x, buf, tangent, stats, self.ops, self.depth, self.optab, t)
            K.fused_step(x, buf, tangent, stats, self.ops, self.depth, self.level_u, self.signs,
                         severity, span, self.optab, self.coef, t, self.official)  # fmt: skip
        rows = (v + 1 - self.first) * b
        out = torch.empty((rows, 3, h, w), dtype=self.dtype, device=x.device,
                          memory_format=self.layout)  # fmt: skip
        out_tangent = x.new_empty((v * b, 3, h, w), dtype=self.compute) if tracked else None
        K.fused_mix(x, buf, tangent, self.depth, self.weights, self.mix, self.norm, out,
                    out_tangent, self.first, self.normalize)  # fmt: skip
        return out, out_tangent


class _Tracked(torch.autograd.Function):
    """The fused call with a gradient to the severity: forward carries the tangents, backward is
    ``sum(grad * d(view)/ds)`` per sample (summed over the batch for one shared severity)."""

    @staticmethod
    def forward(ctx, severity: Tensor, plan: _Plan) -> Tensor:
        out, tangent = plan.run(severity.detach(), 0.0, tracked=True)
        ctx.save_for_backward(tangent)
        ctx.severity_shape, ctx.severity_dtype = severity.shape, severity.dtype
        ctx.batch, ctx.first_row = plan.x.shape[0], plan.x.shape[0] * (1 - plan.first)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (tangent,) = ctx.saved_tensors
        part = K.fused_grad(grad, tangent, ctx.first_row)
        per_sample = part.view(-1, ctx.batch, part.shape[-1]).sum(dim=(0, 2))  # [B]
        if ctx.severity_shape[0] != ctx.batch:  # one severity for the batch
            per_sample = per_sample.sum()
        return per_sample.reshape(ctx.severity_shape).to(ctx.severity_dtype), None


def run_fused_call(
    x: Tensor,
    params,
    severity: Tensor | float,
    tables: tuple[Tensor, Tensor, Tensor],
    normalize: bool,
    clean: bool = True,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    official: bool = False,
) -> Tensor:
    """The network's input ``[clean; view_1; ...]`` (``clean=False``: the views only) of one
    call, from the batch as given (uint8, or float in [0,1], clamped), the draws
    (``AugMixParams``), the severity and ``tables`` = (op table, magnitude table, normalisation
    ``[2, 3]``), all on the batch's device; ``official``: the official code's truncated magnitudes
    and uint8 after every op (``AugMixBatch(levels="official")``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError(
            "strategy 'fused': the batch requires grad, but the fused form carries a gradient to "
            "the severity only: use strategy 'static' or 'grouped'"
        )
    optab, coef, norm = tables
    plan = _Plan(x, params, optab, coef, norm, normalize, clean, dtype, channels_last, official)
    sev, span = _severity(severity, x, plan.compute)
    tracked = sev is not None and torch.is_grad_enabled() and sev.requires_grad
    if tracked:
        return _Tracked.apply(sev, plan)
    return plan.run(sev, span, tracked=False)[0]
