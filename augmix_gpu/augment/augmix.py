"""Batched AugMix in which every sample draws its own chains: sample, then apply.

``AugMixBatch(x)`` returns ``(clean, view_1, ..., view_V)`` for a uint8 or float ``[B,3,H,W]`` batch
on any device. Every random choice (ops, depths, levels, signs, Dirichlet weights, Beta mix) is
drawn per sample by ``sample_params`` up front on the device; ``apply`` is deterministic given them.

The ``V * width * B`` chains are flattened into N images and run step by step (depth 1..3), with
no Python loop over samples. Per call, once: each application's op parameter (one table lookup),
each warp's PIL matrix and sampling-grid terms, each op's parameter-only coefficients
(``Op.prepare``). Then one of the forms in ``execute.py`` (``EXECUTORS``) runs the chains; they
give the same views and gradients for the same draws (tests pin it):

* ``strategy="grouped"``: each op once per step on the images that drew it; one host sync per call.
* ``strategy="static"``: every op on every image, the drawn one kept by ``torch.where``; nothing is
  read back to the host, fewer operators, more arithmetic.
* ``strategy="auto"`` (default): ``grouped`` on the CPU (less CPU time: docs/benchmarks.md), ``static``
  on any other device. The second half is argued, not measured (no GPU has run this code): a GPU
  training step should not wait on the host (a sync waits for every queued kernel and rules out
  CUDA-graph capture); static's extra arithmetic is memory traffic on a GPU too, so the GPU check
  decides (benchmark rows d and d-grouped); pass ``strategy="grouped"`` to compare.

The operator counts of a call do not depend on B (a test counts them at B=8 and B=256). Mixing
happens in [0,1] space, ``mixed = (1-m) x + m sum_i w_i chain_i(x)``, which equals the official
"mix after preprocess" because normalisation is affine and the weights sum to 1; the normalisation
is folded into the mixing coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_image_batch, check_in_range, check_int_at_least, check_positive
from ..runtime import tune_for_cpu_augmentation
from .execute import EXECUTORS, OpGroups, Steps, coefficients, op_tables, warp_terms
from .ops import Op, get_ops

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
STRATEGIES = ("auto", *EXECUTORS)  # ("auto", "grouped", "static")
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


def _check_severity(severity: float | nn.Module) -> float | nn.Module:
    """A float in (0, 10], or a module that samples one (``rsample(batch_size, generator)``)."""
    if isinstance(severity, nn.Module):
        if not callable(getattr(severity, "rsample", None)):
            raise ValueError(
                f"severity: expected a float or an nn.Module with rsample(batch_size, generator), "
                f"got {type(severity).__name__} without rsample"
            )
        return severity
    if isinstance(severity, bool) or not isinstance(severity, (int, float)):
        raise ValueError(f"severity: expected a float in (0, 10] or a module, got {severity!r}")
    severity = check_in_range(severity, "severity", 0.0, MAX_SEVERITY)
    if severity == 0.0:
        raise ValueError("severity: expected a float in (0, 10], got 0")
    return severity


def _mix_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Tensor]:
    """The normalisation folded into the mix, ``x / std - mean / std``, per channel ``[3,1,1]``."""
    return {
        "_inv_std": 1.0 / torch.tensor(std).view(3, 1, 1),
        "_bias": -torch.tensor(mean).view(3, 1, 1) / torch.tensor(std).view(3, 1, 1),
    }


class AugMixBatch(nn.Module):
    """AugMix on a batch of tensors, per-sample chains, in one batched pass.

    Args:
        width: chains mixed per view (official ``mixture_width``, 3).
        depth: ops per chain; -1 draws 1..3 per chain (official ``mixture_depth``).
        alpha: Dirichlet / Beta concentration (official 1.0).
        all_ops: add color, contrast, brightness, sharpness (they overlap ImageNet-C).
        severity: a float in (0, 10], or an ``nn.Module`` with
            ``rsample(batch_size, generator=None) -> Tensor`` ([] or [B], differentiable),
            e.g. ``augmix_gpu.LearnableSeverity``; its parameters register here.
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
    _group_of_op: Tensor  # op_tables and _mix_tables, non-persistent buffers (__init__)
    _group_onehot: Tensor
    _term_onehot: Tensor
    _op_coef: Tensor
    _op_coef64: Tensor
    _inv_std: Tensor
    _bias: Tensor

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
        self.severity: float | nn.Module = _check_severity(severity)
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
        self._groups = OpGroups.of(self.ops)
        for name, table in {**op_tables(self.ops, self._groups), **_mix_tables(mean, std)}.items():
            self.register_buffer(name, table, persistent=False)
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
            for name, table in list(self.named_buffers(recurse=False)):
                setattr(self, name, table.to(device))

    def _op_parameters(self, level: Tensor, ops: Tensor, signs: Tensor) -> Tensor:
        """Each application's op parameter, ``Op.parameter(level)`` of its op, signed if the op is."""
        coef = (self._op_coef64 if level.dtype == torch.float64 else self._op_coef)[
            torch.add(signs > 0, ops, alpha=2)
        ]
        return level * coef[..., 0] + coef[..., 1]

    def _chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        self._check_params(x, params)
        v, w, _, b = params.ops.shape
        self._tables(x.device)
        if x.device.type == "cpu":  # keep freed memory for the next call (runtime.py): ~2x
            tune_for_cpu_augmentation()
        # Parameter of every application, differentiable in s: level -> op.parameter -> sign.
        span = self._severity_span(x, severity)
        level = _LEVEL_LOW + params.level_u.to(x.dtype) * span  # [V, w, D, B]
        param = self._op_parameters(level, params.ops, params.signs)
        steps = self._steps(x, params, param)
        out = EXECUTORS[self.strategy_for(x.device)](x, steps, self._groups)
        return out.view(v, w, b, *x.shape[1:])

    def _severity_span(self, x: Tensor, severity: Tensor | float) -> Tensor | float:
        """``severity - 0.1``, the span of the levels ``U(0.1, severity)``."""
        if isinstance(severity, (int, float)) and not isinstance(severity, bool):
            return _level_span(float(severity), x.dtype)  # rounded as a tensor s would be
        b = x.shape[0]
        s = torch.as_tensor(severity, device=x.device).to(x.dtype)
        if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, b)):
            raise ValueError(
                f"severity: expected a scalar or a [B={b}] tensor, got shape {tuple(s.shape)}"
            )
        return s - _LEVEL_LOW

    def _steps(self, x: Tensor, params: AugMixParams, param: Tensor) -> Steps:
        """The chains flattened for the executors: image n = (view * width + chain) * B + sample,
        steps first; which applications run, each one's group, and every op's terms, once."""
        v, w, d, b = params.ops.shape
        n, (h, wd) = v * w * b, x.shape[-2:]
        param_f = param.permute(2, 0, 1, 3).reshape(d, n)
        ops_f = params.ops.permute(2, 0, 1, 3).reshape(d, n)
        # which applications run (the chain has not finished) and each one's group
        active = params.depth.reshape(1, n) > torch.arange(d, device=x.device).unsqueeze(1)
        drawn = self._group_onehot[ops_f].permute(2, 0, 1) & active  # [groups, D, N]
        grid = None  # every warp's grid terms, built once for all steps (grid_terms)
        if self._groups.has_warp:
            grid = warp_terms(param_f, ops_f, self._term_onehot, h, wd)
        coefs = coefficients(self._groups, param_f, drawn)
        return Steps(ops_f, active, drawn, param_f, grid, coefs, self._group_of_op)

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
