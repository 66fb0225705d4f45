"""Learnable AugMix severity: a reparameterised log-normal whose sample carries a gradient.

``log s ~ N(mu, sigma^2)`` with ``mu = log_severity_mu`` and ``sigma = exp(log_severity_log_sigma)``
(the parametrisation of the reference learnable-severity script). Unlike that script, the sample is
drawn with ``rsample`` and never ``.item()``-ed, so the loss that the AugMix views feed reaches
``mu`` and ``sigma`` through the continuous op magnitudes (see ``augmix_gpu.augment.ops``).

The regulariser is the closed-form ``KL(N(mu, sigma^2) || N(log(initial) + offset, prior_std^2))``;
the loss adds ``beta_augmenter_reg * kl() * kl_scale`` (``augmix_gpu.augment.losses.augmix_objective``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Objective:
    """What trains a learnable severity; the trainer reads these properties, never the name.

    ``ascends``: the views' gradient reaches s reversed, so s ascends the loss they feed (AugMax);
    ``from_training_loss``: the training loss (and its KL to the prior) trains s with the network's
    optimiser; otherwise an outer loop does, from a held-out set (``train/heldout_severity.py``),
    and the views carry no gradient to s on the ordinary steps.
    """

    name: str
    ascends: bool
    from_training_loss: bool
    help: str


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("minimize", False, True, "the training loss (the reference script's)"),
        Objective("adversarial", True, True, "ascend the training loss the views feed"),
        Objective("heldout", False, False, "the hypergradient of a held-out corrupted loss"),
    )
}


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015).

    Used by ``objective="adversarial"``: the optimiser still *descends* the total loss, so a
    reversed gradient on the sample makes the severity *ascend* the loss the views feed (AugMax's
    adversarial augmentation, Wang et al. 2021), while the KL (computed from mu/sigma, not from the
    sample) still pulls it towards the prior.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def bounded(s: Tensor, max_value: float) -> Tensor:
    """``min(s, max_value)`` with its true derivative: 1 below the bound, 0 above it.

    Why not a straight-through clamp (the value clamped, the gradient passed): above the bound the
    views no longer change with s, yet a straight-through gradient keeps pushing
    ``log_severity_mu`` outwards (with mu = log 20 every draw is exactly 10, yet mu's gradient was
    +-2.26), so the adversarial objective escaped the bound. With the true derivative a sample at
    the bound carries no gradient from the views under any objective; the only force left there
    is the KL to the prior (computed from mu and sigma, not from the sample), which pulls back
    inside. A smooth bound (e.g. ``max * s / (s + max)``) would also hold, but it distorts every
    sample (3 -> 2.3 for max 10), so the severity the ops receive would not be the one logged.
    """
    return s.clamp(max=max_value)


class LearnableSeverity(nn.Module):
    """Log-normal AugMix severity with reparameterised samples and a Gaussian prior on log s.

    Args:
        initial_aug_severity: initial median severity; ``log_severity_mu`` starts at its log and the
            prior is centred on ``log(initial_aug_severity) + prior_severity_mean_offset``.
        prior_severity_std: std of the prior on ``log s`` (nats of log-severity).
        prior_severity_mean_offset: shift of the prior mean in log space.
        per_sample: draw one ``eps`` per sample (``[B]``) instead of one per batch (``[]``, the
            reference script's behaviour).
        max_severity: upper bound of s (AugMix levels live in [0, 10]); enforced by
            :func:`bounded` (no gradient pushes a sample past it).
        initial_sigma: initial std of ``log s`` (0.1 in the reference script).
        objective: ``"minimize"`` (s follows the training loss), ``"adversarial"`` (s ascends the
            loss the views feed, through gradient reversal) or ``"heldout"`` (s follows the
            hypergradient of a held-out loss, :mod:`augmix_gpu.train.heldout_severity`; the training
            loss does not move it, so the trainer draws the views without a gradient to s
            except on the hypergradient steps).
    """

    def __init__(
        self,
        initial_aug_severity: float = 3.0,
        prior_severity_std: float = 1.0,
        prior_severity_mean_offset: float = 0.0,
        per_sample: bool = False,
        max_severity: float = 10.0,
        initial_sigma: float = 0.1,
        objective: str | Objective = "minimize",
    ) -> None:
        super().__init__()
        _validate(initial_aug_severity, prior_severity_std, max_severity, initial_sigma, objective)
        self.initial_aug_severity = float(initial_aug_severity)
        self.prior_severity_std = float(prior_severity_std)
        self.prior_severity_mean_offset = float(prior_severity_mean_offset)
        self.per_sample = bool(per_sample)
        self.max_severity = float(max_severity)
        self.initial_sigma = float(initial_sigma)
        self.objective = OBJECTIVES[objective] if isinstance(objective, str) else objective
        # Prior on log s; plain floats (configuration, not state): a checkpoint holds mu and
        # log_sigma only, and the prior comes from the run's arguments.
        self.prior_mu = math.log(self.initial_aug_severity) + self.prior_severity_mean_offset
        self.log_severity_mu = nn.Parameter(torch.tensor(math.log(self.initial_aug_severity)))
        self.log_severity_log_sigma = nn.Parameter(torch.tensor(math.log(self.initial_sigma)))
        self.last_sample: Tensor | None = None

    @property
    def sigma(self) -> Tensor:
        """Std of ``log s`` (a tensor that carries the gradient)."""
        return self.log_severity_log_sigma.exp()

    def rsample(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw s = exp(mu + sigma * eps), bounded to (0, max_severity], differentiable in mu, sigma.

        Returns a ``[]`` tensor (one severity for the batch) or ``[batch_size]`` if ``per_sample``.
        ``eps`` is drawn on the generator's device and moved to the parameters' device, so a CPU
        generator reproduces the same draw on any device; without a generator it is drawn directly
        on the parameters' device (no host-to-device copy per step).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mu = self.log_severity_mu
        shape = (batch_size,) if self.per_sample else ()
        eps_device = generator.device if generator is not None else mu.device
        eps = torch.randn(shape, generator=generator, device=eps_device, dtype=torch.float32)
        eps = eps.to(device=mu.device, dtype=mu.dtype)
        s = torch.exp(mu + self.sigma * eps)
        s = bounded(s, self.max_severity)
        if self.objective.ascends:
            s = _GradReverse.apply(s)
        self.last_sample = s.detach()
        return s

    def kl(self) -> Tensor:
        """Closed-form ``KL(N(mu, sigma^2) || N(prior_mu, prior_std^2))`` in nats, a scalar.

        ``log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2`` for q = N(mq, sq^2), p = N(mp, sp^2).
        """
        sp = self.prior_severity_std
        sq2 = torch.exp(2.0 * self.log_severity_log_sigma)
        return (
            math.log(sp)
            - self.log_severity_log_sigma
            + (sq2 + (self.log_severity_mu - self.prior_mu) ** 2) / (2.0 * sp * sp)
            - 0.5
        )

    def _bounded_mean(self) -> Tensor:
        mu, sigma = self.log_severity_mu.detach().double(), self.sigma.detach().double()
        log_m = math.log(self.max_severity)
        below = torch.exp(mu + 0.5 * sigma**2) * torch.special.ndtr((log_m - mu - sigma**2) / sigma)
        above = self.max_severity * torch.special.ndtr((mu - log_m) / sigma)
        return (below + above).clamp(max=self.max_severity).float()

    def mean_severity(self) -> float:
        """E[min(S, max)] for log S ~ N(mu, sigma^2): the mean severity the ops receive.

        ``exp(mu + sigma^2/2) Phi((log M - mu - sigma^2)/sigma) + M (1 - Phi((log M - mu)/sigma))``
        (the partial expectation of a log-normal below M, plus M times the mass above it).
        """
        return float(self._bounded_mean())

    def median_severity(self) -> float:
        """Median of the bounded severity, ``min(exp(mu), max)``."""
        return float(self.log_severity_mu.detach().exp().clamp(max=self.max_severity))

    def stats_tensors(self) -> dict[str, Tensor]:
        """:meth:`stats` as 0-d tensors on the parameters' device: the trainer reads them to the
        host only at logging steps (no host sync per training step)."""
        mu = self.log_severity_mu.detach()
        last = mu.new_full((), float("nan")) if self.last_sample is None else self.last_sample
        return {
            "severity_mu": mu.clone(),
            "severity_sigma": self.sigma.detach(),
            "severity_mean": self._bounded_mean(),
            "severity_median": mu.exp().clamp(max=self.max_severity),
            "severity_last": last.float().mean(),
        }

    def stats(self) -> dict[str, float]:
        """Scalars for logs, JSON and W&B, all of the bounded severity the ops receive.

        ``severity_mu``/``severity_sigma`` are the parameters of log s (before the bound);
        ``severity_mean``/``severity_median`` are of ``min(s, max_severity)``; ``severity_last``
        is the mean of the last (bounded) draw, NaN before any.
        """
        return {k: float(v) for k, v in self.stats_tensors().items()}

    def extra_repr(self) -> str:
        return (
            f"initial_aug_severity={self.initial_aug_severity}, "
            f"prior_severity_std={self.prior_severity_std}, "
            f"prior_severity_mean_offset={self.prior_severity_mean_offset}, "
            f"per_sample={self.per_sample}, max_severity={self.max_severity}, "
            f"objective={self.objective.name!r}"
        )


def _validate(
    initial_aug_severity: float,
    prior_severity_std: float,
    max_severity: float,
    initial_sigma: float,
    objective: str | Objective,
) -> None:
    """Reject configurations that would give NaN/inf parameters or an empty support."""

    def finite_positive(name: str, value: float) -> None:
        try:
            ok = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    finite_positive("max_severity", max_severity)
    finite_positive("initial_aug_severity", initial_aug_severity)
    if initial_aug_severity > max_severity:
        raise ValueError(
            f"initial_aug_severity must be in (0, max_severity={max_severity}], got "
            f"{initial_aug_severity}: lower it or raise max_severity"
        )
    finite_positive("prior_severity_std", prior_severity_std)
    finite_positive("initial_sigma", initial_sigma)
    if not isinstance(objective, Objective) and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
