"""The forms that run AugMix's chains: each one function, registered once in ``EXECUTORS``.

``AugMixBatch`` draws, computes every application's op parameter and flattens the chains into
``Steps`` (image n = (view * width + chain) * B + sample, steps first); a form maps the clean
batch and the ``Steps`` to every chain's output. The forms give the same views and gradients for
the same draws (tests pin it):

* ``"grouped"`` (``run_grouped``): at each step the images are grouped by the op they drew (one
  ``argsort``, and ONE host sync per call, ``.tolist()`` of all group sizes); each op runs once on
  its group, all geometric ops of the step as one warp. Each image is touched by one op per step:
  the least arithmetic. Without a gradient each group is gathered and written back in place
  (``run_in_place``); with one, each step regroups the images with one gather (``_GatherGroups``)
  and concatenates the groups (``run_permuted``).
* ``"static"`` (``run_static``): every op runs on every image at every step and ``torch.where``
  keeps the drawn one (an op that is the identity at parameter 0, solarize, needs no select). No
  shape depends on the draw: nothing is read back to the host, the call is the same kernels every
  time (it runs on the ``meta`` device, and compiles with ``torch.compile(fullgraph=True)``), and
  it dispatches fewer operators. The price is arithmetic: each op touches N images instead of its
  group (the operator counts and CPU times of both forms: docs/benchmarks.md).

A new form is one more function ``(x, steps, groups) -> [N,3,H,W]`` added to ``EXECUTORS``; its
name then is a valid ``strategy`` (``augmix.STRATEGIES`` is read off this dict).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import AFFINE_TERMS, Op, grid_terms, pil_affine, warp_grid_terms

__all__ = ["EXECUTORS", "OpGroups", "Steps", "op_tables", "run_grouped", "run_static"]

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


def op_tables(ops: tuple[Op, ...], groups: OpGroups) -> dict[str, Tensor]:
    """The op tables looked up per application, by the module's buffer names: each op's group,
    its (non-idle) group one-hot, the ``pil_affine`` term its parameter sets (none for the
    non-geometric ops), and its magnitude map as (scale, offset) of ``parameter = level * scale +
    offset`` (``Op.parameter``) at row ``2 * op + (sign > 0)``: a signed op's scale is negated in
    its negative row."""
    group = torch.tensor(groups.group)
    terms = torch.zeros(len(ops), len(AFFINE_TERMS))
    coef = []
    for i, op in enumerate(ops):
        if op.affine_term is not None:
            terms[i, op.affine_term] = 1.0
        scale = op.max_param / 10.0 if op.max_param is not None else 0.0
        coef += [[-scale if op.signed else scale, op.offset], [scale, op.offset]]
    return {
        "_group_of_op": group,
        "_group_onehot": torch.eye(groups.n_groups - 1, dtype=torch.bool)[group],
        "_term_onehot": terms,
        "_op_coef": torch.tensor(coef, dtype=torch.float32),
        "_op_coef64": torch.tensor(coef, dtype=torch.float64),
    }


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
            cur = _Select.apply(every[:, t], *outs, cur)
            continue
        out = cur
        if grid is not None:
            out = torch.where(masks[0], warp_grid_terms(cur, *grid[t]), cur)
        for j, op in enumerate(groups.other_ops):
            if op.identity_at_zero:  # the identity where not drawn: no select needed
                out = op.apply_prepared(out, coefs[j][t])
            else:
                out = torch.where(masks[first + j], op.apply_prepared(cur, coefs[j][t]), out)
        cur = out
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
            cur.index_copy_(0, idx, apply_group(groups, g, src, steps, t, idx))
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
        cur = torch.cat(outs)
        if t + 1 < d:  # regroup by the next step's op
            perm = torch.argsort(key[t + 1].index_select(0, chain_at), stable=True)
            chain_at = chain_at.index_select(0, perm)
            group_imgs = _GatherGroups.apply(cur, perm, sizes[t + 1])
    restore = torch.empty_like(chain_at).scatter_(0, chain_at, torch.arange(n, device=x.device))
    return _permute_rows(cur, restore)


Executor = Callable[[Tensor, Steps, OpGroups], Tensor]
# The one registry of forms, in the order ``augmix.STRATEGIES`` lists them after "auto".
EXECUTORS: dict[str, Executor] = {"grouped": run_grouped, "static": run_static}
