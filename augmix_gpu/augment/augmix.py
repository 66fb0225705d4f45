"""Batched AugMix in which every sample draws its own chains: sample, then apply.

``AugMixBatch(x)`` returns ``(clean, view_1, ..., view_V)`` for a uint8 or float ``[B,3,H,W]`` batch
on any device. Every random choice (ops, depths, levels, signs, Dirichlet weights, Beta mix) is
drawn per sample by ``sample_params`` up front on the device; ``apply`` is deterministic given them.

The ``V * width * B`` chains are flattened into N images and run step by step (depth 1..3), with
no Python loop over samples. Per call, once: each application's op parameter (one table lookup),
each warp's PIL matrix and sampling-grid terms, each op's parameter-only coefficients
(``Op.prepare``). Then one of two forms, which give the same views and gradients for the same
draws (tests pin it):

* ``strategy="grouped"``: at each step the images are grouped by the op they drew (one ``argsort``,
  and ONE host sync per call, ``.tolist()`` of all group sizes); each op runs once on its group,
  all geometric ops of the step as one warp. Each image is touched by one op per step: the least
  arithmetic. Without a gradient each group is gathered and written back in place; with one,
  each step regroups the images with one gather (``_GatherGroups``) and concatenates the groups.
* ``strategy="static"``: every op runs on every image at every step and ``torch.where`` keeps the
  drawn one (an op that is the identity at parameter 0, solarize, needs no select). No shape
  depends on the draw: nothing is read back to the host, the call is the same kernels every time
  (it runs on the ``meta`` device, and compiles with ``torch.compile(fullgraph=True)``), and it
  dispatches fewer operators (199 vs 251 per call at the defaults; 385 vs 437 for the learnable
  forward + backward). The price is arithmetic: each op touches N images instead of its group,
  4.2x the CPU time of ``grouped`` at 224 px (README, AugMix benchmark).
* ``strategy="auto"`` (default): ``grouped`` on the CPU (measured: 4.2x less CPU time), ``static``
  on any other device. The second half is argued, not measured (no GPU has run this code): a GPU
  training step should not wait on the host (a sync waits for every queued kernel and rules out
  CUDA-graph capture); static's extra arithmetic is memory traffic on a GPU too, so the GPU check
  decides (benchmark rows d and d-grouped); pass ``strategy="grouped"`` to compare.

The counts do not depend on B (a test counts them at B=8 and B=256). Mixing happens in [0,1]
space, ``mixed = (1-m) x + m sum_i w_i chain_i(x)``, which equals the official "mix after
preprocess" because normalisation is affine and the weights sum to 1; the normalisation is
folded into the mixing coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_image_batch, check_in_range, check_int_at_least, check_positive
from ..runtime import tune_for_cpu_augmentation
from .ops import AFFINE_TERMS, Op, get_ops, grid_terms, pil_affine, warp_grid_terms

__all__ = [
    "STRATEGIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugMixBatch",
    "AugMixParams",
    "normalize_images",
    "to_unit_float",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRATEGIES = ("auto", "grouped", "static")
MAX_SEVERITY = 10.0  # the level scale is 0..10 (official PARAMETER_MAX)
_LEVEL_LOW = 0.1  # official sample_level: U(0.1, severity)


def to_unit_float(x: Tensor, name: str = "x", check_values: bool = True) -> Tensor:
    """Validate an image batch and return it as float in [0,1] (uint8 / 255; half -> float32).

    float32 and float64 are kept (float64 lets gradcheck run through ``apply``).
    ``check_values=False`` skips the range check of a float batch (it reads the device).
    """
    check_image_batch(x, name, check_values=check_values)
    if x.dtype == torch.uint8:
        return torch.div(x, 255.0)  # float32
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def normalize_images(x: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """uint8 (0..255) or float [0,1] ``[B,3,H,W]`` -> float32, ``(x - mean) / std`` per channel.

    The input the network sees without AugMix (``--aug_type none``, evaluation): the same
    constants AugMixBatch folds into its mixing, so clean views agree everywhere.
    """
    x = to_unit_float(x).to(torch.float32)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass
class AugMixParams:
    """Every random choice of one AugMix call, per sample (``D`` = 3, or the fixed depth)."""

    ops: Tensor  # long [V, width, D, B]: index into the op tuple in use
    depth: Tensor  # long [V, width, B]: chain length, 1..D
    level_u: Tensor  # [V, width, D, B] in [0,1]; level = 0.1 + u * (severity - 0.1)
    signs: Tensor  # [V, width, D, B] in {-1, +1}; used by signed ops only
    weights: Tensor  # [V, B, width]: Dirichlet(alpha), sums to 1 over width
    mix: Tensor  # [V, B]: Beta(alpha, alpha), weight of the augmented mixture

    @property
    def batch_size(self) -> int:
        return self.ops.shape[-1]

    @property
    def num_views(self) -> int:
        return self.ops.shape[0]

    @property
    def width(self) -> int:
        return self.ops.shape[1]

    def to(self, device: torch.device | str) -> AugMixParams:
        return AugMixParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def subset(self, index: Tensor | list[int] | slice) -> AugMixParams:
        """The params of the samples ``index`` (for per-image checks and plots)."""
        return AugMixParams(
            ops=self.ops[..., index],
            depth=self.depth[..., index],
            level_u=self.level_u[..., index],
            signs=self.signs[..., index],
            weights=self.weights[:, index],
            mix=self.mix[:, index],
        )


def _dirichlet_last(alpha: Tensor, generator: torch.Generator | None) -> Tensor:
    """Dirichlet over the last dim as normalised Gammas (reproducible with ``generator``).

    For tiny alpha all Gammas can underflow to 0 in float32; adding the smallest normal float
    makes that case uniform and leaves every Gamma above ~1e-31 unchanged (it is below half
    their last bit).
    """
    g = torch._standard_gamma(alpha, generator=generator).add_(torch.finfo(alpha.dtype).tiny)
    return g / g.sum(dim=-1, keepdim=True)


def _level_span(severity: float, dtype: torch.dtype) -> float:
    """``severity - 0.1`` as a ``dtype`` tensor computes it (float32 rounds both, then subtracts),
    so a float severity gives the same levels as the same severity in a tensor."""
    if dtype == torch.float64:
        return severity - _LEVEL_LOW
    return float(np.float32(severity) - np.float32(_LEVEL_LOW))


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


def _permute_rows(x: Tensor, perm: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteRows.apply(x, perm)
    return x.index_select(0, perm)


class AugMixBatch(nn.Module):
    """AugMix on a batch of tensors, per-sample chains, in one batched pass.

    Args:
        width: chains mixed per view (official ``mixture_width``, 3).
        depth: ops per chain; -1 draws 1..3 per chain (official ``mixture_depth``).
        alpha: Dirichlet / Beta concentration (official 1.0).
        all_ops: add color, contrast, brightness, sharpness (they overlap ImageNet-C).
        severity: a float in (0, 10], or an ``nn.Module`` with
            ``rsample(batch_size, generator=None) -> Tensor`` ([] or [B], differentiable),
            e.g. ``augmix_gpu.severity.LearnableSeverity``; its parameters register here.
        normalize: subtract ``mean`` and divide by ``std`` (per channel) on every output.
        num_views: augmented views per call (2 for the JSD loss).
        strategy: ``"grouped"`` (each op on its group; one host sync per call), ``"static"``
            (every op on every image; nothing read back to the host) or ``"auto"`` (grouped on
            the CPU, static elsewhere); the same views and gradients (module docstring).
    Shape:
        input ``[B,3,H,W]`` uint8 (0..255) or float in [0,1]; outputs ``num_views + 1`` tensors
        ``[B,3,H,W]`` float32 (float64 in, float64 out): clean first, then the views.
    """

    last_params: AugMixParams | None
    last_severity: Tensor | None

    def __init__(
        self,
        width: int = 3,
        depth: int = -1,
        alpha: float = 1.0,
        all_ops: bool = False,
        severity: float | nn.Module = 3.0,
        normalize: bool = True,
        num_views: int = 2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.width = check_int_at_least(width, "width", 1)
        if isinstance(depth, bool) or not isinstance(depth, int) or not (depth == -1 or depth >= 1):
            raise ValueError(
                f"depth: expected -1 (random 1..3 per chain) or an integer >= 1, got {depth!r}"
            )
        self.depth = depth
        self.alpha = check_positive(alpha, "alpha")
        self.all_ops = bool(all_ops)
        self.num_views = check_int_at_least(num_views, "num_views", 1)
        self.normalize = bool(normalize)
        if isinstance(severity, nn.Module):
            if not callable(getattr(severity, "rsample", None)):
                raise ValueError(
                    f"severity: expected a float or an nn.Module with rsample(batch_size, generator), "
                    f"got {type(severity).__name__} without rsample"
                )
            self.severity: float | nn.Module = severity
        else:
            if isinstance(severity, bool) or not isinstance(severity, (int, float)):
                raise ValueError(
                    f"severity: expected a float in (0, 10] or a module, got {severity!r}"
                )
            self.severity = check_in_range(severity, "severity", 0.0, MAX_SEVERITY)
            if self.severity == 0.0:
                raise ValueError("severity: expected a float in (0, 10], got 0")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(
                f"mean/std: expected 3 values each and std > 0, got mean={mean}, std={std}"
            )

        if strategy not in STRATEGIES:
            raise ValueError(
                f"strategy: expected one of {STRATEGIES}, got {strategy!r} ('auto' picks 'static' "
                "on an accelerator and 'grouped' on the CPU)"
            )
        self.strategy = strategy

        self.ops: tuple[Op, ...] = get_ops(self.all_ops)
        geo = [op for op in self.ops if op.affine_term is not None]
        self._other_ops = tuple(op for op in self.ops if op.affine_term is None)
        # Group of each op index: 0 = the fused warp (if any geometric op), then one per other op;
        # the last group is "inactive" (chain already finished).
        n_warp = 1 if geo else 0
        group = [
            0 if op.affine_term is not None else n_warp + self._other_ops.index(op)
            for op in self.ops
        ]
        self._n_groups = n_warp + len(self._other_ops) + 1
        self._has_warp = bool(geo)
        self.register_buffer("_group_of_op", torch.tensor(group), persistent=False)
        self._group_of_op: Tensor
        # One-hot rows, looked up per application: its (non-idle) group, and the pil_affine term
        # its parameter sets (none for the non-geometric ops).
        onehot = torch.eye(self._n_groups - 1, dtype=torch.bool)[torch.tensor(group)]
        self.register_buffer("_group_onehot", onehot, persistent=False)
        self._group_onehot: Tensor
        terms = torch.zeros(len(self.ops), len(AFFINE_TERMS))
        for i, op in enumerate(self.ops):
            if op.affine_term is not None:
                terms[i, op.affine_term] = 1.0
        self.register_buffer("_term_onehot", terms, persistent=False)
        self._term_onehot: Tensor
        # Each op's magnitude map read off the op table once, as (scale, offset) of
        # parameter = level * scale + offset (Op.parameter), at row 2 * op + (sign > 0): the scale
        # of a signed op is negated in its negative row.
        coef = []
        for op in self.ops:
            scale = op.max_param / 10.0 if op.max_param is not None else 0.0
            coef += [[-scale if op.signed else scale, op.offset], [scale, op.offset]]
        self.register_buffer("_op_coef", torch.tensor(coef, dtype=torch.float32), persistent=False)
        self._op_coef: Tensor
        self.register_buffer(
            "_op_coef64", torch.tensor(coef, dtype=torch.float64), persistent=False
        )
        self._op_coef64: Tensor
        self.register_buffer("_inv_std", 1.0 / torch.tensor(std).view(3, 1, 1), persistent=False)
        self._inv_std: Tensor
        self.register_buffer(
            "_bias",
            -torch.tensor(mean).view(3, 1, 1) / torch.tensor(std).view(3, 1, 1),
            persistent=False,
        )
        self._bias: Tensor
        self.mean, self.std = tuple(mean), tuple(std)
        self.last_params = None
        self.last_severity = None

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    @property
    def max_depth(self) -> int:
        return 3 if self.depth == -1 else self.depth

    def extra_repr(self) -> str:
        sev = self.severity if isinstance(self.severity, float) else type(self.severity).__name__
        return (
            f"width={self.width}, depth={self.depth}, alpha={self.alpha}, all_ops={self.all_ops}, "
            f"severity={sev}, normalize={self.normalize}, num_views={self.num_views}, "
            f"strategy={self.strategy}"
        )

    # -- sampling ---------------------------------------------------------------------------

    def sample_params(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> AugMixParams:
        """Draw every random choice for ``batch_size`` samples.

        Draws happen on the generator's device (so a seeded generator gives the same params on
        any target device) and the result is moved to ``device``.
        """
        check_int_at_least(batch_size, "batch_size", 1)
        target = torch.device(device) if device is not None else None
        dev = generator.device if generator is not None else (target or torch.device("cpu"))
        v, w, d, b = self.num_views, self.width, self.max_depth, batch_size
        kw = {"generator": generator, "device": dev}
        ops = torch.randint(len(self.ops), (v, w, d, b), **kw)
        if self.depth == -1:
            depth = torch.randint(1, 4, (v, w, b), **kw)
        else:
            depth = torch.full((v, w, b), self.depth, dtype=torch.long, device=dev)
        level_u = torch.rand((v, w, d, b), **kw)
        signs = torch.randint(0, 2, (v, w, d, b), dtype=torch.float32, **kw).mul_(2.0).sub_(1.0)
        alpha = torch.full((v, b, w + 2), self.alpha, device=dev)  # the weights' and the mix's
        weights = _dirichlet_last(alpha[..., :w], generator)
        mix = _dirichlet_last(alpha[..., w:], generator)[..., 0]
        params = AugMixParams(ops, depth, level_u, signs, weights, mix)
        return params.to(target) if target is not None and target != dev else params

    def severity_value(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The severity for one call: a ``[]`` tensor for a float, else ``module.rsample(...)``."""
        if isinstance(self.severity, nn.Module):
            s = self.severity.rsample(batch_size, generator=generator)
            return s if device is None else s.to(device)
        return torch.tensor(self.severity, dtype=torch.float32, device=device)

    # -- application ------------------------------------------------------------------------

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Sample (severity first, then params) and apply: ``(clean, view_1, ..., view_V)``."""
        check_image_batch(x, "x", check_values=False)
        if isinstance(self.severity, nn.Module):
            s = self.severity_value(x.shape[0], generator=generator, device=x.device)
        else:  # a Python float: no tensor to build on the device (a blocking copy on a GPU)
            s = self.severity
        params = self.sample_params(x.shape[0], generator=generator, device=x.device)
        out = self.apply(x, params, s)
        self.last_params = params
        self.last_severity = s.detach() if isinstance(s, Tensor) else torch.tensor(s)
        return out

    def apply(
        self, x: Tensor, params: AugMixParams, severity: Tensor | float
    ) -> tuple[Tensor, ...]:
        """Deterministic AugMix given ``params``: ``(clean, view_1, ..., view_V)``, normalised if set.

        Under the ``static`` strategy a float batch is not range-checked (the check reads the
        device) but clamped to [0, 1].
        """
        x = self._unit_float(x)
        chains = self._chains(x, params, severity)  # [V, width, B, 3, H, W]
        return self._mix(x, chains, params)

    def chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        """Every chain's output before mixing, ``[V, width, B, 3, H, W]`` in [0,1] (for plots)."""
        return self._chains(self._unit_float(x), params, severity)

    def _unit_float(self, x: Tensor) -> Tensor:
        if self.strategy_for(getattr(x, "device", "cpu")) != "static":
            return to_unit_float(x)
        was_float = isinstance(x, Tensor) and x.is_floating_point()
        x = to_unit_float(x, check_values=False)
        return x.clamp(0.0, 1.0) if was_float else x

    def _check_params(self, x: Tensor, params: AugMixParams) -> None:
        b = x.shape[0]
        shape = tuple(params.ops.shape)
        want = (self.num_views, self.width, self.max_depth, b)
        if shape[:2] != want[:2] or shape[3] != b or shape[2] < 1:
            raise ValueError(
                f"params: ops has shape {shape}, expected {want} for this module and a batch of {b}: "
                "draw them with sample_params(batch_size) of the same module"
            )

    def strategy_for(self, device: torch.device | str) -> str:
        """The form a call on ``device`` runs: ``strategy``, or for ``"auto"`` ``"grouped"`` on the
        CPU and ``"static"`` on any other device (the module docstring says why)."""
        if self.strategy != "auto":
            return self.strategy
        return "grouped" if torch.device(device).type == "cpu" else "static"

    def _tables(self, device: torch.device) -> None:
        """Move the op tables to ``device`` once (a module left on the CPU would copy them, and on
        a GPU wait for the copy, at every call)."""
        if self._group_of_op.device != device:
            for name in (
                "_group_of_op",
                "_group_onehot",
                "_term_onehot",
                "_op_coef",
                "_op_coef64",
                "_inv_std",
                "_bias",
            ):
                setattr(self, name, getattr(self, name).to(device))

    def _op_parameters(self, level: Tensor, ops: Tensor, signs: Tensor) -> Tensor:
        """Each application's op parameter, ``Op.parameter(level)`` of its op, signed if the op is."""
        coef = (self._op_coef64 if level.dtype == torch.float64 else self._op_coef)[
            torch.add(signs > 0, ops, alpha=2)
        ]
        return level * coef[..., 0] + coef[..., 1]

    def _chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        self._check_params(x, params)
        v, w, d, b = params.ops.shape
        n, (_, _, h, wd) = v * w * b, x.shape
        dtype, device = x.dtype, x.device
        self._tables(device)
        if device.type == "cpu":  # keep freed memory for the next call (runtime.py): ~2x
            tune_for_cpu_augmentation()
        # Parameter of every application, differentiable in s: level -> op.parameter -> sign.
        if isinstance(severity, (int, float)) and not isinstance(severity, bool):
            span = _level_span(float(severity), dtype)  # s - 0.1, rounded as a tensor s would be
        else:
            s = torch.as_tensor(severity, device=device).to(dtype)
            if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, b)):
                raise ValueError(
                    f"severity: expected a scalar or a [B={b}] tensor, got shape {tuple(s.shape)}"
                )
            span = s - _LEVEL_LOW
        level = _LEVEL_LOW + params.level_u.to(dtype) * span  # [V, w, D, B]
        param = self._op_parameters(level, params.ops, params.signs)
        # Flatten chains: image n = (view * width + chain) * B + sample; steps first.
        param_f = param.permute(2, 0, 1, 3).reshape(d, n)
        ops_f = params.ops.permute(2, 0, 1, 3).reshape(d, n)
        # which applications run (the chain has not finished) and each one's group
        active = params.depth.reshape(1, n) > torch.arange(d, device=device).unsqueeze(1)
        drawn = self._group_onehot[ops_f].permute(2, 0, 1) & active  # [groups, D, N]
        # every warp's grid terms, built once for all steps (grid_terms)
        grid = self._grid_terms(param_f, ops_f, h, wd) if self._has_warp else None
        coefs = self._coefficients(param_f, drawn)
        tracked = torch.is_grad_enabled() and (x.requires_grad or param_f.requires_grad)
        if self.strategy_for(device) == "static":
            out = self._run_static(x, drawn, active, coefs, grid, v * w, tracked)
        else:
            idle = self._n_groups - 1
            kind = self._group_of_op[ops_f].masked_fill_(~active, idle)  # [D, N] group or idle
            counts = torch.cat((drawn.sum(dim=-1), (~active).sum(dim=-1, keepdim=True).t()))
            sizes = counts.t().tolist()  # the one host sync of a grouped call
            if tracked:
                out = self._run_permuted(x, coefs, grid, kind, sizes)
            else:
                out = self._run_in_place(x, coefs, grid, kind, sizes)
        return out.view(v, w, b, 3, h, wd)

    def _grid_terms(
        self, param_f: Tensor, ops_f: Tensor, h: int, w: int
    ) -> list[tuple[Tensor, Tensor]]:
        """``grid_terms`` of every application's PIL matrix, per step ``([N,2,1,W], [N,2,H,1])``,
        built once per call: each parameter is put in the ``pil_affine`` term of its op (the other
        ops set none: the identity)."""
        d, n = param_f.shape
        terms = self._term_onehot[ops_f] * param_f[..., None]  # [D, N, 5]
        along_row, along_col = grid_terms(pil_affine(terms, h, w).view(d * n, 2, 3), h, w)
        rows, cols = along_row.view(d, n, 2, 1, w), along_col.view(d, n, 2, h, 1)
        return list(zip(rows.unbind(0), cols.unbind(0)))

    def _coefficients(self, param_f: Tensor, drawn: Tensor) -> list[tuple[Tensor, ...]]:
        """Each non-geometric op's coefficients (``Op.prepare``) for all steps at once, per step,
        from its own applications' parameters and 0 elsewhere (another op's magnitude can be out
        of its range, e.g. posterize at 256 bits, whose inf would turn a zero gradient into NaN).
        ``drawn`` is ``[groups, D, N]``."""
        gated = param_f * drawn[int(self._has_warp) :]
        # unbound per step: one stack in backward instead of a zero-filled gradient per step
        return [op.prepare(gated[j]).unbind(0) for j, op in enumerate(self._other_ops)]

    def _apply_group(
        self,
        g: int,
        src: Tensor,
        coefs: list[tuple[Tensor, ...]],
        grid: list[tuple[Tensor, Tensor]] | None,
        t: int,
        rows: Tensor,
    ) -> Tensor:
        """Run group ``g`` on its images ``src`` (chains ``rows`` at step ``t``): the fused warp
        (group 0) or one non-geometric op."""
        if grid is not None and g == 0:
            along_row, along_col = grid[t]
            return warp_grid_terms(
                src, along_row.index_select(0, rows), along_col.index_select(0, rows)
            )
        j = g - int(self._has_warp)
        return self._other_ops[j].apply_prepared(src, coefs[j][t].index_select(0, rows))

    def _run_static(
        self,
        x: Tensor,
        drawn: Tensor,
        active: Tensor,
        coefs: list[tuple[Tensor, ...]],
        grid: list[tuple[Tensor, Tensor]] | None,
        copies: int,
        tracked: bool,
    ) -> Tensor:
        """Every op on every chain image at every step, kept where it was drawn (``torch.where``).

        No shape depends on the draw, so nothing is read back to the host and the call is the
        same sequence of kernels every time (CUDA graphs / torch.compile can capture it). Each
        op runs on N images instead of its group: more arithmetic, fewer launches.
        """
        d = drawn.shape[1]
        first = int(self._has_warp)
        cur = x.repeat(copies, 1, 1, 1)  # chain image n starts as sample n % B
        if tracked:  # _Select takes every row's mask, the idle one's too
            every = torch.cat((drawn, ~active[None]))[..., None, None, None]
        for t in range(d):
            masks = drawn[:, t, :, None, None, None]  # [groups, N, 1, 1, 1]
            if tracked:  # every op's output and the input (idle), selected by one function
                outs = [warp_grid_terms(cur, *grid[t])] if grid is not None else []
                outs += [
                    op.apply_prepared(cur, coefs[j][t]) for j, op in enumerate(self._other_ops)
                ]
                cur = _Select.apply(every[:, t], *outs, cur)
                continue
            out = cur
            if grid is not None:
                out = torch.where(masks[0], warp_grid_terms(cur, *grid[t]), cur)
            for j, op in enumerate(self._other_ops):
                if op.identity_at_zero:  # the identity where not drawn: no select needed
                    out = op.apply_prepared(out, coefs[j][t])
                else:
                    out = torch.where(masks[first + j], op.apply_prepared(cur, coefs[j][t]), out)
            cur = out
        return cur

    def _run_in_place(
        self,
        x: Tensor,
        coefs: list[tuple[Tensor, ...]],
        grid: list[tuple[Tensor, Tensor]] | None,
        key: Tensor,
        sizes: list[list[int]],
    ) -> Tensor:
        """No gradient: gather each group, write its result back in place; finished chains stay put."""
        d, n = key.shape
        b = x.shape[0]
        idle = self._n_groups - 1
        order = torch.argsort(key, dim=1, stable=True)
        cur = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for t in range(d):
            for g, idx in enumerate(torch.split(order[t], sizes[t])):
                if g == idle:
                    if t == 0:  # chains of depth 0 (hand-made params) stay clean
                        cur.index_copy_(0, idx, x.index_select(0, idx.remainder(b)))
                    continue
                src = x.index_select(0, idx.remainder(b)) if t == 0 else cur.index_select(0, idx)
                cur.index_copy_(0, idx, self._apply_group(g, src, coefs, grid, t, idx))
        return cur

    def _run_permuted(
        self,
        x: Tensor,
        coefs: list[tuple[Tensor, ...]],
        grid: list[tuple[Tensor, Tensor]] | None,
        key: Tensor,
        sizes: list[list[int]],
    ) -> Tensor:
        """With a gradient: one regrouping gather per step, one cat of the groups' outputs.

        Images are kept in "position" order (``chain_at[i]`` is the chain at position i). The
        backward then costs one pass over the images per step (the cat's backward is views, the
        gather's writes each group's rows once), where the in-place path's per-group
        index_copy_/index_select would clone or zero-fill all N images per group.
        """
        d, n = key.shape
        idle = self._n_groups - 1
        chain_at = torch.argsort(key[0], stable=True)
        groups = x.index_select(0, chain_at.remainder(x.shape[0])).split(sizes[0])
        for t in range(d):
            rows = chain_at.split(sizes[t])
            outs = []
            for g, src in enumerate(groups):
                # chains already finished (or of depth 0) pass through
                outs.append(
                    src if g == idle else self._apply_group(g, src, coefs, grid, t, rows[g])
                )
            cur = torch.cat(outs)
            if t + 1 < d:  # regroup by the next step's op
                perm = torch.argsort(key[t + 1].index_select(0, chain_at), stable=True)
                chain_at = chain_at.index_select(0, perm)
                groups = _GatherGroups.apply(cur, perm, sizes[t + 1])
        restore = torch.empty_like(chain_at).scatter_(0, chain_at, torch.arange(n, device=x.device))
        return _permute_rows(cur, restore)

    def _mix(self, x: Tensor, chains: Tensor, params: AugMixParams) -> tuple[Tensor, ...]:
        dtype, device = x.dtype, x.device
        if self.normalize:
            inv_std = self._inv_std.to(device=device, dtype=dtype)  # [3,1,1]
            bias = self._bias.to(device=device, dtype=dtype)
        else:
            inv_std = torch.ones((3, 1, 1), dtype=dtype, device=device)
            bias = torch.zeros((3, 1, 1), dtype=dtype, device=device)
        m = params.mix.to(dtype)[..., None]  # [V, B, 1]
        # normalise(mixed) = bias + inv_std * ((1-m) x + sum_i m w_i chain_i), one pass per term:
        # the coefficients [V, B, 1 + width, 3, 1, 1] of x and of each chain, per channel.
        coef = torch.cat((1.0 - m, m * params.weights.to(dtype)), dim=-1)[..., None, None, None]
        coef = coef * inv_std
        views = torch.addcmul(bias, x.unsqueeze(0), coef[:, :, 0])  # [V, B, 3, H, W]
        # unbind, not chains[:, i]: in backward, each indexing would zero-fill a gradient of the
        # full chains size (3 passes over every chain image); unbind's backward is one stack.
        for i, chain in enumerate(chains.unbind(1)):
            views = views.addcmul_(chain, coef[:, :, i + 1])
        clean = torch.addcmul(bias, x, inv_std)
        return (clean, *views.unbind(0))
