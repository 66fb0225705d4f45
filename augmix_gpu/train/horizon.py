"""The paired estimator over a horizon of K training steps (``--severity_horizon K``).

Two copies of the network, forked from the run K steps before an update, each with a copy of the
optimiser's state, train on the run's own next K batches and AugMix draws, one at ``s e^delta``
and one at ``s e^-delta`` (``s``: the severity the run sampled at that step): common random
numbers, so only the ops' magnitudes differ between them. At the update their held-out losses
give the slope in log s:

    d L_val / d mu ~ (L_val(w_K+) - L_val(w_K-)) / (log s+ - log s-)

Why: the one-step lookahead (lookahead.py) reads the next step's gain, which on the study's task
points the wrong way or nowhere for most of a run, while pairs trained 10 steps apart told
s = 0.8 from s = 8 in every pair from epoch 2 on, at a per-pair signal-to-noise of ~2.5-2.9
against ~0.5 for one step (docs/studies.md, "longer pairs over training"). The copies take the
optimiser's own steps (its update, weight decay, the schedule's learning rate, gradient clipping),
not a linearised one, and their BatchNorm statistics follow their training: the held-out loss
scores each as it would be at test time. Nothing of the run is changed.

Log sigma's gradient takes the common shift's chain rule, ``slope * mean(log s - mu)`` over the
window's draws (exact when every step shares one draw; the window's draws differ, so it is the
shift that matches their mean): with many draws it is near zero and the spread stays where it
started.

Cost: two training forward/backward passes per step of the window (2K per update, in fp32),
two held-out forwards per update, and two more copies of the network and its optimiser state in
memory (and in a checkpoint written inside a window, so that a resumed run takes the same
update). Under DDP each copy's gradient is averaged over ranks as the run's is.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import DistEnv
from .hyper_passes import (
    HeldoutBatch,
    Hypergradient,
    heldout_loss_at,
    rank_mean,
    training_gradient,
)


class HorizonPair:
    """Two copies of ``net.model`` and of ``optimizer`` (forked now), trained by :meth:`step` at
    the two ends of a log-severity pair and compared by :meth:`result`."""

    def __init__(
        self,
        net: Any,
        optimizer: torch.optim.Optimizer,
        *,
        log_step: float,
        beta_jsd: float,
        grad_clip: float = 0.0,
    ) -> None:
        if not log_step > 0:
            raise ValueError(f"log_step must be > 0, got {log_step}")
        self.net, self.log_step, self.beta_jsd = net, float(log_step), float(beta_jsd)
        self.grad_clip = float(grad_clip)
        # one deepcopy of both: the optimiser's parameters become the copy's (a shared memo)
        forks = [copy.deepcopy((net.model, optimizer)) for _ in range(2)]
        self.models: list[nn.Module] = [m for m, _ in forks]
        self.optimizers: list[torch.optim.Optimizer] = [o for _, o in forks]
        device = net.severity.log_severity_mu.device
        self.steps = 0
        # sums over the window: log s+ - log s-, log s - mu; and whether a copy's step was bad
        self._sums = torch.zeros(2, device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)

    def step(
        self,
        main_optimizer: torch.optim.Optimizer,
        images: Tensor,
        labels: Tensor,
        draws: Any,
        severity: Tensor,
        env: DistEnv,
    ) -> None:
        """Both copies' step on the run's batch (``images``, ``labels``) with the run's draws
        (``AugMixParams``) and severity sample (``[]`` or ``[B]``), each at its end of the pair,
        at the run's current learning rate (``main_optimizer``'s groups)."""
        sev = self.net.severity
        s = severity.detach().to(torch.promote_types(severity.dtype, torch.float32))
        top = torch.full_like(s, float(sev.max_severity))
        ends = (
            torch.minimum(s * math.exp(self.log_step), top),
            s * math.exp(-self.log_step),
        )
        for model, opt, end in zip(self.models, self.optimizers, ends):
            for group, main in zip(opt.param_groups, main_optimizer.param_groups):
                group["lr"] = main["lr"]
            self._train(model, opt, images, labels, draws, end, env)
        mu = sev.log_severity_mu.detach().to(s.dtype)
        self._sums += torch.stack([(ends[0].log() - ends[1].log()).mean(), (s.log() - mu).mean()])
        self.steps += 1

    def _train(self, model, opt, images, labels, draws, severity, env: DistEnv) -> None:
        """One real optimiser step of a copy: the training loss (CE + JSD) in fp32, its gradient
        averaged over ranks, clipped as the run's, skipped on the device if not finite."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            views = torch.cat(self.net.augmenter.apply(images, draws, severity))
        grads = training_gradient(self.net, named, views, labels, self.beta_jsd, env, model=model)
        for (_, p), g in zip(named, grads):
            p.grad = g
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], self.grad_clip)
        # the same on every rank (the gradient is reduced); a NaN or inf anywhere makes its sum so
        bad = ~torch.isfinite(torch.stack([g.sum() for g in grads]).sum())
        if opt.defaults.get("fused"):  # the trainer's: skipped on the device, as the run's step
            opt.found_inf = bad.float()
            opt.step()
        elif not bad:  # another optimiser (a library user's): one host read
            opt.step()
        opt.zero_grad(set_to_none=True)
        self._bad |= bad

    def result(self, heldout: HeldoutBatch, env: DistEnv) -> Hypergradient:
        """The slope of the two copies' held-out loss (``heldout``: this rank's share of the
        global held-out batch) in log s, as d / d (mu, log_sigma); nothing is read to the host."""
        if not self.steps:
            raise RuntimeError("the horizon pair has taken no step")
        with torch.no_grad():
            losses = [heldout_loss_at(self.net, None, heldout, env, model=m) for m in self.models]
        # every rank drew its own severities: their span and spread over all ranks, so that
        # every rank takes the same update (the losses are the global held-out batch's already)
        span, spread = rank_mean(self._sums / self.steps, env)
        slope = (losses[0] - losses[1]) / span
        grads = torch.stack([slope, slope * spread]).float()
        finite = torch.isfinite(grads).all() & ~self._bad
        grads = torch.where(finite, grads, torch.zeros_like(grads))
        return Hypergradient(((losses[0] + losses[1]) / 2).float(), grads[0], grads[1], finite)

    def state_dict(self) -> dict[str, Any]:
        """The copies, their optimisers and the window's sums: a checkpoint inside a window."""
        return {
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "steps": self.steps,
            "sums": self._sums.tolist(),
            "bad": bool(self._bad),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for model, opt, m, o in zip(
            self.models, self.optimizers, state["models"], state["optimizers"]
        ):
            model.load_state_dict(m)
            opt.load_state_dict(o)
        self.steps = int(state["steps"])
        self._sums.copy_(torch.tensor(state["sums"]))
        self._bad.fill_(bool(state["bad"]))
