"""Batched AugMix in which every sample draws its own chains: sample, then apply.

``AugMixBatch(x)`` returns ``(clean, view_1, ..., view_V)`` for a uint8 or float ``[B,3,H,W]`` batch
on any device. Every random choice (ops, depths, levels, signs, Dirichlet weights, Beta mix) is
drawn per sample by ``sample_params`` up front on the device; ``apply`` is deterministic given them.

How a call runs without a Python loop over samples: the ``V * width * B`` chains are flattened
into N images. At each depth step the images are grouped by the op they chose (one ``argsort``,
and one host sync per call for all group sizes); each non-geometric op runs once on its group, and
all geometric ops of the step run as ONE warp with per-sample matrices. Empty groups are still
visited, so the number of dispatched torch operators does not depend on B.

Two ways to move the images, same arithmetic (a test pins that they agree): without a gradient,
each group is gathered and written back in place (finished chains are never touched: the least
memory traffic); with a gradient (learnable severity), each step regroups the images with one
gather (``_GatherGroups``) and concatenates the group outputs, so that backward costs one pass
over the images per step instead of one per group.

Mixing happens in [0,1] space, ``mixed = (1-m) x + m sum_i w_i chain_i(x)``, which equals the
official "mix after preprocess" because normalisation is affine and the weights sum to 1; the
normalisation is folded into the mixing coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .ops import Op, get_ops, warp_affine
from .validation import check_image_batch, check_in_range, check_int_at_least, check_positive

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugMixBatch",
    "AugMixParams",
    "normalize_images",
    "to_unit_float",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SEVERITY = 10.0  # the level scale is 0..10 (official PARAMETER_MAX)
_LEVEL_LOW = 0.1  # official sample_level: U(0.1, severity)


def to_unit_float(x: Tensor, name: str = "x") -> Tensor:
    """Validate an image batch and return it as float in [0,1] (uint8 / 255; half -> float32).

    float32 and float64 are kept (float64 lets gradcheck run through ``apply``).
    """
    check_image_batch(x, name)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
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
    """Dirichlet over the last dim as normalised Gammas (reproducible with ``generator``)."""
    g = torch._standard_gamma(alpha, generator=generator)
    total = g.sum(dim=-1, keepdim=True)
    # For tiny alpha all Gammas can underflow to 0 in float32; fall back to uniform weights.
    uniform = torch.full_like(g, 1.0 / g.shape[-1])
    return torch.where(total > 0, g / total.clamp_min(torch.finfo(g.dtype).tiny), uniform)


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

        self.ops: tuple[Op, ...] = get_ops(self.all_ops)
        geo = [i for i, op in enumerate(self.ops) if op.affine is not None]
        self._geo_ops = tuple(self.ops[i] for i in geo)
        self._other_ops = tuple(op for op in self.ops if op.affine is None)
        # Group of each op index: 0 = the fused warp (if any geometric op), then one per other op;
        # the last group is "inactive" (chain already finished).
        n_warp = 1 if geo else 0
        group, local, j = [], [], 0
        for i, op in enumerate(self.ops):
            if op.affine is not None:
                group.append(0)
                local.append(geo.index(i))
            else:
                group.append(n_warp + j)
                local.append(0)
                j += 1
        self._n_groups = n_warp + len(self._other_ops) + 1
        self._has_warp = bool(geo)
        self.register_buffer("_group_of_op", torch.tensor(group), persistent=False)
        self._group_of_op: Tensor
        self.register_buffer("_geo_local", torch.tensor(local), persistent=False)
        self._geo_local: Tensor
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
            f"severity={sev}, normalize={self.normalize}, num_views={self.num_views}"
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
        signs = torch.randint(0, 2, (v, w, d, b), **kw).to(torch.float32).mul_(2.0).sub_(1.0)
        weights = _dirichlet_last(torch.full((v, b, w), self.alpha, device=dev), generator)
        mix = _dirichlet_last(torch.full((v, b, 2), self.alpha, device=dev), generator)[..., 0]
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
        s = self.severity_value(x.shape[0], generator=generator, device=x.device)
        params = self.sample_params(x.shape[0], generator=generator, device=x.device)
        out = self.apply(x, params, s)
        self.last_params = params
        self.last_severity = s.detach()
        return out

    def apply(
        self, x: Tensor, params: AugMixParams, severity: Tensor | float
    ) -> tuple[Tensor, ...]:
        """Deterministic AugMix given ``params``: ``(clean, view_1, ..., view_V)``, normalised if set."""
        x = to_unit_float(x)
        chains = self._chains(x, params, severity)  # [V, width, B, 3, H, W]
        return self._mix(x, chains, params)

    def chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        """Every chain's output before mixing, ``[V, width, B, 3, H, W]`` in [0,1] (for plots)."""
        return self._chains(to_unit_float(x), params, severity)

    def _check_params(self, x: Tensor, params: AugMixParams) -> None:
        b = x.shape[0]
        shape = tuple(params.ops.shape)
        want = (self.num_views, self.width, self.max_depth, b)
        if shape[:2] != want[:2] or shape[3] != b or shape[2] < 1:
            raise ValueError(
                f"params: ops has shape {shape}, expected {want} for this module and a batch of {b}: "
                "draw them with sample_params(batch_size) of the same module"
            )

    def _chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        self._check_params(x, params)
        v, w, d, b = params.ops.shape
        n, (_, _, h, wd) = v * w * b, x.shape
        dtype, device = x.dtype, x.device
        s = torch.as_tensor(severity, device=device).to(dtype)
        if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, b)):
            raise ValueError(
                f"severity: expected a scalar or a [B={b}] tensor, got shape {tuple(s.shape)}"
            )

        # Parameter of every application, differentiable in s: level -> op.parameter -> sign.
        level = _LEVEL_LOW + params.level_u.to(dtype) * (s - _LEVEL_LOW)  # [V, w, D, B]
        signs = params.signs.to(dtype)
        table = torch.stack(
            [op.parameter(level) * signs if op.signed else op.parameter(level) for op in self.ops]
        )
        param = table.gather(0, params.ops.unsqueeze(0)).squeeze(0)
        # Flatten chains: image n = (view * width + chain) * B + sample; steps first.
        param_f = param.permute(2, 0, 1, 3).reshape(d, n)
        ops_f = params.ops.permute(2, 0, 1, 3).reshape(d, n)
        depth_f = params.depth.reshape(1, n)
        sample_of = torch.arange(n, device=device) % b

        group_of_op = self._group_of_op.to(device)
        idle = self._n_groups - 1
        steps = torch.arange(d, device=device).unsqueeze(1)
        key = torch.where(depth_f > steps, group_of_op[ops_f], idle)  # [D, N]
        counts = (key.unsqueeze(-1) == torch.arange(self._n_groups, device=device)).sum(dim=1)
        sizes = counts.tolist()  # the one host sync of the call
        if torch.is_grad_enabled() and (x.requires_grad or param_f.requires_grad):
            run = self._run_permuted
        else:
            run = self._run_in_place
        out = run(x, param_f, ops_f, key, sizes, sample_of)
        return out.view(v, w, b, 3, h, wd)

    def _apply_group(self, g: int, src: Tensor, param: Tensor, op_index: Tensor) -> Tensor:
        """Run group ``g`` on its images: the fused warp (group 0) or one non-geometric op."""
        if self._has_warp and g == 0:
            h, w = src.shape[-2:]
            mats = torch.stack([op.affine(param, h, w) for op in self._geo_ops])  # [G, n, 2, 3]
            local = self._geo_local.to(src.device).index_select(0, op_index)
            return warp_affine(
                src, mats.gather(0, local.view(1, -1, 1, 1).expand(1, -1, 2, 3)).squeeze(0)
            )
        return self._other_ops[g - int(self._has_warp)].apply(src, param)

    def _run_in_place(
        self,
        x: Tensor,
        param_f: Tensor,
        ops_f: Tensor,
        key: Tensor,
        sizes: list[list[int]],
        sample_of: Tensor,
    ) -> Tensor:
        """No gradient: gather each group, write its result back in place; finished chains stay put."""
        d, n = key.shape
        idle = self._n_groups - 1
        order = torch.argsort(key, dim=1, stable=True)
        cur = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for t in range(d):
            for g, idx in enumerate(torch.split(order[t], sizes[t])):
                if g == idle:
                    if t == 0:  # chains of depth 0 (hand-made params) stay clean
                        cur.index_copy_(0, idx, x.index_select(0, sample_of.index_select(0, idx)))
                    continue
                src = (
                    x.index_select(0, sample_of.index_select(0, idx))
                    if t == 0
                    else cur.index_select(0, idx)
                )
                out = self._apply_group(
                    g, src, param_f[t].index_select(0, idx), ops_f[t].index_select(0, idx)
                )
                cur.index_copy_(0, idx, out)
        return cur

    def _run_permuted(
        self,
        x: Tensor,
        param_f: Tensor,
        ops_f: Tensor,
        key: Tensor,
        sizes: list[list[int]],
        sample_of: Tensor,
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
        groups = x.index_select(0, sample_of.index_select(0, chain_at)).split(sizes[0])
        for t in range(d):
            params = param_f[t].index_select(0, chain_at).split(sizes[t])
            op_index = ops_f[t].index_select(0, chain_at).split(sizes[t])
            outs = []
            for g, src in enumerate(groups):
                # chains already finished (or of depth 0) pass through
                outs.append(src if g == idle else self._apply_group(g, src, params[g], op_index[g]))
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
        m = params.mix.to(dtype)[..., None, None, None]  # [V, B, 1, 1, 1]
        wts = params.weights.to(dtype)  # [V, B, width]
        # normalise(mixed) = bias + inv_std * ((1-m) x + sum_i m w_i chain_i), one pass per term.
        views = torch.addcmul(bias, x.unsqueeze(0), (1.0 - m) * inv_std)  # [V, B, 3, H, W]
        # unbind, not chains[:, i]: in backward, each indexing would zero-fill a gradient of the
        # full chains size (3 passes over every chain image); unbind's backward is one stack.
        for i, chain in enumerate(chains.unbind(1)):
            views = views.addcmul_(chain, (m * wts[..., i, None, None, None]) * inv_std)
        clean = torch.addcmul(bias, x, inv_std)
        return (clean, *views.unbind(0))
