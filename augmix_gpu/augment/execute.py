"""The forms that run an AugMix call: each one function, registered once in ``EXECUTORS``.

``AugMixBatch`` draws and validates; a form maps a ``Call`` (the batch, the draws, the severity,
the module's tables and the ``Output`` asked for) to the outputs. The forms give the same views
and gradients for the same draws (tests pin it):

* ``"grouped"`` and ``"static"``, the reference forms (``reference``): every application's op
  parameter, warp grid terms and op coefficients are computed once per call (``steps_of``), a chain
  runner maps the clean batch and the ``Steps`` to every chain's output, and ``mix_views`` mixes.

  - ``run_grouped``: at each step the images are grouped by the op they drew (one ``argsort``,
    and ONE host sync per call, ``.tolist()`` of all group sizes); each op runs once on its group,
    all geometric ops of the step as one warp. Each image is touched by one op per step: the least
    arithmetic. Without a gradient each group is gathered and written back in place
    (``run_in_place``); with one, each step regroups the images with one gather
    (``_GatherGroups``) and concatenates the groups (``run_permuted``).
  - ``run_static``: every op runs on every image at every step and ``torch.where`` keeps the drawn
    one (an op that is the identity at parameter 0, solarize, needs no select). No shape depends
    on the draw: nothing is read back to the host, the call is the same kernels every time (it
    runs on the ``meta`` device, and compiles with ``torch.compile(fullgraph=True)``), and it
    dispatches fewer operators. The price is arithmetic and memory traffic: each op writes N full
    images instead of its group's.

* ``"fused"`` (``run_fused``, kernels in ``fused_kernels.py``): per depth step one Triton kernel
  applies each image's own op, reading and writing each running chain's image once, and one
  kernel mixes and writes the network's input. No host read, no shape that depends on the draw.
  CUDA, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).

The operator counts, bytes and CPU times of the forms are in docs/benchmarks.md. A new form is one
more function ``(Call) -> outputs`` added to ``EXECUTORS``; its name then is a valid ``strategy``
(``augmix.STRATEGIES`` is read off this dict).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .ops import (
    _TIE_MARGIN,
    AFFINE_TERMS,
    OFFICIAL_CODES,
    Op,
    grid_terms,
    pil_affine,
    warp_grid_terms,
)

__all__ = [
    "EXECUTORS",
    "LEVEL_LOW",
    "Call",
    "OpGroups",
    "Output",
    "Steps",
    "fused_unavailable",
    "op_tables",
    "run_grouped",
    "run_static",
]

LEVEL_LOW = 0.1  # official sample_level: level ~ U(0.1, severity)
Grid = list[tuple[Tensor, Tensor]]  # per step: grid terms ([N,2,1,W], [N,2,H,1]) of every warp
Coefs = list[tuple[Tensor, ...]]  # per non-geometric op, per step: its Op.prepare coefficients


@dataclass(frozen=True)
class OpGroups:
    """How a module's ops are grouped: group 0 is the fused warp of every geometric op (if there
    is one), then one group per other op; the last group, ``idle``, holds finished chains."""

    group: tuple[int, ...]  # the group of each op index
    other_ops: tuple[Op, ...]  # the non-geometric ops, in group order
    has_warp: bool

    @classmethod
    def of(cls, ops: tuple[Op, ...]) -> OpGroups:
        other = tuple(op for op in ops if op.affine_term is None)
        has_warp = len(other) < len(ops)
        first = int(has_warp)
        group = tuple(0 if op.affine_term is not None else first + other.index(op) for op in ops)
        return cls(group, other, has_warp)

    @property
    def n_groups(self) -> int:
        return int(self.has_warp) + len(self.other_ops) + 1

    @property
    def idle(self) -> int:
        return self.n_groups - 1


def op_tables(
    ops: tuple[Op, ...], groups: OpGroups, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Tensor]:
    """The tables looked up per application, by the module's buffer names: each op's group,
    its (non-idle) group one-hot, the ``pil_affine`` term its parameter sets (none for the
    non-geometric ops), and its magnitude map as (scale, offset, official unit code) of
    ``parameter = level * scale + offset`` (``Op.parameter``; ``Op.official_parameter`` truncates
    ``level * scale`` to whole units) at row ``2 * op + (sign > 0)``: a signed op's scale is
    negated in its negative row. And the normalisation folded into the mix, ``x / std - mean / std``:
    ``_norm [2, 3]`` = (1 / std, -mean / std)."""
    group = torch.tensor(groups.group)
    terms = torch.zeros(len(ops), len(AFFINE_TERMS))
    coef = []
    for i, op in enumerate(ops):
        if op.affine_term is not None:
            terms[i, op.affine_term] = 1.0
        scale = op.max_param / 10.0 if op.max_param is not None else 0.0
        code = OFFICIAL_CODES[op.official]
        coef += [[-scale if op.signed else scale, op.offset, code], [scale, op.offset, code]]
    std_t, mean_t = torch.tensor(std), torch.tensor(mean)
    return {
        "_group_of_op": group,
        "_group_onehot": torch.eye(groups.n_groups - 1, dtype=torch.bool)[group],
        "_term_onehot": terms,
        "_op_coef": torch.tensor(coef, dtype=torch.float32),
        "_op_coef64": torch.tensor(coef, dtype=torch.float64),
        "_norm": torch.stack((1.0 / std_t, -mean_t / std_t)),
    }


class Draws(Protocol):
    """Every random choice of a call (``augmix.AugMixParams`` is one)."""

    ops: Tensor  # long [V, width, D, B]
    depth: Tensor  # long [V, width, B]
    level_u: Tensor  # [V, width, D, B] in [0, 1]
    signs: Tensor  # [V, width, D, B] in {-1, +1}
    weights: Tensor  # [V, B, width]
    mix: Tensor  # [V, B]


@dataclass(frozen=True)
class Output:
    """What a call returns: the tuple ``(clean, view_1, ...)`` in the batch's float type, or
    (``batch``) the network's input, one tensor ``[clean; view_1; ...]`` (without the clean images
    if not ``clean``) in ``dtype`` (default: the batch's float type), channels_last if asked."""

    batch: bool = False
    clean: bool = True
    dtype: torch.dtype | None = None
    channels_last: bool = False


@dataclass(frozen=True)
class Call:
    """One AugMixBatch call as a form receives it; the tables are the module's buffers (the
    ``op_tables`` names without the underscore), on the batch's device."""

    x: Tensor  # [B,3,H,W]: float in [0,1] for the reference forms, the batch as given for fused
    params: Draws
    severity: Tensor | float  # [] or [B] tensor, or a float
    tables: dict[str, Tensor]
    ops: tuple[Op, ...]
    groups: OpGroups
    normalize: bool
    output: Output
    official: bool = False  # levels="official": truncated magnitudes, uint8 after every op


@dataclass(frozen=True)
class Steps:
    """One call's chain applications, flattened: ``[D, N]`` with image n = (view * width + chain)
    * B + sample. ``grid`` and ``coefs`` hold what the reference forms compute once per call."""

    ops: Tensor  # long [D, N]: the op each application drew
    active: Tensor  # bool [D, N]: the chain has not finished
    drawn: Tensor  # bool [groups - 1, D, N]: each active application's group
    param: Tensor  # [D, N]: each application's op parameter, differentiable in the severity
    grid: Grid | None  # None without geometric ops
    coefs: Coefs
    group_of_op: Tensor  # long [ops]: the group table, on the batch's device
    round_levels: bool = False  # levels="official": every op's output rounded to a uint8 level

    def settle(self, images: Tensor) -> Tensor:
        """A step's images as the next step reads them: as they are, or (official levels) on
        the uint8 grid as PIL stores every op's output: its float results are truncated (the
        bilinear sampler's and ImageEnhance's ``(UINT8) v``, autocontrast's ``int()``), with the
        tie margin so that a level computed as k - 1e-6 stays k."""
        if not self.round_levels:
            return images
        return torch.floor(images * 255.0 + _TIE_MARGIN) / 255.0


def warp_terms(param: Tensor, ops: Tensor, term_onehot: Tensor, h: int, w: int) -> Grid:
    """``grid_terms`` of every application's PIL matrix, per step ``([N,2,1,W], [N,2,H,1])``,
    built once per call: each parameter is put in the ``pil_affine`` term of its op (the other
    ops set none: the identity)."""
    d, n = param.shape
    terms = term_onehot[ops] * param[..., None]  # [D, N, 5]
    along_row, along_col = grid_terms(pil_affine(terms, h, w).view(d * n, 2, 3), h, w)
    rows, cols = along_row.view(d, n, 2, 1, w), along_col.view(d, n, 2, h, 1)
    return list(zip(rows.unbind(0), cols.unbind(0)))


def coefficients(groups: OpGroups, param: Tensor, drawn: Tensor) -> Coefs:
    """Each non-geometric op's coefficients (``Op.prepare``) for all steps at once, per step,
    from its own applications' parameters and 0 elsewhere (another op's magnitude can be out
    of its range, e.g. posterize at 256 bits, whose inf would turn a zero gradient into NaN).
    ``drawn`` is ``[groups, D, N]``."""
    gated = param * drawn[int(groups.has_warp) :]
    # unbound per step: one stack in backward instead of a zero-filled gradient per step
    return [op.prepare(gated[j]).unbind(0) for j, op in enumerate(groups.other_ops)]


def _tracked(x: Tensor, steps: Steps) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or steps.param.requires_grad)


# -- the static form --------------------------------------------------------------------------


class _Select(torch.autograd.Function):
    """Row n of ``candidates[k]`` where ``masks[k, n]`` (exactly one true per row): a chain of
    ``torch.where`` forward; backward gives each candidate ``grad * mask`` (one multiply, where
    each ``torch.where`` costs two selects and two scalar tensors)."""

    @staticmethod
    def forward(ctx, masks: Tensor, *candidates: Tensor) -> Tensor:
        ctx.save_for_backward(masks)
        out = candidates[-1]
        for mask, candidate in zip(masks[:-1], candidates[:-1]):
            out = torch.where(mask, candidate, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (masks,) = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        return (None, *(grad * mask if need else None for mask, need in zip(masks, needs)))


def run_static(x: Tensor, steps: Steps, groups: OpGroups) -> Tensor:
    """Every op on every chain image at every step, kept where it was drawn (``torch.where``).

    No shape depends on the draw, so nothing is read back to the host and the call is the
    same sequence of kernels every time (CUDA graphs / torch.compile can capture it). Each
    op runs on N images instead of its group: more arithmetic, fewer launches.
    """
    drawn, grid, coefs = steps.drawn, steps.grid, steps.coefs
    d = drawn.shape[1]
    first = int(groups.has_warp)
    tracked = _tracked(x, steps)
    cur = x.repeat(steps.ops.shape[1] // x.shape[0], 1, 1, 1)  # chain n starts as sample n % B
    if tracked:  # _Select takes every row's mask, the idle one's too
        every = torch.cat((drawn, ~steps.active[None]))[..., None, None, None]
    for t in range(d):
        masks = drawn[:, t, :, None, None, None]  # [groups, N, 1, 1, 1]
        if tracked:  # every op's output and the input (idle), selected by one function
            outs = [warp_grid_terms(cur, *grid[t])] if grid is not None else []
            outs += [op.apply_prepared(cur, coefs[j][t]) for j, op in enumerate(groups.other_ops)]
            cur = steps.settle(_Select.apply(every[:, t], *outs, cur))
            continue
        out = cur
        if grid is not None:
            out = torch.where(masks[0], warp_grid_terms(cur, *grid[t]), cur)
        for j, op in enumerate(groups.other_ops):
            if op.identity_at_zero:  # the identity where not drawn: no select needed
                out = op.apply_prepared(out, coefs[j][t])
            else:
                out = torch.where(masks[first + j], op.apply_prepared(cur, coefs[j][t]), out)
        cur = steps.settle(out)
    return cur


# -- the grouped form -------------------------------------------------------------------------


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward is the inverse permutation (one gather, not zeros + index_add)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor) -> Tensor:
        ctx.save_for_backward(perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (perm,) = ctx.saved_tensors
        inverse = torch.empty_like(perm).scatter_(
            0, perm, torch.arange(len(perm), device=perm.device)
        )
        return grad.index_select(0, inverse), None


class _GatherGroups(torch.autograd.Function):
    """``x[perm].split(sizes)`` as separate tensors, for a permutation ``perm``.

    Backward writes each group's gradient straight into its rows: one pass over the images, where
    autograd's split + index_select backward would concatenate the groups' gradients and then
    un-permute them (two passes).
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
        ctx.save_for_backward(perm)
        ctx.sizes = sizes
        return tuple(x.index_select(0, idx) for idx in perm.split(sizes))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None, None]:
        (perm,) = ctx.saved_tensors
        out = grads[0].new_empty((len(perm), *grads[0].shape[1:]))
        for idx, grad in zip(perm.split(ctx.sizes), grads):
            out.index_copy_(0, idx, grad)
        return out, None, None


def _permute_rows(x: Tensor, perm: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteRows.apply(x, perm)
    return x.index_select(0, perm)


def run_grouped(x: Tensor, steps: Steps, groups: OpGroups) -> Tensor:
    """Each op once per step on the images that drew it; ONE host sync per call (group sizes)."""
    active = steps.active
    kind = steps.group_of_op[steps.ops].masked_fill_(~active, groups.idle)  # [D, N] group or idle
    counts = torch.cat((steps.drawn.sum(dim=-1), (~active).sum(dim=-1, keepdim=True).t()))
    sizes = counts.t().tolist()  # the one host sync of a grouped call
    run = run_permuted if _tracked(x, steps) else run_in_place
    return run(x, steps, groups, kind, sizes)


def apply_group(
    groups: OpGroups, g: int, src: Tensor, steps: Steps, t: int, rows: Tensor
) -> Tensor:
    """Run group ``g`` on its images ``src`` (chains ``rows`` at step ``t``): the fused warp
    (group 0) or one non-geometric op."""
    if steps.grid is not None and g == 0:
        along_row, along_col = steps.grid[t]
        return warp_grid_terms(
            src, along_row.index_select(0, rows), along_col.index_select(0, rows)
        )
    j = g - int(groups.has_warp)
    return groups.other_ops[j].apply_prepared(src, steps.coefs[j][t].index_select(0, rows))


def run_in_place(
    x: Tensor, steps: Steps, groups: OpGroups, key: Tensor, sizes: list[list[int]]
) -> Tensor:
    """No gradient: gather each group, write its result back in place; finished chains stay put."""
    d, n = key.shape
    b = x.shape[0]
    order = torch.argsort(key, dim=1, stable=True)
    cur = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for t in range(d):
        for g, idx in enumerate(torch.split(order[t], sizes[t])):
            if g == groups.idle:
                if t == 0:  # chains of depth 0 (hand-made params) stay clean
                    cur.index_copy_(0, idx, x.index_select(0, idx.remainder(b)))
                continue
            src = x.index_select(0, idx.remainder(b)) if t == 0 else cur.index_select(0, idx)
            cur.index_copy_(0, idx, steps.settle(apply_group(groups, g, src, steps, t, idx)))
    return cur


def run_permuted(
    x: Tensor, steps: Steps, groups: OpGroups, key: Tensor, sizes: list[list[int]]
) -> Tensor:
    """With a gradient: one regrouping gather per step, one cat of the groups' outputs.

    Images are kept in "position" order (``chain_at[i]`` is the chain at position i). The
    backward then costs one pass over the images per step (the cat's backward is views, the
    gather's writes each group's rows once), where the in-place path's per-group
    index_copy_/index_select would clone or zero-fill all N images per group.
    """
    d, n = key.shape
    chain_at = torch.argsort(key[0], stable=True)
    group_imgs = x.index_select(0, chain_at.remainder(x.shape[0])).split(sizes[0])
    for t in range(d):
        rows = chain_at.split(sizes[t])
        outs = []
        for g, src in enumerate(group_imgs):
            # chains already finished (or of depth 0) pass through
            outs.append(src if g == groups.idle else apply_group(groups, g, src, steps, t, rows[g]))
        cur = steps.settle(torch.cat(outs))
        if t + 1 < d:  # regroup by the next step's op
            perm = torch.argsort(key[t + 1].index_select(0, chain_at), stable=True)
            chain_at = chain_at.index_select(0, perm)
            group_imgs = _GatherGroups.apply(cur, perm, sizes[t + 1])
    restore = torch.empty_like(chain_at).scatter_(0, chain_at, torch.arange(n, device=x.device))
    return _permute_rows(cur, restore)


# -- what the reference forms share: parameters, steps, the mix -------------------------------


def level_span(severity: Tensor | float, x: Tensor) -> Tensor | float:
    """``severity - 0.1``, the span of the levels ``U(0.1, severity)``, in ``x``'s float type (a
    float severity is rounded as a tensor of that type would be, so both give the same levels)."""
    if isinstance(severity, Tensor):
        return severity.to(device=x.device, dtype=x.dtype) - LEVEL_LOW
    if x.dtype == torch.float64:
        return severity - LEVEL_LOW
    return float(np.float32(severity) - np.float32(LEVEL_LOW))


def op_parameters(call: Call) -> Tensor:
    """Every application's op parameter ``[V, width, D, B]``, differentiable in the severity:
    level ``0.1 + u (s - 0.1)``, then ``Op.parameter`` of its op, signed if the op is."""
    p, x = call.params, call.x
    span = level_span(call.severity, x)
    if isinstance(span, Tensor) and span.dim() == 1:
        span = span.view(1, 1, 1, -1)
    level = LEVEL_LOW + p.level_u.to(x.dtype) * span
    table = call.tables["op_coef64" if x.dtype == torch.float64 else "op_coef"]
    coef = table[torch.add(p.signs > 0, p.ops, alpha=2)]
    scaled = level * coef[..., 0]
    if call.official:  # int_parameter: whole units (degrees, bits, levels, pixels of a side)
        code = coef[..., 2]
        h, w = x.shape[-2:]
        unit = code.clamp_min(0.0) + (code == -1.0) * w + (code == -2.0) * h
        scaled = torch.where(unit > 0, torch.trunc(scaled * unit) / unit.clamp_min(1.0), scaled)
    return scaled + coef[..., 1]


def steps_of(call: Call) -> Steps:
    """The chains flattened for the chain runners: image n = (view * width + chain) * B + sample,
    steps first; which applications run, each one's group, and every op's terms, once."""
    p, x, tables = call.params, call.x, call.tables
    v, w, d, b = p.ops.shape
    n, (h, wd) = v * w * b, x.shape[-2:]
    param = op_parameters(call).permute(2, 0, 1, 3).reshape(d, n)
    ops = p.ops.permute(2, 0, 1, 3).reshape(d, n)
    # which applications run (the chain has not finished) and each one's group
    active = p.depth.reshape(1, n) > torch.arange(d, device=x.device).unsqueeze(1)
    drawn = tables["group_onehot"][ops].permute(2, 0, 1) & active  # [groups, D, N]
    grid = None  # every warp's grid terms, built once for all steps (grid_terms)
    if call.groups.has_warp:
        grid = warp_terms(param, ops, tables["term_onehot"], h, wd)
    coefs = coefficients(call.groups, param, drawn)
    return Steps(ops, active, drawn, param, grid, coefs, tables["group_of_op"], call.official)


def mix_views(call: Call, chains: Tensor) -> tuple[Tensor, ...]:
    """``(clean, view_1, ...)``: ``mixed = (1 - m) x + m sum_i w_i chain_i``, normalised; the
    normalisation folded into the coefficients (it is affine and the weights sum to 1)."""
    x, p = call.x, call.params
    dtype = x.dtype
    norm = call.tables["norm"].to(dtype)
    inv_std, bias = (
        norm if call.normalize else (torch.ones_like(norm[0]), torch.zeros_like(norm[1]))
    )
    inv_std, bias = inv_std.view(3, 1, 1), bias.view(3, 1, 1)
    m = p.mix.to(dtype)[..., None]  # [V, B, 1]
    # normalise(mixed) = bias + inv_std * ((1-m) x + sum_i m w_i chain_i), one pass per term:
    # the coefficients [V, B, 1 + width, 3, 1, 1] of x and of each chain, per channel.
    coef = torch.cat((1.0 - m, m * p.weights.to(dtype)), dim=-1)[..., None, None, None]
    coef = coef * inv_std
    views = torch.addcmul(bias, x.unsqueeze(0), coef[:, :, 0])  # [V, B, 3, H, W]
    # unbind, not chains[:, i]: in backward, each indexing would zero-fill a gradient of the
    # full chains size (3 passes over every chain image); unbind's backward is one stack.
    for i, chain in enumerate(chains.unbind(1)):
        views = views.addcmul_(chain, coef[:, :, i + 1])
    clean = torch.addcmul(bias, x, inv_std)
    return (clean, *views.unbind(0))


ChainRunner = Callable[[Tensor, Steps, OpGroups], Tensor]  # (x, steps, groups) -> [N,3,H,W]


def reference_chains(call: Call, run: ChainRunner) -> Tensor:
    """Every chain's output ``[V, width, B, 3, H, W]``, by a chain runner."""
    v, w, _, b = call.params.ops.shape
    return run(call.x, steps_of(call), call.groups).view(v, w, b, *call.x.shape[1:])


def _as_output(outputs: tuple[Tensor, ...], output: Output) -> tuple[Tensor, ...] | Tensor:
    """The tuple, or the network's input made from it (what the trainer did before the fused
    form wrote it directly: concatenate, cast, channels_last)."""
    if not output.batch:
        return outputs
    batch = torch.cat(outputs if output.clean else outputs[1:])
    if output.dtype is not None:
        batch = batch.to(output.dtype)
    return batch.contiguous(memory_format=torch.channels_last) if output.channels_last else batch


def reference(run: ChainRunner) -> Callable[[Call], tuple[Tensor, ...] | Tensor]:
    """A reference form: the chains by ``run``, then ``mix_views``."""

    def form(call: Call) -> tuple[Tensor, ...] | Tensor:
        return _as_output(mix_views(call, reference_chains(call, run)), call.output)

    form.__doc__ = f"The reference form that runs its chains with ``{run.__name__}``."
    return form


# -- the fused form ---------------------------------------------------------------------------


def fused_unavailable(device: torch.device | str) -> str | None:
    """Why the fused form cannot run on ``device`` (one line), or None if it can."""
    kind = torch.device(device).type
    if importlib.util.find_spec("triton") is None:
        return (
            "strategy 'fused' needs Triton (it ships with torch's Linux wheels: pip install triton)"
        )
    if kind == "cuda":
        return None
    if kind == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return None
        return (
            "strategy 'fused' on the CPU runs under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing torch (or use a CUDA device, or strategy 'grouped')"
        )
    return f"strategy 'fused' runs on CUDA (or the CPU under TRITON_INTERPRET=1), not on {kind!r}"


def run_fused(call: Call) -> tuple[Tensor, ...] | Tensor:
    """The fused form (``fused.py``): the network's input written by Triton kernels."""
    reason = fused_unavailable(call.x.device)
    if reason is not None:
        raise RuntimeError(reason)
    from .fused import run_fused_call  # Triton is imported only when the form runs

    t, out = call.tables, call.output
    coef = t["op_coef64"] if call.x.dtype == torch.float64 else t["op_coef"]
    batch = run_fused_call(
        call.x, call.params, call.severity, (t["fused_op"], coef, t["norm"]), call.normalize,
        clean=out.clean or not out.batch, dtype=out.dtype, channels_last=out.channels_last,
        official=call.official,
    )  # fmt: skip
    return batch if out.batch else batch.split(call.x.shape[0])


# The reference forms' chain runners, and the one registry of forms, in the order
# ``augmix.STRATEGIES`` lists them after "auto".
CHAIN_RUNNERS: dict[str, ChainRunner] = {"grouped": run_grouped, "static": run_static}
Form = Callable[[Call], "tuple[Tensor, ...] | Tensor"]
EXECUTORS: dict[str, Form] = {
    **{name: reference(run) for name, run in CHAIN_RUNNERS.items()},
    "fused": run_fused,
}
