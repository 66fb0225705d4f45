"""The held-out objective for the learnable severity: its update loop, whichever estimator.

Why: the training loss cannot choose the severity. CE + JSD is minimised by the identity (weaker
views are easier to agree on), so ``minimize`` collapses towards no augmentation, and
``adversarial`` climbs until the bound stops it. Following DARTS and its augmentation
descendants, the severity here descends a loss it does not feed directly: the network's
cross-entropy on held-out training images under corruptions that are *not* evaluated
(ImageNet-C's 4 validation corruptions), after the network has trained on the augmented views.

How far after is the estimator's horizon. One step (``--severity_horizon 1``, lookahead.py): the
step's own update, differentiated or paired. A greedy one-step objective is biased towards what
helps the next step (the short-horizon bias of Wu et al. 2018): on the study's task it pointed
the wrong way or nowhere for most of a run, where pairs trained 10 steps apart told the
severities apart from epoch 2 on (docs/studies.md). ``--severity_horizon K`` (horizon.py): two
copies of the network trained K real steps at s e^+-delta on the run's own batches and draws.

The trainer runs one update every ``--severity_update_every`` steps, none in the first
``--severity_hold_epochs`` epochs (the network at chance: no horizon sees anything there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..augment.augmix import normalize_images
from ..distributed import DistEnv
from .horizon import HorizonPair
from .hyper_passes import HeldoutBatch, Hypergradient
from .lookahead import paired_hypergradient, severity_hypergradient

ESTIMATORS = ("pathwise", "paired")
UPDATE_RULES = ("adam", "sign")


def hypergradient_snr(trajectory: list[dict[str, float]], after_step: int) -> dict[str, Any]:
    """The signal-to-noise of the updates after ``after_step`` (one epoch's): the mean of the
    per-update hypergradient of mu over its standard error (sample std / sqrt(updates)).

    Why: an update moves the severity by about ``--severity_hyper_lr`` whatever the gradient's
    size (Adam), so where |snr| stays below ~2 the severity follows noise, a random walk, not the
    held-out loss. None where fewer than two updates were recorded."""
    g = [t["hypergrad_mu"] for t in trajectory if t["step"] > after_step and "hypergrad_mu" in t]
    n = len(g)
    mean = sum(g) / n if n else None
    se = math.sqrt(sum((x - mean) ** 2 for x in g) / (n - 1) / n) if n > 1 else None
    snr = mean / se if se else None
    return {"hypergrad_updates": n, "hypergrad_mu_mean": mean, "hypergrad_mu_se": se,
            "hypergrad_snr": snr}  # fmt: skip


class HeldoutSeverityUpdater:
    """Trains a :class:`~augmix_gpu.augment.severity.LearnableSeverity` by the held-out hypergradient.

    Every ``every`` training steps (after the network's own update) it takes one Adam step on
    ``(mu, log_sigma)`` with learning rate ``lr``. Along what (``estimator``, ``horizon``):

    - ``horizon`` 1: the mean of the one-step lookahead's hypergradient
      (:func:`~augmix_gpu.train.lookahead.severity_hypergradient`, or with ``paired``
      :func:`~augmix_gpu.train.lookahead.paired_hypergradient` and ``log_step``) over the last
      ``lookaheads`` steps of the cycle (default 1: the update's step alone), each on the next
      held-out batch. Why several: each sees one draw of AugMix and one held-out batch; their
      mean has less noise, at ``lookaheads`` times the cost per update.
    - ``horizon`` K > 1 (``paired`` only): a :class:`~augmix_gpu.train.horizon.HorizonPair`
      forked after the step K steps before the update, trained on the cycle's last K steps, its
      slope on one held-out batch.

    No update (and no lookahead) while the cycle's first lookahead step, or the pair's fork,
    comes before ``hold_steps``: the severity stays at its start there.

    Adam (``rule`` "adam"), not the network's optimiser: the hypergradient's scale follows the
    network's learning rate and loss landscape, and Adam's normalised step makes ``lr`` mean
    "log-severity per update" whatever they are (the per-epoch signal-to-noise in results.json
    measures what an update carries). ``rule`` "sign": every update moves mu by exactly ``lr``
    against its reading's sign, and log sigma by its reading over mu's (at most ``lr``: the
    direction of the reading, mu's step fixed). Why: with a horizon, a few readings 10x the
    others set Adam's second moment, and the updates after them barely move (docs/studies.md,
    take three); a sign step gives each update one vote, whatever its size.

    No prior: the KL to the prior exists to hold the training-loss objectives (``minimize``,
    ``adversarial``), which have no other place to stop. The held-out loss has one, and a prior
    centred on the starting severity would only pull every run back to where it started (and
    its weight, per training example, has no common scale with a hypergradient).

    The held-out batches cycle through ``heldout_loader`` in its fixed (evaluation) order; the
    batch of a lookahead is a pure function of its step, and the running sum of a cycle (and an
    open pair) is part of the state, so a resumed run takes the same batches and the same updates.
    """

    def __init__(
        self,
        net: Any,
        heldout_loader: Any,
        env: DistEnv,
        *,
        every: int,
        lr: float,
        beta_jsd: float,
        lookaheads: int = 1,
        fixed_length: bool = True,
        estimator: str = "pathwise",
        log_step: float = 0.5,
        horizon: int = 1,
        hold_steps: int = 0,
        grad_clip: float = 0.0,
        rule: str = "adam",
    ) -> None:
        if rule not in UPDATE_RULES:
            raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not log_step > 0:
            raise ValueError(f"log_step must be > 0, got {log_step}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 1 <= lookaheads <= every:
            raise ValueError(f"lookaheads must be in 1..every ({every}), got {lookaheads}")
        if not 1 <= horizon <= every:
            raise ValueError(f"horizon must be in 1..every ({every}), got {horizon}")
        if horizon > 1 and (estimator != "paired" or lookaheads != 1):
            raise ValueError(
                "a horizon of more than one step needs estimator='paired' and lookaheads=1, got "
                f"estimator={estimator!r}, lookaheads={lookaheads}"
            )
        if hold_steps < 0:
            raise ValueError(f"hold_steps must be >= 0, got {hold_steps}")
        if net.severity is None:
            raise ValueError("the held-out objective needs a LearnableSeverity in the augmenter")
        self.net, self.loader, self.env = net, heldout_loader, env
        self.every, self.lookaheads, self.beta_jsd = int(every), int(lookaheads), float(beta_jsd)
        self.fixed_length = bool(fixed_length)
        self.estimator, self.log_step = estimator, float(log_step)
        self.horizon, self.hold_steps, self.grad_clip = int(horizon), int(hold_steps), grad_clip
        self.rule, self.lr = rule, float(lr)
        # fused: a skipped update (non-finite) is skipped on the device, no host read
        self.optimizer = torch.optim.Adam(net.severity.parameters(), lr=lr, fused=True)
        self._batches: Any = None
        self._next_batch = -1
        device = net.severity.log_severity_mu.device
        self.skipped = torch.zeros((), device=device)
        # this cycle's sums: grad mu, grad log sigma, held-out loss, lookaheads not finite
        self._sums = torch.zeros(4, device=device)
        self.pair: HorizonPair | None = None  # the open window's copies (horizon > 1)
        self._pair_state: dict[str, Any] | None = None  # a resumed window's, until its next step

    @property
    def pathwise(self) -> bool:
        """The estimator differentiates the step's views (they must carry the severity's graph)."""
        return self.estimator == "pathwise"

    def _steps_to_update(self, global_step: int) -> int:
        """0 at the step that ends a cycle (and updates the severity), else the steps until it."""
        return -(global_step + 1) % self.every

    def _window(self) -> int:
        """The cycle's last steps that take part in its update: before it, the lookaheads', or
        the pair's K steps and the step it forks after."""
        return self.horizon if self.horizon > 1 else self.lookaheads - 1

    def due(self, global_step: int) -> bool:
        """Whether the step with this (0-based) global index ends with the updater's work: one of
        the last ``lookaheads`` steps of a cycle (the last one also updates), or with a horizon
        the pair's fork and its K steps; never in a cycle that starts inside the hold."""
        to_update = self._steps_to_update(global_step)
        first = global_step + to_update - self._window()
        return to_update <= self._window() and first >= self.hold_steps

    def _batch_index(self, global_step: int) -> int:
        """Lookahead j of update u takes held-out batch u * lookaheads + j."""
        to_update = self._steps_to_update(global_step)
        update = (global_step + to_update + 1) // self.every - 1
        return update * self.lookaheads + self.lookaheads - 1 - to_update

    def _heldout_batch(self, index: int) -> HeldoutBatch:
        steps = len(self.loader)
        if self._batches is None or index != self._next_batch:
            epoch, start = divmod(index, steps)
            self._batches = self._cycle(epoch, start)
        self._next_batch = index + 1
        held, labels, valid = next(self._batches)
        return HeldoutBatch(normalize_images(held), labels, valid)

    def _cycle(self, epoch: int, start: int):
        while True:
            yield from self.loader.epoch(epoch, start_step=start)
            epoch, start = epoch + 1, 0

    def update(
        self,
        net_optimizer: torch.optim.Optimizer,
        views: Tensor,
        labels: Tensor,
        global_step: int,
        step_skipped: Tensor | None = None,
        images: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The updater's work after the network's step ``global_step`` (a lookahead, or a pair's
        fork or step), and at a cycle's end the update; what to log (the update's mean
        hypergradient, as 0-d device tensors; nothing before it). ``step_skipped`` (the network's
        step was skipped): this cycle's one-step update is skipped too. ``views``: the step's,
        attached to the severity sample (``pathwise``); ``images``: the step's images, which
        ``paired`` renders again with the augmenter's last draws."""
        if self.estimator == "paired" and images is None:
            raise ValueError("the paired estimator renders the step's images again: pass images")
        if self.horizon > 1:
            return self._horizon_update(net_optimizer, labels, global_step, images)
        held = self._heldout_batch(self._batch_index(global_step))
        if self.estimator == "paired":
            aug = self.net.augmenter
            result = paired_hypergradient(
                self.net, net_optimizer, images, aug.last_params, aug.last_severity, labels, held,
                self.env, beta_jsd=self.beta_jsd, fixed_length=self.fixed_length,
                log_step=self.log_step,
            )  # fmt: skip
        else:
            result = severity_hypergradient(
                self.net, net_optimizer, views, labels, held, self.env,
                beta_jsd=self.beta_jsd, fixed_length=self.fixed_length,
            )  # fmt: skip
        self._add(result, step_skipped)
        if self._steps_to_update(global_step):
            return {}
        return self._step()

    def _add(self, result: Hypergradient, step_skipped: Tensor | None = None) -> None:
        """One lookahead's (or pair's) reading into the cycle's sums; not finite, or taken after
        a skipped network step, it marks the cycle's update to be skipped."""
        bad = ~result.finite if step_skipped is None else step_skipped | ~result.finite
        self._sums += torch.stack(
            [result.grad_mu, result.grad_log_sigma, result.heldout_loss, bad.float()]
        )

    def _new_pair(self, net_optimizer: torch.optim.Optimizer) -> HorizonPair:
        return HorizonPair(self.net, net_optimizer, log_step=self.log_step,
                           beta_jsd=self.beta_jsd, grad_clip=self.grad_clip)  # fmt: skip

    def _horizon_update(self, net_optimizer, labels, global_step: int, images) -> dict:
        """Fork the pair (K steps before the update), step it, and at the update read it."""
        to_update = self._steps_to_update(global_step)
        if to_update == self.horizon:  # the pair starts from the weights after this step
            self.pair = self._new_pair(net_optimizer)
            return {}
        if self._pair_state is not None:  # resumed inside a window: the copies as saved
            self.pair = self._new_pair(net_optimizer)
            self.pair.load_state_dict(self._pair_state)
            self._pair_state = None
        if self.pair is None:  # a checkpoint from before the pair was saved: this window is lost
            return {}
        aug = self.net.augmenter
        self.pair.step(net_optimizer, images, labels, aug.last_params, aug.last_severity,
                       self.env)  # fmt: skip
        if to_update:
            return {}
        result = self.pair.result(self._heldout_batch(self._batch_index(global_step)), self.env)
        self.pair = None
        self._add(result)
        return self._step()

    def _step(self) -> dict[str, Tensor]:
        """The step along the cycle's mean hypergradient (Adam's, or the sign step; skipped on the
        device if any of its lookaheads was not finite), then the projection below the bound."""
        mean = self._sums / self.lookaheads
        skip = self._sums[3] > 0
        if self.rule == "sign":
            self._sign_step(mean[0], mean[1], skip)
        else:
            self._adam_step(mean[0], mean[1], skip)
        self.skipped += skip
        self._sums.zero_()
        severity = self.net.severity
        with torch.no_grad():  # projected: a median beyond the bound would sit where no sample
            # carries a gradient, so nothing could bring it back
            severity.log_severity_mu.clamp_(max=math.log(severity.max_severity))
        return {"heldout_loss": mean[2], "hypergrad_mu": mean[0], "hypergrad_log_sigma": mean[1]}

    def _adam_step(self, grad_mu: Tensor, grad_log_sigma: Tensor, skip: Tensor) -> None:
        severity = self.net.severity
        for p, g in zip((severity.log_severity_mu, severity.log_severity_log_sigma),
                        (grad_mu, grad_log_sigma)):  # fmt: skip
            p.grad = torch.where(skip, torch.zeros_like(g), g).to(p.dtype).reshape(p.shape)
        self.optimizer.found_inf = skip.float()  # read by the fused step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sign_step(self, grad_mu: Tensor, grad_log_sigma: Tensor, skip: Tensor) -> None:
        """mu -= lr sign(g_mu); log sigma -= clamp(lr g_sigma / |g_mu|, +-lr); none where skipped
        or where g_mu is 0 (on the device: no host read)."""
        severity = self.net.severity
        ok = ~skip & (grad_mu != 0)
        scale = self.lr / torch.where(ok, grad_mu.abs(), 1.0)
        zero = torch.zeros_like(grad_mu)
        steps = (torch.where(ok, scale * grad_mu, zero),
                 torch.where(ok, (scale * grad_log_sigma).clamp(-self.lr, self.lr), zero))  # fmt: skip
        with torch.no_grad():
            for p, step in zip((severity.log_severity_mu, severity.log_severity_log_sigma), steps):
                p.sub_(step.to(p.dtype).reshape(p.shape))

    @property
    def skipped_nonfinite(self) -> int:
        """Updates skipped because a value was non-finite (a host read: for reports)."""
        return int(self.skipped)

    def state_dict(self) -> dict[str, Any]:
        pair = self.pair.state_dict() if self.pair is not None else self._pair_state
        return {
            "optimizer": self.optimizer.state_dict(),
            "skipped": self.skipped_nonfinite,
            "lookahead_sums": self._sums.tolist(),
            "horizon_pair": pair,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped.fill_(int(state["skipped"]))
        self._sums.copy_(torch.tensor(state.get("lookahead_sums", [0.0] * 4)))
        self.pair, self._pair_state = None, state.get("horizon_pair")
