"""Batched AugMix in which every sample draws its own chains: sample, then apply.

``AugMixBatch(x)`` returns ``(clean, view_1, ..., view_V)`` for a uint8 or float ``[B,3,H,W]`` batch
on any device; ``network_input`` returns the same as one batch ``[clean; view_1; ...]`` in the
dtype and memory format the network takes. Every random choice (ops, depths, levels, signs,
Dirichlet weights, Beta mix) is drawn per sample by ``sample_params`` up front on the device;
``apply`` is deterministic given them.

The ``V * width * B`` chains run step by step (depth 1..3), with no Python loop over samples, in
one of the forms of ``execute.py`` (``EXECUTORS``); they give the same views and gradients for the
same draws (tests pin it):

* ``strategy="grouped"``: each op once per step on the images that drew it; one host sync per call.
* ``strategy="static"``: every op on every image, the drawn one kept by ``torch.where``; nothing is
  read back to the host, more arithmetic and memory traffic.
* ``strategy="fused"``: Triton kernels, one per depth step and one mix that writes the network's
  input; each chain image read and written once per step, nothing read back to the host. CUDA, or
  the CPU under ``TRITON_INTERPRET=1`` (tests).
* ``strategy="auto"`` (default): ``grouped`` on the CPU (the least CPU time), ``fused`` on CUDA
  when Triton is usable, ``static`` on any other device. On a GPU the cost of a call is the bytes
  its kernels move (counted per form in docs/benchmarks.md; ``make gpu-check`` measures them).

The operator counts of a call do not depend on B (a test counts them at B=8 and B=256). Mixing
happens in [0,1] space, ``mixed = (1-m) x + m sum_i w_i chain_i(x)``, which equals the official
"mix after preprocess" because normalisation is affine and the weights sum to 1; the normalisation
is folded into the mixing coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..checks import check_image_batch, check_in_range, check_int_at_least, check_positive
from ..runtime import tune_for_cpu_augmentation
from .execute import (
    CHAIN_RUNNERS,
    EXECUTORS,
    Call,
    OpGroups,
    Output,
    fused_unavailable,
    op_tables,
    reference_chains,
)
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
STRATEGIES = ("auto", *EXECUTORS)  # ("auto", "grouped", "static", "fused")
MAX_SEVERITY = 10.0  # the level scale is 0..10 (official PARAMETER_MAX)


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


# (mean, std, device, dtype) -> the constants [1,3,1,1] on that device: built once per device,
# since torch.tensor(..., device=cuda) is a host-to-device copy that waits for the GPU.
_NORMALIZE_CONSTANTS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _normalize_constants(mean, std, device: torch.device, dtype: torch.dtype):
    key = (tuple(mean), tuple(std), device, dtype)
    if key not in _NORMALIZE_CONSTANTS:
        m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1).to(device)
        s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1).to(device)
        _NORMALIZE_CONSTANTS[key] = (m, s)
    return _NORMALIZE_CONSTANTS[key]


def normalize_images(x: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """uint8 (0..255) or float [0,1] ``[B,3,H,W]`` -> float32, ``(x - mean) / std`` per channel.

    The input the network sees without AugMix (``--aug_type none``, evaluation): the same
    constants AugMixBatch folds into its mixing, so clean views agree everywhere. The constants
    are copied to a device once, not at every call.
    """
    x = to_unit_float(x).to(torch.float32)
    m, s = _normalize_constants(mean, std, x.device, x.dtype)
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


def _mixing_draws(
    alpha: float, shape: tuple[int, int], width: int, generator: torch.Generator | None, device
) -> tuple[Tensor, Tensor]:
    """The Dirichlet(alpha) weights ``[V, B, width]`` and the Beta(alpha, alpha) mix ``[V, B]``,
    both normalised Gammas, from one Gamma draw of ``width + 2`` variables per (view, sample).

    For tiny alpha all Gammas can underflow to 0 in float32; adding the smallest normal float
    makes that case uniform and leaves every Gamma above ~1e-31 unchanged (it is below half
    their last bit).
    """
    concentration = torch.full((*shape, width + 2), alpha, device=device)
    g = torch._standard_gamma(concentration, generator=generator)
    g = g.add_(torch.finfo(g.dtype).tiny)
    weights = g[..., :width] / g[..., :width].sum(dim=-1, keepdim=True)
    pair = g[..., width:]
    return weights, pair[..., 0] / pair.sum(dim=-1)


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


LEVELS = ("continuous", "official")


def _check_levels(levels: str, severity: float | nn.Module) -> str:
    """Official levels are truncated, so they carry no gradient: a fixed severity only."""
    if levels not in LEVELS:
        raise ValueError(f"levels: expected one of {LEVELS}, got {levels!r}")
    if levels == "official" and isinstance(severity, nn.Module):
        raise ValueError(
            "levels='official' truncates magnitudes as the official code does, which carries no "
            "gradient to a learnable severity: use a fixed severity, or levels='continuous'"
        )
    return levels


def _check_severity_tensor(severity: Tensor | float, batch: int) -> None:
    """A tensor severity is a scalar or one per sample."""
    if isinstance(severity, Tensor) and (
        severity.dim() > 1 or (severity.dim() == 1 and severity.shape[0] not in (1, batch))
    ):
        raise ValueError(
            f"severity: expected a scalar or a [B={batch}] tensor, got shape {tuple(severity.shape)}"
        )


class AugMixBatch(nn.Module):
    """AugMix on a batch of tensors, per-sample chains, in one batched pass.

    Args:
        width: chains mixed per view (official ``mixture_width``, 3).
        depth: ops per chain; -1 draws 1..3 per chain (official ``mixture_depth``).
        alpha: Dirichlet / Beta concentration (official 1.0).
        all_ops: add color, contrast, brightness, sharpness (they overlap ImageNet-C).
        ops: the names of the ops to draw from instead (``ops.OPS``; not with ``all_ops``), e.g.
            the paper's 9 without posterize and solarize; every form runs any subset.
        severity: a float in (0, 10], or an ``nn.Module`` with
            ``rsample(batch_size, generator=None) -> Tensor`` ([] or [B], differentiable),
            e.g. ``augmix_gpu.LearnableSeverity``; its parameters register here.
        normalize: subtract ``mean`` and divide by ``std`` (per channel) on every output.
        num_views: augmented views per call (2 for the JSD loss).
        strategy: ``"grouped"`` (each op on its group; one host sync per call), ``"static"``
            (every op on every image; nothing read back to the host), ``"fused"`` (Triton
            kernels; CUDA, or the CPU under ``TRITON_INTERPRET=1``) or ``"auto"`` (grouped on the
            CPU, fused on CUDA, static elsewhere); the same views and gradients (module docstring).
        levels: ``"continuous"`` (magnitudes ``level * max / 10``, no rounding between ops: they
            carry the severity's gradient) or ``"official"`` (the official code's ops: magnitudes
            truncated as its ``int_parameter`` does, every op's output rounded to a uint8 level
            as PIL stores it; for a fixed severity only).
    Shape:
        input ``[B,3,H,W]`` uint8 (0..255) or float in [0,1]; outputs ``num_views + 1`` tensors
        ``[B,3,H,W]`` float32 (float64 in, float64 out): clean first, then the views.
    """

    last_params: AugMixParams | None
    last_severity: Tensor | None
    _group_of_op: Tensor  # op_tables, non-persistent buffers (__init__)
    _group_onehot: Tensor
    _term_onehot: Tensor
    _op_coef: Tensor
    _op_coef64: Tensor
    _norm: Tensor

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
        levels: str = "continuous",
        ops: Sequence[str] | None = None,
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
                f"strategy: expected one of {STRATEGIES}, got {strategy!r} ('auto' picks 'grouped' "
                "on the CPU, 'fused' on CUDA and 'static' on other devices)"
            )
        self.strategy = strategy
        self.levels = _check_levels(levels, self.severity)

        self.ops: tuple[Op, ...] = get_ops(self.all_ops, ops)
        self._groups = OpGroups.of(self.ops)
        for name, table in op_tables(self.ops, self._groups, mean, std).items():
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
            f"width={self.width}, depth={self.depth}, alpha={self.alpha}, ops={self.op_names}, "
            f"severity={sev}, normalize={self.normalize}, num_views={self.num_views}, "
            f"strategy={self.strategy}, levels={self.levels}"
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
        # 12 kernels in all (a call's budget counts them): each draw once, no arithmetic after
        ops = torch.randint(len(self.ops), (v, w, d, b), **kw)
        if self.depth == -1:
            depth = torch.randint(1, 4, (v, w, b), **kw)
        else:
            depth = torch.full((v, w, b), self.depth, dtype=torch.long, device=dev)
        level_u = torch.rand((v, w, d, b), **kw)
        coin = torch.randint(0, 2, (v, w, d, b), dtype=torch.float32, **kw)
        signs = torch.pow(-1.0, coin)  # (-1)^0 = 1, (-1)^1 = -1, exactly
        weights, mix = _mixing_draws(self.alpha, (v, b), w, generator, dev)
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
        return self._sample_and_run(x, generator, Output())

    def network_input(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        clean: bool = True,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> Tensor:
        """Sample and apply, as the network takes it: one batch ``[clean; view_1; ...]`` (the
        views only without ``clean``) in ``dtype`` (default float32) and, if asked, channels_last.

        The fused form writes it directly (no concatenation, no cast, no copy); the reference
        forms concatenate and cast their views. The same draws as ``forward``.
        """
        out = Output(batch=True, clean=clean, dtype=dtype, channels_last=channels_last)
        return self._sample_and_run(x, generator, out)

    def _sample_and_run(self, x: Tensor, generator: torch.Generator | None, output: Output):
        check_image_batch(x, "x", check_values=False)
        if isinstance(self.severity, nn.Module):
            s = self.severity_value(x.shape[0], generator=generator, device=x.device)
        else:  # a Python float: no tensor to build on the device (a blocking copy on a GPU)
            s = self.severity
        params = self.sample_params(x.shape[0], generator=generator, device=x.device)
        out = self._run(x, params, s, output)
        self.last_params = params
        self.last_severity = s.detach() if isinstance(s, Tensor) else torch.tensor(s)
        return out

    def apply(
        self, x: Tensor, params: AugMixParams, severity: Tensor | float
    ) -> tuple[Tensor, ...]:
        """Deterministic AugMix given ``params``: ``(clean, view_1, ..., view_V)``, normalised if set.

        Under the ``static`` and ``fused`` strategies a float batch is not range-checked (the
        check reads the device) but clamped to [0, 1].
        """
        return self._run(x, params, severity, Output())

    def chains(self, x: Tensor, params: AugMixParams, severity: Tensor | float) -> Tensor:
        """Every chain's output before mixing, ``[V, width, B, 3, H, W]`` in [0,1] (for plots).

        The fused form keeps no chain in memory: under it this runs the reference form of the
        device (grouped on the CPU, static elsewhere), which gives the same chains.
        """
        strategy = self.strategy_for(getattr(x, "device", "cpu"))
        if strategy not in CHAIN_RUNNERS:
            strategy = "grouped" if x.device.type == "cpu" else "static"
        call = self._call(self._unit_float(x, strategy), params, severity, Output())
        return reference_chains(call, CHAIN_RUNNERS[strategy])

    def _run(self, x: Tensor, params: AugMixParams, severity: Tensor | float, output: Output):
        strategy = self.strategy_for(getattr(x, "device", "cpu"))
        call = self._call(self._unit_float(x, strategy), params, severity, output)
        return EXECUTORS[strategy](call)

    def _call(
        self, x: Tensor, params: AugMixParams, severity: Tensor | float, output: Output
    ) -> Call:
        """Check the draws and the severity against the batch; the tables on its device."""
        self._check_params(x, params)
        _check_severity_tensor(severity, x.shape[0])
        self._tables(x.device)
        if x.device.type == "cpu":  # keep freed memory for the next call (runtime.py): ~2x
            tune_for_cpu_augmentation()
        tables = {name[1:]: table for name, table in self.named_buffers(recurse=False)}
        return Call(x, params, severity, tables, self.ops, self._groups, self.normalize, output,
                    official=self.levels == "official")  # fmt: skip

    def _unit_float(self, x: Tensor, strategy: str) -> Tensor:
        """The batch as a form takes it: grouped, float in [0,1], range-checked; static, the
        same without the check (it reads the device), clamped instead; fused, as given (its
        kernels read uint8 or float, and clamp)."""
        if strategy == "grouped":
            return to_unit_float(x)
        if strategy == "fused":
            check_image_batch(x, "x", check_values=False)
            return x
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
        CPU, ``"fused"`` on CUDA when Triton is usable, ``"static"`` on any other device."""
        if self.strategy != "auto":
            return self.strategy
        kind = torch.device(device).type
        if kind == "cpu":
            return "grouped"
        return "fused" if kind == "cuda" and fused_unavailable(kind) is None else "static"

    def _tables(self, device: torch.device) -> None:
        """Move the op tables to ``device`` once (a module left on the CPU would copy them, and on
        a GPU wait for the copy, at every call); the fused form's op table is built on first use."""
        if not hasattr(self, "_fused_op") and self.strategy_for(device) == "fused":
            reason = fused_unavailable(device)
            if reason is not None:
                raise RuntimeError(reason)
            from .fused_kernels import op_table  # imports Triton

            self.register_buffer("_fused_op", op_table(self.ops), persistent=False)
        if any(table.device != device for table in self.buffers(recurse=False)):
            for name, table in list(self.named_buffers(recurse=False)):
                setattr(self, name, table.to(device))
