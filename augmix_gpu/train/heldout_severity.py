"""The held-out objective for the learnable severity: a one-step-lookahead hypergradient.

Why: the training loss cannot choose the severity. CE + JSD is minimised by the identity (weaker
views are easier to agree on), so ``minimize`` collapses towards no augmentation, and
``adversarial`` climbs until the bound stops it. Following DARTS (Liu et al. 2019, section 2.3)
and its augmentation descendants (DADA, Li et al. 2020; MADAO, Hataya et al. 2022), the severity
here descends a loss it does not feed directly: the network's cross-entropy on held-out training
images under corruptions that are *not* evaluated (ImageNet-C's 4 validation corruptions), after
the network's update on the augmented batch:

    w'(s) = w + |a| a(s) / |a(s)|,   a(s) = J grad_w L_train(w, s)   the optimiser's step
    d L_val(w'(s)) / ds = v^T dw'/ds,  v = grad_w L_val(w')
                        = c^T d(grad_w L_train)/ds,  c = J v - (v^T a / |a|^2) J a

``J`` is the Jacobian of the optimiser's update with respect to the gradient, its statistics held
fixed: ``-lr`` for SGD (``-lr (1 + momentum)`` with Nesterov), and
``-lr (1 - beta1) / ((1 - beta1^t) (sqrt(v_hat) + eps))`` for Adam/AdamW, so the lookahead is the
step the network really takes (DARTS assumes plain SGD). The mixed derivative
``c^T d(grad_w L_train)/dx`` is exact: a Hessian-vector product by automatic differentiation
(forward mode over reverse mode), in fp32 whatever the training precision, evaluated around the post-step weights (the Hessian changes by
O(lr) over one step; evaluating there saves a copy of the weights). Why not the DARTS finite
difference ``[grad_x L(w + eps c) - grad_x L(w - eps c)] / 2 eps`` it replaces: on a ReLU and
max-pool network the two weight points sit on different sides of activation kinks, so it measures
noise at every step size, and in bf16 a weight step of norm 0.01 is near the format's resolution
(benchmarks/severity_study_estimators.py; the figures are in docs/learnable-severity.md).

The step's *length* is held fixed (the second term of ``c``): the severity chooses the direction
of the update, not its size. Why: a stronger severity makes the JSD gradient larger, and with the
length free (plain DARTS) the lookahead rewards any larger step that is positively aligned with
the held-out gradient: in the pilot runs plain DARTS pushed a start at s = 8 into the bound within
3 epochs. Adam's step length does not follow the gradient's scale beyond a few hundred steps
anyway, and with SGD the schedule sets it. ``--severity_step_length free`` leaves the length to
the severity (``c = J v``); on the horizon probe both read the same (docs/studies.md). (A greedy one-step objective is biased towards what helps the next step, the short-horizon bias
of Wu et al. 2018; docs/studies.md has what the studies measured.)

``--severity_estimator paired`` (:func:`paired_hypergradient`) measures the same lookahead's
slope over a wide log-step instead of differentiating it at the sampled severity: on the horizon
probe the derivative read zero from s = 8 where paired runs saw the severity's effect, and the
paired difference read its sign in every seed (docs/studies.md).

Cost per update (pathwise): one held-out forward/backward (eval mode, no AugMix), one forward/backward of the
training batch to its input carried in forward mode along c (about 2.7 training steps), and one
backward through AugMix to the severity; the trainer runs it every ``--severity_update_every`` steps (averaged over
the last ``--severity_lookaheads`` steps of each such cycle, each with its own held-out batch,
when one lookahead is too noisy). Under DDP the
held-out batch is sharded by rank and ``v`` is all-reduced (so every rank uses the held-out
gradient of the whole global held-out batch), then the per-rank severity gradients are averaged:
every rank applies the same update and keeps the same severity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..augment.augmix import normalize_images
from ..augment.losses import augmix_objective
from ..distributed import DistEnv, all_reduce_sum


@dataclass
class Hypergradient:
    """One hypergradient evaluation, as 0-d tensors on the device (read at logging steps only):
    the held-out loss at w', d L_val / d (mu, log_sigma), and whether all of it is finite."""

    heldout_loss: Tensor
    grad_mu: Tensor
    grad_log_sigma: Tensor
    finite: Tensor


def update_jacobian(optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor | float]:
    """``d (update of p) / d (gradient of p)`` for every parameter, the optimiser state held fixed.

    SGD: ``-lr`` (``-lr (1 + momentum)`` with Nesterov; ``-lr (1 - dampening)`` with dampening);
    Adam/AdamW: ``-lr (1 - beta1) / ((1 - beta1^t)(sqrt(v_t / (1 - beta2^t)) + eps))`` elementwise.
    Weight decay does not depend on the gradient, so it does not enter.
    """
    out: dict[Tensor, Tensor | float] = {}
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            if isinstance(optimizer, torch.optim.SGD):
                mom, damp = float(group["momentum"]), float(group["dampening"])
                out[p] = -lr * (
                    1.0 + mom if group["nesterov"] and mom else 1.0 - damp if mom else 1.0
                )
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                state = optimizer.state.get(p)
                if not state:  # no step taken yet: Adam's first step is lr * sign(g)
                    out[p] = -lr
                    continue
                beta1, beta2 = group["betas"]
                t = state["step"]  # a tensor (on the device for fused Adam): no host read
                denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
                out[p] = denom.reciprocal_().mul_(-lr * (1.0 - beta1) / (1.0 - beta1**t))
            else:
                raise TypeError(
                    f"the held-out objective needs SGD, Adam or AdamW for the network, got "
                    f"{type(optimizer).__name__}"
                )
    return out


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _flat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` (a missing gradient as zeros): one all-reduce for all."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(like, tensors)]
    )


def _squared_norm(tensors: list[Tensor]) -> Tensor:
    """Sum of squares over a list of tensors, in float64."""
    return sum((t.double() ** 2).sum() for t in tensors)


def taken_step(jac: dict[Tensor, Tensor | float], params: list[Tensor]) -> list[Tensor]:
    """a = J g: the step the update Jacobian makes of each parameter's ``.grad`` (the step's)."""
    return [jac[p] * (torch.zeros_like(p) if p.grad is None else p.grad) for p in params]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (running BatchNorm statistics, none updated), then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _masked_ce_sum(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Sum of the cross-entropy over the valid (non-padding) samples, in fp32 at least, no host sync."""
    ce = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none"
    )
    return (ce * valid.to(ce.dtype)).sum()


def severity_hypergradient(
    net: Any,
    optimizer: torch.optim.Optimizer,
    views: Tensor,
    labels: Tensor,
    heldout_images: Tensor,
    heldout_labels: Tensor,
    heldout_valid: Tensor,
    env: DistEnv,
    *,
    beta_jsd: float,
    fixed_length: bool = True,
) -> Hypergradient:
    """``d L_val(w'(s)) / d (mu, log_sigma)`` for one lookahead; nothing is changed.

    Nothing is read to the host: a non-finite result is zeros and ``finite`` says so.

    Args:
        net: the :class:`~augmix_gpu.train.step.AugmentedClassifier` (not the DDP wrapper), its
            network already updated by this step (the weights are w') and its parameters'
            ``.grad`` still holding this step's gradient (the step's direction).
        optimizer: the network's optimiser, after its step (for the update Jacobian).
        views: this step's ``[clean; view1; view2]`` batch, still attached to the severity sample
            (made with ``net.views(images, severity_grad=True)``); the network was fed its
            detached copy.
        labels: the step's labels ``[B]``.
        heldout_images, heldout_labels, heldout_valid: this rank's held-out batch (normalised
            images ``[H,3,h,w]``; ``valid`` marks real samples, False for padding).
        beta_jsd: the JSD weight of the training loss.
        fixed_length: the step's length held fixed (the default: the module docstring says
            why); False lets it follow the severity, as the real optimiser's step does.
    """
    named = [(n, p) for n, p in net.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    severity = net.severity
    sev_params = [severity.log_severity_mu, severity.log_severity_log_sigma]
    v, heldout_loss = heldout_gradient(
        net, params, heldout_images, heldout_labels, heldout_valid, env
    )
    c = lookahead_direction(optimizer, params, v, fixed_length=fixed_length)
    mixed = mixed_derivative(net, named, c, views, labels, beta_jsd)

    # 4. Through AugMix to (mu, log_sigma), averaged over ranks.
    hyper = torch.autograd.grad(views, sev_params, grad_outputs=mixed, allow_unused=True)
    grads = torch.stack(
        [torch.zeros((), device=v.device) if h is None else h.float() for h in hyper]
    )
    all_reduce_sum(grads, env)
    grads /= env.world_size
    finite = torch.isfinite(grads).all() & torch.isfinite(heldout_loss)
    grads = torch.where(finite, grads, torch.zeros_like(grads))
    return Hypergradient(heldout_loss.detach().float(), grads[0], grads[1], finite)


ESTIMATORS = ("pathwise", "paired")


def paired_hypergradient(
    net: Any,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    draws: Any,
    severity: Tensor,
    labels: Tensor,
    heldout_images: Tensor,
    heldout_labels: Tensor,
    heldout_valid: Tensor,
    env: DistEnv,
    *,
    beta_jsd: float,
    fixed_length: bool = True,
    log_step: float = 0.5,
) -> Hypergradient:
    """The same lookahead's slope in log s measured over a wide step: the step's images and
    draws rendered again at ``s e^log_step`` and ``s e^-log_step`` (common random numbers), each
    pair of views' training gradient turned into the optimiser's step, and the held-out loss
    after each: ``(L_val(w'+) - L_val(w'-)) / (log s+ - log s-)``; nothing is changed.

    Why: :func:`severity_hypergradient`'s derivative at the sampled s was noise on the horizon
    probe (pooled z -0.4 / +0.4 from s = 8, with and without the straight-through ops) while
    paired runs one step apart at s = 0.8 and 8 told the severities apart (t = 2.6-3.2); this
    difference read their sign in every seed (z +4.0). The reading that fits: one batch's held-out
    loss is rough in s at the scale of a derivative and smooth over a log-step. It needs no
    derivative of the ops (posterize's, solarize's surrogates included). In the severity study
    it moved no start closer to the optimum: the one-step objective itself points elsewhere for
    most of a run (docs/studies.md).

    The lookahead is :func:`severity_hypergradient`'s: ``w'(s) = w' + a(s) - a`` with ``a = J g``
    the step as the update Jacobian makes it (``fixed_length``: ``a(s)`` rescaled to ``|a|``), its
    gradients taken at w' (train-mode BatchNorm, nothing updated) and averaged over ranks. The
    chain rule gives both parameters: d log s / d mu = 1, d log s / d log sigma = log s - mu
    (exact for one severity per batch; with ``--per_sample_severity``, the batch's mean of
    ``log s_i - mu``). Cost: two training forward/backward passes and three held-out forwards.

    Args:
        images: the step's images as the augmenter took them; ``draws`` and ``severity``: that
            call's ``AugMixParams`` and severity sample (``[]`` or ``[B]``).
        log_step: half the log-severity distance between the two ends (0.5: x1.65 each way);
            the upper end is clipped at the severity's bound.
    """
    named = [(n, p) for n, p in net.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    jac = update_jacobian(optimizer)
    step = taken_step(jac, params)
    length = torch.sqrt(_squared_norm(step))
    sev = net.severity
    s = severity.detach().to(torch.promote_types(severity.dtype, torch.float32))
    top = torch.full_like(s, float(sev.max_severity))
    ends = (torch.minimum(s * math.exp(log_step), top), s * math.exp(-log_step))
    losses = []
    with torch.no_grad():
        at_step = {n: p.detach() for n, p in named}
        losses.append(heldout_loss_at(net, at_step, heldout_images, heldout_labels,
                                      heldout_valid, env))  # fmt: skip
        for end in ends:
            views = torch.cat(net.augmenter.apply(images, draws, end))
            grads = training_gradient(net, named, views, labels, beta_jsd, env)
            moved = [jac[p] * g for p, g in zip(params, grads)]
            scale = 1.0
            if fixed_length:
                norm = torch.sqrt(_squared_norm(moved))
                scale = (length / norm.clamp_min(1e-30)).to(params[0].dtype)
            weights = {n: p.detach() + scale * m - a
                       for (n, p), m, a in zip(named, moved, step)}  # fmt: skip
            losses.append(heldout_loss_at(net, weights, heldout_images, heldout_labels,
                                          heldout_valid, env))  # fmt: skip
    span = (ends[0].log() - ends[1].log()).mean()
    slope = (losses[1] - losses[2]) / span
    spread = (s.log() - sev.log_severity_mu.detach().to(s.dtype)).mean()
    grads = torch.stack([slope, slope * spread.to(slope.dtype)])
    finite = torch.isfinite(grads).all() & torch.isfinite(losses[0])
    grads = torch.where(finite, grads, torch.zeros_like(grads)).float()
    return Hypergradient(losses[0].float(), grads[0], grads[1], finite)


def training_gradient(net, named, views, labels, beta_jsd: float, env: DistEnv) -> list[Tensor]:
    """grad_w of the training loss (CE + JSD) of ``views`` at the current weights, averaged over
    ranks as DDP averages the step's: fp32, BatchNorm on the batch's statistics, none updated."""
    params = [p for _, p in named]
    with torch.enable_grad(), _batch_statistics_only(net.model):
        logits = net.classify(views, model=_fp32(net.model))
        loss = augmix_objective(logits, labels, jsd=True, beta_jsd=beta_jsd).total
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = _flat(list(grads), params)
    all_reduce_sum(flat, env)
    return _split(flat / env.world_size, params)


def heldout_loss_at(net, weights, images, labels, valid, env: DistEnv) -> Tensor:
    """The mean held-out CE of the network at ``weights`` ({name: tensor}), over the global
    held-out batch: eval mode (running BatchNorm statistics), fp32."""
    model = net.model
    run = _fp32(lambda x: functional_call(model, weights, (x,)))
    with _eval_mode(model):
        loss_sum = _masked_ce_sum(net.classify(images, model=run), labels, valid)
    flat = torch.stack([loss_sum, valid.sum().to(loss_sum.dtype)])
    all_reduce_sum(flat, env)
    return flat[0] / flat[1].clamp_min(1.0)


def heldout_gradient(net, params, images, labels, valid, env: DistEnv) -> tuple[Tensor, Tensor]:
    """1. v = grad_w of the mean held-out CE at w', over the global held-out batch, and that CE.

    Eval mode: the held-out images are scored as at test time (running BatchNorm statistics, none
    updated)."""
    model = net.model
    with _eval_mode(model), torch.enable_grad():
        loss_sum = _masked_ce_sum(net.classify(images, model=_fp32(model)), labels, valid)
        grads = torch.autograd.grad(loss_sum, params, allow_unused=True)
    counts = torch.stack([loss_sum.detach(), valid.sum().to(loss_sum.dtype)])
    flat = torch.cat([_flat(list(grads), params), counts])
    all_reduce_sum(flat, env)
    count = flat[-1].clamp_min(1.0)
    return flat[:-2] / count, flat[-2] / count


def lookahead_direction(
    optimizer: torch.optim.Optimizer, params: list[Tensor], v: Tensor, *, fixed_length: bool = True
) -> list[Tensor]:
    """2. c = J v - (v^T a / |a|^2) J a with a = J g the step: the change of w' along v per unit
    change of the training gradient, the step's length held fixed (see the module docstring);
    ``fixed_length=False``: c = J v, the step as the optimiser's linearised update makes it."""
    jac = update_jacobian(optimizer)
    vs = _split(v, params)
    if not fixed_length:
        return [jac[p] * vv for p, vv in zip(params, vs)]
    a = taken_step(jac, params)
    v_dot_a = sum((vv.double() * t).sum() for vv, t in zip(vs, a))
    coef = (v_dot_a / _squared_norm(a).clamp_min(1e-30)).to(v.dtype)
    return [jac[p] * (vv - coef * t) for p, vv, t in zip(params, vs, a)]


def _fp32(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``run`` (the network) in fp32 whatever the training precision (autocast off inside): a
    second derivative in bf16 carries 8 bits of mantissa, less than the signal of one update."""

    def fp32(x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # x: fp32 views, as AugMix makes
            return run(x)

    return fp32


@contextmanager
def _batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalising by the batch's statistics, as in train mode, without updating its
    running statistics (nothing is written: what torch.func's transforms require)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # train mode + no tracking: batch statistics, no update
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def mixed_derivative(net, named, c, views, labels, beta_jsd: float) -> Tensor:
    """3. d/dx [c^T grad_w L_train(w', x)] at the step's views, exactly (``named``: the network's
    trainable (name, parameter) pairs, ``c`` one tensor per parameter).

    Forward over reverse: the input gradient grad_x L (reverse mode), differentiated along c in
    the weights by forward mode (``torch.func.jvp``); the mixed partials commute, so this is the
    Hessian-vector product of double backward, at ~0.8 of its cost (2.7 against 3.5 training
    steps for tiny_resnet and ResNet-18 on the CPU). Autograd differentiates the piecewise smooth
    network (ReLU, max-pool) where it is, so no step crosses a kink, unlike the DARTS finite
    difference this replaces. BatchNorm in train mode, its running statistics not touched."""
    model = net.model
    weights = {n: p.detach() for n, p in named}
    tangents = {n: t.to(p.dtype) for (n, p), t in zip(named, c)}

    def input_gradient(w: dict[str, Tensor]) -> Tensor:
        def loss(x: Tensor) -> Tensor:
            run = _fp32(lambda inp: functional_call(model, w, (inp,)))
            return augmix_objective(net.classify(x, model=run), labels, jsd=True,
                                    beta_jsd=beta_jsd).total  # fmt: skip

        return torch.func.grad(loss)(views.detach())

    with torch.enable_grad(), _batch_statistics_only(model):
        return torch.func.jvp(input_gradient, (weights,), (tangents,))[1]


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
    ``(mu, log_sigma)`` with learning rate ``lr``, along the mean of :func:`severity_hypergradient`
    over the last ``lookaheads`` steps of the cycle (default 1: the update's step alone), each
    lookahead on the next held-out batch (``estimator``: :func:`severity_hypergradient`, or
    :func:`paired_hypergradient` with ``log_step``). Adam, not the network's optimiser: the hypergradient's
    scale follows the network's learning rate and loss landscape, and Adam's normalised step makes
    ``lr`` mean "log-severity per update" whatever they are. Why several lookaheads: each one sees
    one draw of AugMix and one held-out batch; their mean has less noise, at ``lookaheads`` times
    the cost per update (the per-epoch signal-to-noise in results.json measures what it buys).

    No prior: the KL to the prior exists to hold the training-loss objectives (``minimize``,
    ``adversarial``), which have no other place to stop. The held-out loss has one, and a prior
    centred on the starting severity would only pull every run back to where it started (and
    its weight, per training example, has no common scale with a hypergradient).

    The held-out batches cycle through ``heldout_loader`` in its fixed (evaluation) order; the
    batch of a lookahead is a pure function of its step, and the running sum of a cycle is part of
    the state, so a resumed run takes the same batches and the same updates.
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
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not log_step > 0:
            raise ValueError(f"log_step must be > 0, got {log_step}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 1 <= lookaheads <= every:
            raise ValueError(f"lookaheads must be in 1..every ({every}), got {lookaheads}")
        if net.severity is None:
            raise ValueError("the held-out objective needs a LearnableSeverity in the augmenter")
        self.net, self.loader, self.env = net, heldout_loader, env
        self.every, self.lookaheads, self.beta_jsd = int(every), int(lookaheads), float(beta_jsd)
        self.fixed_length = bool(fixed_length)
        self.estimator, self.log_step = estimator, float(log_step)
        # fused: a skipped update (non-finite) is skipped on the device, no host read
        self.optimizer = torch.optim.Adam(net.severity.parameters(), lr=lr, fused=True)
        self._batches: Any = None
        self._next_batch = -1
        device = net.severity.log_severity_mu.device
        self.skipped = torch.zeros((), device=device)
        # this cycle's sums: grad mu, grad log sigma, held-out loss, lookaheads not finite
        self._sums = torch.zeros(4, device=device)

    @property
    def pathwise(self) -> bool:
        """The estimator differentiates the step's views (they must carry the severity's graph)."""
        return self.estimator == "pathwise"

    def _steps_to_update(self, global_step: int) -> int:
        """0 at the step that ends a cycle (and updates the severity), else the steps until it."""
        return -(global_step + 1) % self.every

    def due(self, global_step: int) -> bool:
        """Whether the step with this (0-based) global index ends with a lookahead (the last
        ``lookaheads`` steps of each cycle of ``every``; the last one also updates)."""
        return self._steps_to_update(global_step) < self.lookaheads

    def _batch_index(self, global_step: int) -> int:
        """Lookahead j of update u takes held-out batch u * lookaheads + j."""
        to_update = self._steps_to_update(global_step)
        update = (global_step + to_update + 1) // self.every - 1
        return update * self.lookaheads + self.lookaheads - 1 - to_update

    def _heldout_batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        steps = len(self.loader)
        if self._batches is None or index != self._next_batch:
            epoch, start = divmod(index, steps)
            self._batches = self._cycle(epoch, start)
        self._next_batch = index + 1
        return next(self._batches)

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
        """One lookahead after the network's step ``global_step``, and at a cycle's end the update;
        what to log (the update's mean hypergradient, as 0-d device tensors; nothing before it).
        ``step_skipped`` (the network's step was skipped): this cycle's update is skipped too.
        ``views``: the step's, attached to the severity sample (``pathwise``); ``images``: the
        step's images, which ``paired`` renders again with the augmenter's last draws."""
        held, h_labels, valid = self._heldout_batch(self._batch_index(global_step))
        held = normalize_images(held)
        if self.estimator == "paired":
            if images is None:
                raise ValueError(
                    "the paired estimator renders the step's images again: pass images"
                )
            aug = self.net.augmenter
            result = paired_hypergradient(
                self.net, net_optimizer, images, aug.last_params, aug.last_severity, labels, held,
                h_labels, valid, self.env, beta_jsd=self.beta_jsd, fixed_length=self.fixed_length,
                log_step=self.log_step,
            )  # fmt: skip
        else:
            result = severity_hypergradient(
                self.net, net_optimizer, views, labels, held, h_labels, valid, self.env,
                beta_jsd=self.beta_jsd, fixed_length=self.fixed_length,
            )  # fmt: skip
        bad = ~result.finite if step_skipped is None else step_skipped | ~result.finite
        self._sums += torch.stack(
            [result.grad_mu, result.grad_log_sigma, result.heldout_loss, bad.float()]
        )
        if self._steps_to_update(global_step):
            return {}
        return self._step()

    def _step(self) -> dict[str, Tensor]:
        """The Adam step along the cycle's mean hypergradient (skipped on the device if any of
        its lookaheads was not finite), then the projection below the bound."""
        mean = self._sums / self.lookaheads
        skip = self._sums[3] > 0
        severity = self.net.severity
        for p, g in zip((severity.log_severity_mu, severity.log_severity_log_sigma), mean[:2]):
            p.grad = torch.where(skip, torch.zeros_like(g), g).to(p.dtype).reshape(p.shape)
        self.optimizer.found_inf = skip.float()  # read by the fused step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += skip
        self._sums.zero_()
        with torch.no_grad():  # projected: a median beyond the bound would sit where no sample
            # carries a gradient, so nothing could bring it back
            severity.log_severity_mu.clamp_(max=math.log(severity.max_severity))
        return {"heldout_loss": mean[2], "hypergrad_mu": mean[0], "hypergrad_log_sigma": mean[1]}

    @property
    def skipped_nonfinite(self) -> int:
        """Updates skipped because a value was non-finite (a host read: for reports)."""
        return int(self.skipped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "skipped": self.skipped_nonfinite,
            "lookahead_sums": self._sums.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped.fill_(int(state["skipped"]))
        self._sums.copy_(torch.tensor(state.get("lookahead_sums", [0.0] * 4)))
