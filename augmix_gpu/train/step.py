"""One training step and one training epoch, shared by train.py and the benchmarks.

The AugMix views are made inside :class:`AugmentedClassifier`, so wrapping that module in DDP
all-reduces the severity parameters together with the network's: every rank keeps identical
weights *and* severity without a second communication path.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..augment.augmix import IMAGENET_MEAN, IMAGENET_STD, AugMixBatch, normalize_images
from ..augment.losses import augmix_objective
from ..augment.severity import LearnableSeverity
from ..distributed import DistEnv, all_reduce_sum, any_rank
from .heldout_severity import HeldoutSeverityUpdater

if TYPE_CHECKING:
    from .config import Settings
from .schedule import schedule_factor

JSD_MODES = ("augmix_jsd", "learnable_augmix_jsd")
# Per-step values kept in the severity trajectory (results.json, plots).
TRAJECTORY_KEYS = ("severity_", "heldout_", "hypergrad_")


class AugmentedClassifier(nn.Module):
    """uint8 images -> logits for the training objective of ``aug_type``.

    ``none`` feeds the clean batch normalised with ``normalization`` (mean, std; the augmenter
    normalises its views with its own, which the trainer sets to the same); ``augmix`` one AugMix
    view (the official no-JSD recipe); the JSD modes one concatenated ``[clean; view1; view2]``
    batch, so that BatchNorm sees all three views and the network runs once.
    AugMix computes in fp32 outside autocast and hands the network its input already in
    ``amp_dtype`` (and channels_last if set); only the network runs under autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        aug_type: str,
        augmenter: AugMixBatch | None,
        *,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
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
        self.normalization = normalization
        self.time_augment = False  # benchmarks: synchronise and time the AugMix part
        self.augment_seconds = 0.0

    def keep_augmix_eager(self) -> None:
        """Before ``torch.compile``: dynamo leaves ``views`` eager (batched per-sample AugMix,
        whose groups are data-dependent). Set here, not as a decorator: the decorator imports
        torch._dynamo, ~2.5 s in every process that imports this module, compiled or not."""
        self.views = torch.compiler.disable(self.views)

    def views(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        severity_grad: bool | None = None,
    ) -> torch.Tensor:
        """The batch the network sees: [B] clean or one view, or [3B] for the JSD modes (in
        ``amp_dtype`` and channels_last as configured, except the hypergradient's float32 views).

        ``severity_grad``: whether the views carry a gradient to a learnable severity. Default:
        yes, unless the severity follows the held-out objective, which the training loss must not
        move; its views are then drawn without autograd (the cheap in-place path), except when
        the hypergradient step asks for them with ``severity_grad=True``. The random draws are
        the same either way.
        """
        if self.augmenter is None:
            return normalize_images(images, *self.normalization)
        if severity_grad is None:
            severity_grad = not self.severity_follows_heldout
        # The batch as the network takes it (amp dtype, channels_last): the fused form writes it
        # directly, the others concatenate and cast. The hypergradient's views stay float32: its
        # input-gradient difference is taken in the views' dtype.
        hyper = severity_grad and self.severity_follows_heldout
        with torch.set_grad_enabled(torch.is_grad_enabled() and severity_grad):
            return self.augmenter.network_input(
                images,
                generator=generator,
                clean=self.aug_type != "augmix",
                dtype=None if hyper else self.amp_dtype,
                channels_last=self.channels_last,
            )

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
        return self.severity is not None and not self.severity.objective.from_training_loss


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
    """What every step reads: the network and its DDP wrapper, the optimiser, the settings."""

    ddp_net: nn.Module
    net: AugmentedClassifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: Settings
    env: DistEnv
    generator: torch.Generator
    steps_per_epoch: int  # the steps each epoch takes (--max_steps_per_epoch): the schedule's epoch
    stop: StopFlag
    severity_updater: HeldoutSeverityUpdater | None = None  # the held-out objective's trainer
    save_due: Callable[[int], bool] = lambda _step: False  # a checkpoint follows this step

    @property
    def inject_nonfinite_steps(self) -> list[int]:
        """Tests (--debug_nonfinite_steps): force a NaN loss at these global steps."""
        return self.settings.run.debug_nonfinite_steps


def _set_lr(ctx: StepContext, step: int) -> float:
    s = ctx.settings
    factor = schedule_factor(s.optim, step, ctx.steps_per_epoch, s.run.epochs)
    for g in ctx.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return ctx.optimizer.param_groups[0]["lr"]


def train_step(
    ctx: StepContext, state: TrainState, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One optimisation step; what to log, as 0-d device tensors (``skipped``: the update was
    skipped because the loss or a gradient was non-finite).

    Nothing here waits for the device: a non-finite step is skipped by the fused optimiser on
    the device (``found_inf``, as GradScaler does), the values are read to the host by
    :class:`DeviceLog` every ``--log_every`` steps, and the stop flag travels host to host.
    """
    s, net = ctx.settings, ctx.net
    _set_lr(ctx, state.global_step)
    severity = net.severity
    updater = ctx.severity_updater
    hyper_step = updater is not None and updater.due(state.global_step)
    if hyper_step:  # views attached to the severity sample (the pathwise estimator needs them;
        # the paired one renders the images again); the network gets a detached copy
        views = net.views(images, generator=ctx.generator, severity_grad=updater.pathwise)
        logits = ctx.ddp_net(images, views=views.detach())
    else:
        logits = ctx.ddp_net(images, generator=ctx.generator)
    # An objective that does not train the severity with this loss (held-out: an outer loop,
    # without a prior, heldout_severity.py) has its KL only logged here.
    by_loss = severity is not None and severity.objective.from_training_loss
    kl = None if severity is None else severity.kl() if by_loss else severity.kl().detach()
    parts = augmix_objective(
        logits.float(),
        labels,
        jsd=net.aug_type in JSD_MODES,
        beta_jsd=s.augment.beta_jsd,
        kl=kl,
        beta_augmenter_reg=s.severity.beta_augmenter_reg if by_loss else 0.0,
        kl_scale=1.0 / s.run.batch,
    )
    loss = parts.total
    if state.global_step in ctx.inject_nonfinite_steps:
        loss = loss * float("nan")
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()  # a NaN loss gives NaN gradients: skipped below
    if s.optim.grad_clip_val > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(net.model.parameters(), s.optim.grad_clip_val)
    if ctx.scaler.is_enabled():  # fp16: the scaler skips non-finite gradients (and rescales);
        skip = ~torch.isfinite(loss)  # a non-finite loss is what counts towards --max_nonfinite
        ctx.scaler.step(ctx.optimizer)
    else:  # DDP averaged the gradients, so every rank sees the same norm and skips alike
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        skip = ~(torch.isfinite(loss) & torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        ctx.optimizer.found_inf = skip.float()  # the fused step skips on the device
        ctx.optimizer.step()
    ctx.scaler.update()
    out = {"loss": loss.detach(), "ce": parts.ce.detach(), "jsd": parts.jsd.detach(),
           "kl": parts.kl.detach(), "skipped": skip}  # fmt: skip
    if hyper_step:
        out.update(updater.update(ctx.optimizer, views, labels, state.global_step, skip, images))
    if severity is not None:
        out.update(severity.stats_tensors())
    # A stop (SIGTERM on any rank) is agreed host to host, so every rank stops at the same step.
    ctx.stop.requested = any_rank(ctx.stop.requested, ctx.env)
    return out


class DeviceLog:
    """Per-step values kept as device tensors, read to the host together every few steps.

    Why: reading a CUDA tensor (``.item()``, ``float()``, ``bool()``) waits until the GPU has
    finished everything queued; a few reads per step leave the GPU idle at each. One stack and one
    copy per ``--log_every`` steps costs one wait there, and the values are still exact per step.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def add(self, step: int, values: dict[str, torch.Tensor]) -> None:
        self._pending.append((step, values))

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """``[(global step, {name: value})]`` of every step added since the last flush."""
        if not self._pending:
            return []
        flat = torch.stack(
            [v.detach().float().reshape(()) for _, vals in self._pending for v in vals.values()]
        ).tolist()  # the one host read
        out, i = [], 0
        for step, vals in self._pending:
            out.append((step, dict(zip(vals, flat[i : i + len(vals)]))))
            i += len(vals)
        self._pending = []
        return out


class EpochLog:
    """The epoch's running sums, read from a :class:`DeviceLog`: the mean losses, the severity
    trajectory and the non-finite steps (``--max_nonfinite`` in a row stop the run)."""

    def __init__(self, state: TrainState, max_nonfinite: int, progress: Any = None) -> None:
        self.state, self.max_nonfinite, self.progress = state, max_nonfinite, progress
        self.sums = {"loss": 0.0, "ce": 0.0, "jsd": 0.0, "kl": 0.0}
        self.done, self.images, self.start = 0, 0, time.perf_counter()
        self.pending = DeviceLog()

    def read(self) -> None:
        """Read the pending steps to the host (one wait) and account for each."""
        last = None
        for step, rec in self.pending.flush():
            if rec.pop("skipped") > 0:
                self._nonfinite(step)
                continue
            self.state.nonfinite_in_row = 0
            self.done += 1
            for k in self.sums:
                self.sums[k] += rec[k]
            if "severity_mean" in rec:
                kept = {k: v for k, v in rec.items() if k.startswith(TRAJECTORY_KEYS)}
                self.state.severity_trajectory.append({"step": step, **kept})
            last = rec
        if self.progress is not None and last is not None:
            postfix = {"loss": f"{last['loss']:.3f}", "img/s": f"{self.rate():.0f}"}
            if "severity_last" in last:
                postfix["s"] = f"{last['severity_last']:.2f}"
            self.progress.set_postfix(postfix, refresh=False)

    def _nonfinite(self, step: int) -> None:
        self.state.skipped_nonfinite += 1
        self.state.nonfinite_in_row += 1
        if self.state.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.state.nonfinite_in_row} non-finite losses in a row, the last at global "
                f"step {step - 1}: lower --lr, use --precision bf16/32 or --grad_clip_val, and "
                "check the data"
            )

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def metrics(self, env: DistEnv) -> dict[str, float]:
        """Mean over ranks of the per-rank means (equal step counts on every rank)."""
        totals = torch.tensor(
            [*self.sums.values(), float(self.done)], dtype=torch.float64, device=env.device
        )
        all_reduce_sum(totals, env)
        n = max(totals[-1].item(), 1.0)
        out = {k: totals[i].item() / n for i, k in enumerate(self.sums)}
        out["images_per_s"] = self.rate()
        out["skipped_nonfinite"] = self.state.skipped_nonfinite
        return out


def train_one_epoch(
    ctx: StepContext,
    state: TrainState,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    on_step: Callable[[TrainState], None] | None = None,
    progress: Any = None,
) -> dict[str, float]:
    """Run the epoch's remaining steps; stops early (state kept) when a stop was requested.

    The host reads the steps' values every ``--log_every`` steps, before a checkpoint
    (``ctx.save_due``), at a stop and at the end of the epoch; ``state`` is exact at each.
    """
    ctx.net.train()
    run = ctx.settings.run
    log = EpochLog(state, run.max_nonfinite, progress)
    for images, labels, _valid in batches:
        if state.step_in_epoch >= ctx.steps_per_epoch:
            break
        out = train_step(ctx, state, images, labels)
        state.step_in_epoch += 1
        state.global_step += 1
        log.images += images.shape[0] * ctx.env.world_size
        log.pending.add(state.global_step, out)
        if progress is not None:
            progress.update(1)
        step = state.global_step
        if step % run.log_every == 0 or ctx.stop.requested or ctx.save_due(step):
            log.read()
        if on_step is not None:
            on_step(state)
        if ctx.stop.requested:
            break
    log.read()
    return log.metrics(ctx.env)


__all__ = [
    "JSD_MODES",
    "AugmentedClassifier",
    "NonFiniteLossError",
    "StepContext",
    "StopFlag",
    "TrainState",
    "DeviceLog",
    "EpochLog",
    "train_one_epoch",
    "train_step",
]
