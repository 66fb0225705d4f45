"""The one-step lookahead's hypergradient: how the held-out loss after this step's update moves
with the severity, differentiated (``pathwise``) or measured over a log-step (``paired``).

The lookahead is the network's update on the augmented batch (DARTS, Liu et al. 2019, section
2.3; DADA, Li et al. 2020; MADAO, Hataya et al. 2022):

    w'(s) = w + |a| a(s) / |a(s)|,   a(s) = J grad_w L_train(w, s)   the optimiser's step
    d L_val(w'(s)) / ds = v^T dw'/ds,  v = grad_w L_val(w')
                        = c^T d(grad_w L_train)/ds,  c = J v - (v^T a / |a|^2) J a

``J`` is the Jacobian of the optimiser's update with respect to the gradient, its statistics held
fixed: ``-lr`` for SGD (``-lr (1 + momentum)`` with Nesterov), and
``-lr (1 - beta1) / ((1 - beta1^t) (sqrt(v_hat) + eps))`` for Adam/AdamW, so the lookahead is the
step the network really takes (DARTS assumes plain SGD). The mixed derivative
``c^T d(grad_w L_train)/dx`` is exact: a Hessian-vector product by automatic differentiation
(forward mode over reverse mode), in fp32 whatever the training precision, evaluated around the
post-step weights (the Hessian changes by O(lr) over one step; evaluating there saves a copy of
the weights). Why not the DARTS finite difference ``[grad_x L(w + eps c) - grad_x L(w - eps c)] /
2 eps`` it replaces: on a ReLU and max-pool network the two weight points sit on different sides
of activation kinks, so it measures noise at every step size, and in bf16 a weight step of norm
0.01 is near the format's resolution (benchmarks/severity_study_estimators.py; the figures are in
docs/learnable-severity.md).

The step's *length* is held fixed (the second term of ``c``): the severity chooses the direction
of the update, not its size. Why: a stronger severity makes the JSD gradient larger, and with the
length free (plain DARTS) the lookahead rewards any larger step that is positively aligned with
the held-out gradient: in the pilot runs plain DARTS pushed a start at s = 8 into the bound within
3 epochs. Adam's step length does not follow the gradient's scale beyond a few hundred steps
anyway, and with SGD the schedule sets it. ``--severity_step_length free`` leaves the length to
the severity (``c = J v``); on the horizon probe both read the same (docs/studies.md).

``--severity_estimator paired`` (:func:`paired_hypergradient`) measures the same lookahead's
slope over a wide log-step instead of differentiating it at the sampled severity: on the horizon
probe the derivative read zero from s = 8 where paired runs saw the severity's effect, and the
paired difference read its sign in every seed (docs/studies.md).

Cost per lookahead (pathwise): one held-out forward/backward (eval mode, no AugMix), one
forward/backward of the training batch to its input carried in forward mode along c (about 2.7
training steps), and one backward through AugMix to the severity. Under DDP the held-out batch
is sharded by rank and ``v`` is all-reduced (so every rank uses the held-out gradient of the
whole global held-out batch), then the per-rank severity gradients are averaged: every rank
applies the same update and keeps the same severity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from ..augment.losses import augmix_objective
from ..distributed import DistEnv, all_reduce_sum
from .hyper_passes import (
    HeldoutBatch,
    Hypergradient,
    batch_statistics_only,
    fp32_network,
    heldout_gradient,
    heldout_loss_at,
    rank_mean,
    split_like,
    squared_norm,
    training_gradient,
)


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


def taken_step(jac: dict[Tensor, Tensor | float], params: list[Tensor]) -> list[Tensor]:
    """a = J g: the step the update Jacobian makes of each parameter's ``.grad`` (the step's)."""
    return [jac[p] * (torch.zeros_like(p) if p.grad is None else p.grad) for p in params]


def lookahead_direction(
    optimizer: torch.optim.Optimizer, params: list[Tensor], v: Tensor, *, fixed_length: bool = True
) -> list[Tensor]:
    """2. c = J v - (v^T a / |a|^2) J a with a = J g the step: the change of w' along v per unit
    change of the training gradient, the step's length held fixed (see the module docstring);
    ``fixed_length=False``: c = J v, the step as the optimiser's linearised update makes it."""
    jac = update_jacobian(optimizer)
    vs = split_like(v, params)
    if not fixed_length:
        return [jac[p] * vv for p, vv in zip(params, vs)]
    a = taken_step(jac, params)
    v_dot_a = sum((vv.double() * t).sum() for vv, t in zip(vs, a))
    coef = (v_dot_a / squared_norm(a).clamp_min(1e-30)).to(v.dtype)
    return [jac[p] * (vv - coef * t) for p, vv, t in zip(params, vs, a)]


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
            run = fp32_network(lambda inp: functional_call(model, w, (inp,)))
            return augmix_objective(net.classify(x, model=run), labels, jsd=True,
                                    beta_jsd=beta_jsd).total  # fmt: skip

        return torch.func.grad(loss)(views.detach())

    with torch.enable_grad(), batch_statistics_only(model):
        return torch.func.jvp(input_gradient, (weights,), (tangents,))[1]


def severity_hypergradient(
    net: Any,
    optimizer: torch.optim.Optimizer,
    views: Tensor,
    labels: Tensor,
    heldout: HeldoutBatch,
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
        heldout: this rank's share of the held-out batch.
        beta_jsd: the JSD weight of the training loss.
        fixed_length: the step's length held fixed (the default: the module docstring says
            why); False lets it follow the severity, as the real optimiser's step does.
    """
    named = [(n, p) for n, p in net.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    severity = net.severity
    sev_params = [severity.log_severity_mu, severity.log_severity_log_sigma]
    v, heldout_loss = heldout_gradient(net, params, heldout, env)
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


def paired_hypergradient(
    net: Any,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    draws: Any,
    severity: Tensor,
    labels: Tensor,
    heldout: HeldoutBatch,
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
    length = torch.sqrt(squared_norm(step))
    sev = net.severity
    s = severity.detach().to(torch.promote_types(severity.dtype, torch.float32))
    top = torch.full_like(s, float(sev.max_severity))
    ends = (torch.minimum(s * math.exp(log_step), top), s * math.exp(-log_step))
    losses = []
    with torch.no_grad():
        at_step = {n: p.detach() for n, p in named}
        losses.append(heldout_loss_at(net, at_step, heldout, env))
        for end in ends:
            views = torch.cat(net.augmenter.apply(images, draws, end))
            grads = training_gradient(net, named, views, labels, beta_jsd, env)
            moved = [jac[p] * g for p, g in zip(params, grads)]
            scale = 1.0
            if fixed_length:
                norm = torch.sqrt(squared_norm(moved))
                scale = (length / norm.clamp_min(1e-30)).to(params[0].dtype)
            weights = {n: p.detach() + scale * m - a
                       for (n, p), m, a in zip(named, moved, step)}  # fmt: skip
            losses.append(heldout_loss_at(net, weights, heldout, env))
    # each rank drew its own severity: the span and spread of all ranks' draws, so that every
    # rank takes the same update (the losses are already the global held-out batch's)
    mu = sev.log_severity_mu.detach().to(s.dtype)
    span, spread = rank_mean(torch.stack([(ends[0].log() - ends[1].log()).mean(),
                                          (s.log() - mu).mean()]), env)  # fmt: skip
    slope = (losses[1] - losses[2]) / span.to(losses[1].dtype)
    grads = torch.stack([slope, slope * spread.to(slope.dtype)])
    finite = torch.isfinite(grads).all() & torch.isfinite(losses[0])
    grads = torch.where(finite, grads, torch.zeros_like(grads)).float()
    return Hypergradient(losses[0].float(), grads[0], grads[1], finite)
