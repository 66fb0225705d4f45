"""One training step and one training epoch, shared by train.py and the benchmarks.

The AugMix views are made inside :class:`AugmentedClassifier`, so wrapping that module in DDP
all-reduces the severity parameters together with the network's: every rank keeps identical
weights *and* severity without a second communication path.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .augmix import AugMixBatch
from .distributed import DistEnv, all_reduce_sum
from .evaluation import normalize_uint8 as normalize_images
from .hypergradient import HeldoutSeverityUpdater
from .losses import augmix_objective
from .severity import LearnableSeverity

JSD_MODES = ("augmix_jsd", "learnable_augmix_jsd")
AMP_DTYPES = {"32": None, "16": torch.float16, "bf16": torch.bfloat16}
# Per-step values kept in the severity trajectory (results.json, plots).
TRAJECTORY_KEYS = ("severity_", "heldout_", "hypergrad_")


class AugmentedClassifier(nn.Module):
    """uint8 images -> logits for the training objective of ``aug_type``.

    ``none`` feeds the normalised clean batch; ``augmix`` one AugMix view (the official
    no-JSD recipe); the JSD modes one concatenated ``[clean; view1; view2]`` batch, so that
    BatchNorm sees all three views and the network runs once.
    AugMix runs in fp32 outside autocast; only the network runs under ``amp_dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        aug_type: str,
        augmenter: AugMixBatch | None,
        *,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if (aug_type == "none") != (augmenter is None):
            raise ValueError(
                f"aug_type {aug_type!r} and augmenter {type(augmenter).__name__} disagree"
            )
        self.model = model
        self.aug_type = aug_type
        self.augmenter = augmenter
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.time_augment = False  # benchmarks: synchronise and time the AugMix part
        self.augment_seconds = 0.0

    def views(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        severity_grad: bool | None = None,
    ) -> torch.Tensor:
        """The batch the network sees: [B] clean or one view, or [3B] for the JSD modes.

        ``severity_grad``: whether the views carry a gradient to a learnable severity. Default:
        yes, unless the severity follows the held-out objective, which the training loss must not
        move; its views are then drawn without autograd (the cheap in-place path), except when
        the hypergradient step asks for them with ``severity_grad=True``. The random draws are
        the same either way.
        """
        if self.augmenter is None:
            return normalize_images(images)
        if severity_grad is None:
            severity_grad = not self.severity_follows_heldout
        with torch.set_grad_enabled(torch.is_grad_enabled() and severity_grad):
            views = self.augmenter(images, generator=generator)
        return views[1] if self.aug_type == "augmix" else torch.cat(views)

    def classify(
        self, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Normalised views -> logits: channels_last and autocast as configured.

        ``model`` replaces ``self.model`` for one call (the hypergradient evaluates the network at
        perturbed weights through ``torch.func.functional_call``).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            return (model or self.model)(x)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        views: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 images -> logits; ``views`` (already made, e.g. detached ones) skips AugMix."""
        if views is None:
            start = _now(images.device) if self.time_augment else 0.0
            views = self.views(images, generator)
            if self.time_augment:
                self.augment_seconds += _now(images.device) - start
        return self.classify(views)

    @property
    def severity(self) -> LearnableSeverity | None:
        sev = getattr(self.augmenter, "severity", None)
        return sev if isinstance(sev, LearnableSeverity) else None

    @property
    def severity_follows_heldout(self) -> bool:
        """True when the severity is trained by the held-out hypergradient, not by this loss."""
        return self.severity is not None and self.severity.objective == "heldout"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    schedule: str,
    warmup_epochs: float,
    step_epochs: int = 30,
    restart_epochs: int = 10,
) -> float:
    """The learning-rate multiplier as a pure function of the global step (exact on resume)."""
    epoch_f = step / max(steps_per_epoch, 1)
    if warmup_epochs > 0 and epoch_f < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** int(epoch_f // step_epochs)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((epoch_f - warmup_epochs) / span, 1.0)))
    if schedule == "cosine_restarts":  # CosineAnnealingWarmRestarts(T_0=restart_epochs, T_mult=1)
        return 0.5 * (
            1.0 + math.cos(math.pi * ((epoch_f - warmup_epochs) % restart_epochs) / restart_epochs)
        )
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(
    net: AugmentedClassifier, config: dict[str, Any], global_batch: int
) -> torch.optim.Optimizer:
    """Network params with weight decay ``beta_net`` (not on norms/biases); severity at lr x mult, no decay."""
    lr = config["lr"] * (
        global_batch / config["lr_scale_batch"] if config["lr_scale_batch"] else 1.0
    )
    decay, no_decay = [], []
    for p in net.model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config["beta_net"], "base_lr": lr, "name": "net"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "name": "net_no_decay"},
    ]
    if net.severity is not None and not net.severity_follows_heldout:  # heldout: its own Adam
        groups.append(
            {
                "params": list(net.severity.parameters()),
                "weight_decay": 0.0,
                "base_lr": lr * config["severity_lr_mult"],
                "name": "severity",
            }
        )
    for g in groups:
        g["lr"] = g["base_lr"]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config["momentum"], nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


class StopFlag:
    """Set by SIGTERM/SIGINT; checked once per step on every rank so all ranks stop together."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything that changes during training and must survive a resume."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0
    severity_trajectory: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StepContext:
    ddp_net: nn.Module
    net: AugmentedClassifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict[str, Any]
    env: DistEnv
    generator: torch.Generator
    steps_per_epoch: int
    stop: StopFlag
    inject_nonfinite_steps: frozenset[int] = (
        frozenset()
    )  # tests: force a NaN loss at these global steps
    severity_updater: HeldoutSeverityUpdater | None = None  # the held-out objective's trainer


def _set_lr(ctx: StepContext, step: int) -> float:
    c = ctx.config
    factor = lr_factor(
        step,
        steps_per_epoch=ctx.steps_per_epoch,
        epochs=c["epochs"],
        schedule=c["schedule"],
        warmup_epochs=c["warmup_epochs"],
        step_epochs=c["step_epochs"],
        restart_epochs=c["restart_epochs"],
    )
    for g in ctx.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return ctx.optimizer.param_groups[0]["lr"]


def train_step(
    ctx: StepContext, state: TrainState, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float] | None:
    """One optimisation step; returns the loss parts, or None when the step was skipped."""
    c, net = ctx.config, ctx.net
    lr = _set_lr(ctx, state.global_step)
    severity = net.severity
    updater = ctx.severity_updater
    hyper_step = updater is not None and updater.due(state.global_step)
    if hyper_step:  # views attached to the severity sample; the network gets a detached copy
        views = net.views(images, generator=ctx.generator, severity_grad=True)
        logits = ctx.ddp_net(images, views=views.detach())
    else:
        logits = ctx.ddp_net(images, generator=ctx.generator)
    # The held-out objective trains the severity itself, without a prior (hypergradient.py): its
    # KL is only logged here.
    kl = None if severity is None else severity.kl() if updater is None else severity.kl().detach()
    parts = augmix_objective(
        logits.float(),
        labels,
        jsd=net.aug_type in JSD_MODES,
        beta_jsd=c["beta_jsd"],
        kl=kl,
        beta_augmenter_reg=0.0 if updater is not None else c["beta_augmenter_reg"],
        kl_scale=1.0 / c["batch"],
    )
    loss = parts.total
    if state.global_step in ctx.inject_nonfinite_steps:
        loss = loss * float("nan")
    # One small all-reduce per step carries both "a rank saw a non-finite loss" and "a rank was
    # asked to stop", so every rank skips or stops at the same step (DDP would hang otherwise).
    flags = torch.tensor(
        [0.0 if torch.isfinite(loss) else 1.0, 1.0 if ctx.stop.requested else 0.0],
        device=loss.device,
    )
    if ctx.env.distributed:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    ctx.stop.requested = bool(flags[1] > 0)
    ctx.optimizer.zero_grad(set_to_none=True)
    if flags[0] > 0:
        state.skipped_nonfinite += 1
        state.nonfinite_in_row += 1
        if state.nonfinite_in_row >= c["max_nonfinite"]:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} non-finite losses in a row, the last at global step "
                f"{state.global_step} (epoch {state.epoch}, step {state.step_in_epoch}): lower --lr, "
                f"use --precision bf16/32 or --grad_clip_val, and check the data"
            )
        return None
    state.nonfinite_in_row = 0
    ctx.scaler.scale(loss).backward()
    if c["grad_clip_val"] > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(net.model.parameters(), c["grad_clip_val"])
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    hyper = {}
    if hyper_step:
        hyper = updater.update(ctx.optimizer, views, labels, state.global_step)
    out = {
        "loss": loss.item(),
        "ce": parts.ce.item(),
        "jsd": parts.jsd.item(),
        "kl": parts.kl.item(),
        "lr": lr,
    }
    if severity is not None:
        out.update(severity.stats())
    out.update(hyper)
    return out


def train_one_epoch(
    ctx: StepContext,
    state: TrainState,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    on_step: Callable[[TrainState], None] | None = None,
    progress: Any = None,
) -> dict[str, float]:
    """Run the epoch's remaining steps; stops early (state kept) when a stop was requested."""
    ctx.net.train()
    sums = {"loss": 0.0, "ce": 0.0, "jsd": 0.0, "kl": 0.0}
    done, images_seen, start = 0, 0, time.perf_counter()
    max_steps = ctx.config["max_steps_per_epoch"] or ctx.steps_per_epoch
    for images, labels, _valid in batches:
        if state.step_in_epoch >= max_steps:
            break
        out = train_step(ctx, state, images, labels)
        state.step_in_epoch += 1
        state.global_step += 1
        images_seen += images.shape[0] * ctx.env.world_size
        if out is not None:
            done += 1
            for k in sums:
                sums[k] += out[k]
            if "severity_mean" in out:
                state.severity_trajectory.append(
                    {
                        "step": state.global_step,
                        **{k: v for k, v in out.items() if k.startswith(TRAJECTORY_KEYS)},
                    }
                )
        if progress is not None and out is not None:
            rate = images_seen / max(time.perf_counter() - start, 1e-9)
            postfix = {"loss": f"{out['loss']:.3f}", "img/s": f"{rate:.0f}"}
            if "severity_last" in out:
                postfix["s"] = f"{out['severity_last']:.2f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update(1)
        if on_step is not None:
            on_step(state)
        if ctx.stop.requested:
            break
    # Mean over ranks of the per-rank means (equal step counts on every rank by construction).
    totals = torch.tensor(
        [sums[k] for k in sums] + [float(done)], dtype=torch.float64, device=ctx.env.device
    )
    all_reduce_sum(totals, ctx.env)
    n = max(totals[-1].item(), 1.0)
    metrics = {k: totals[i].item() / n for i, k in enumerate(sums)}
    metrics["images_per_s"] = images_seen / max(time.perf_counter() - start, 1e-9)
    metrics["skipped_nonfinite"] = state.skipped_nonfinite
    return metrics


__all__ = [
    "AMP_DTYPES",
    "JSD_MODES",
    "AugmentedClassifier",
    "NonFiniteLossError",
    "StepContext",
    "StopFlag",
    "TrainState",
    "build_optimizer",
    "lr_factor",
    "train_one_epoch",
    "train_step",
]
