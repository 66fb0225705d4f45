"""The learning rate as a pure function of the step, and the optimiser with its parameter groups."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .config import OptimSettings


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    schedule: str,
    warmup_epochs: float,
    step_epochs: int = 30,
    restart_epochs: int = 10,
    restart_mult: int = 1,
    min_factor: float = 0.0,
    per_epoch: bool = False,
) -> float:
    """The learning-rate multiplier as a pure function of the global step (exact on resume).

    ``steps_per_epoch`` is the number of steps the run actually takes per epoch (capped by
    ``--max_steps_per_epoch``), so epoch boundaries, decays and the cosine's end fall where the
    run's do. After a linear warm-up (per step):

    - ``step``: x0.1 every ``step_epochs`` epochs;
    - ``step_thirds``: x1, x0.1, x0.01 with boundaries at k and 2k epochs, k = epochs // 3: the
      official AugMix ``imagenet.py`` (its ``adjust_learning_rate``; at 180 epochs: 60 and 120);
    - ``cosine``: half a cosine from 1 to ``min_factor`` over the epochs after warm-up;
    - ``cosine_restarts``: torch's ``CosineAnnealingWarmRestarts(T_0=restart_epochs,
      T_mult=restart_mult, eta_min=min_factor x lr)``, periods in epochs;
    - ``constant``.

    Step schedules change at epoch boundaries (the official code sets the lr once per epoch);
    ``per_epoch`` holds the cosines constant within an epoch too (Lightning's
    ``interval="epoch"``, the reference learnable-severity script), instead of every step.
    """
    epoch_f = step / max(steps_per_epoch, 1)
    if warmup_epochs > 0 and epoch_f < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    epoch = math.floor(epoch_f)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** (epoch // step_epochs)
    if schedule == "step_thirds":
        k = epochs // 3
        return 1.0 if epoch < k else 0.1 if epoch < 2 * k else 0.01
    t = (epoch if per_epoch else epoch_f) - warmup_epochs  # epochs into the cosine
    if schedule == "cosine":
        progress = min(t / max(epochs - warmup_epochs, 1e-8), 1.0)
    elif schedule == "cosine_restarts":
        period = restart_epochs  # subtract whole periods: exact where a log-formula rounds
        while t >= period:
            t -= period
            period *= restart_mult
        progress = t / period
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_factor(optim: OptimSettings, step: int, steps_per_epoch: int, epochs: int) -> float:
    """:func:`lr_factor` with the schedule of ``optim`` (``--schedule`` and its flags)."""
    return lr_factor(
        step,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        schedule=optim.schedule,
        warmup_epochs=optim.warmup_epochs,
        step_epochs=optim.step_epochs,
        restart_epochs=optim.restart_epochs,
        restart_mult=optim.restart_mult,
        min_factor=optim.lr_min_factor,
        per_epoch=optim.lr_interval == "epoch",
    )


def build_optimizer(
    net: nn.Module, optim: OptimSettings, global_batch: int, severity_lr_mult: float
) -> torch.optim.Optimizer:
    """``net``'s (an ``AugmentedClassifier``) parameter groups: the network's with weight decay
    ``beta_net``; the severity's at lr x mult, no decay (where the training loss trains it).

    The network's decay covers every parameter, as in both official recipes (AugMix's
    ``imagenet.py``: ``SGD(net.parameters(), momentum=0.9, weight_decay=1e-4)``; the reference
    script: ``AdamW`` with ``beta_net`` on all network params). ``no_decay_norm_bias`` exempts
    norm weights and biases (1-D params; a common later refinement), ``nesterov`` switches SGD to
    Nesterov momentum: both off by default.
    """
    lr = optim.lr * (global_batch / optim.lr_scale_batch if optim.lr_scale_batch else 1.0)
    decay, no_decay = [], []
    for p in net.model.parameters():
        if p.requires_grad:
            (no_decay if optim.no_decay_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.beta_net, "base_lr": lr, "name": "net"}]
    if no_decay:
        groups.append(
            {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "name": "net_no_decay"}
        )
    severity = net.severity
    if severity is not None and severity.objective.from_training_loss:  # else: its own optimiser
        groups.append(
            {
                "params": list(severity.parameters()),
                "weight_decay": 0.0,
                "base_lr": lr * severity_lr_mult,
                "name": "severity",
            }
        )
    for g in groups:
        g["lr"] = g["base_lr"]
    # fused: one kernel per step, and a skipped step (found_inf) is skipped on the device
    if optim.optimizer == "sgd":
        opt = torch.optim.SGD(
            groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True
        )
        # The fused kernel allocates the momentum buffer uninitialised when the very first step
        # is skipped; zeros give the same first step (buf = 0 * momentum + grad) and no garbage.
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    return torch.optim.AdamW(groups, lr=lr, fused=True)
