"""The training run, top to bottom: data, model, resume, epochs of steps, evaluation.

``fit(settings, env)`` is what ``train.py`` calls after resolving the settings and joining the
process group. Rank 0 logs and writes files; every rank computes. :func:`build_run` makes the
run's parts once (:class:`Run`); :func:`fit` is the loop over epochs; each epoch's steps are
``step.train_one_epoch``, the end-of-run robustness evaluation is the eval wing's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..augment.augmix import AugMixBatch
from ..augment.severity import LearnableSeverity
from ..distributed import DistEnv, all_gather_objects, barrier
from ..eval.loop import evaluate_loader
from ..eval.settings import NORMALIZATIONS
from ..models import build_model
from ..runtime import amp_dtype
from .config import AugmentSettings, Settings, SeveritySettings
from .data import DataSpec, build_loaders, prepare_data, prepare_heldout
from .final_eval import check_robustness_layouts, evaluate_after_training
from .heldout_severity import HeldoutSeverityUpdater, hypergradient_snr
from .memory import check_memory
from .resume import BEST, LAST, RunCheckpoints, make_checkpoint, resume_from
from .schedule import build_optimizer
from .step import AugmentedClassifier, StepContext, StopFlag, TrainState, train_one_epoch


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        tqdm.write(message)


def build_augmenter(
    augment: AugmentSettings, severity: SeveritySettings, normalization: str = "imagenet"
) -> AugMixBatch | None:
    """None for ``none``; a fixed or learnable severity AugMix otherwise, its views normalised
    with ``NORMALIZATIONS[normalization]``."""
    if augment.aug_type == "none":
        return None
    s: float | LearnableSeverity = augment.initial_aug_severity
    if augment.learnable:
        s = LearnableSeverity(
            initial_aug_severity=augment.initial_aug_severity,
            prior_severity_std=severity.prior_severity_std_learnable_aug,
            prior_severity_mean_offset=severity.prior_severity_mean_offset_learnable_aug,
            per_sample=severity.per_sample_severity,
            max_severity=severity.max_severity,
            initial_sigma=severity.initial_severity_sigma,
            objective=severity.severity_objective,
        )
    return AugMixBatch(
        width=augment.augmix_mixture_width,
        depth=augment.augmix_mixture_depth,
        alpha=1.0,
        all_ops=augment.all_ops,
        ops=augment.aug_ops or None,
        severity=s,
        num_views=1 if augment.aug_type == "augmix" else 2,
        strategy=augment.augmix_strategy,
        levels=augment.op_levels,
        mean=NORMALIZATIONS[normalization][0],
        std=NORMALIZATIONS[normalization][1],
    )


@dataclass
class Run:
    """One training run's parts, made once by :func:`build_run`; ``state`` and ``history`` are
    what changes (and what a checkpoint keeps, with the weights and RNG states)."""

    settings: Settings
    env: DistEnv
    data: DataSpec
    classes: list[str]
    loaders: tuple[Any, Any]  # train, val
    net: AugmentedClassifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    updater: HeldoutSeverityUpdater | None
    heldout: Any
    ckpts: RunCheckpoints
    stop: StopFlag = field(default_factory=StopFlag)
    state: TrainState = field(default_factory=TrainState)
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb: Any = None
    wandb_logged: int = 0  # trajectory entries already sent to W&B

    @property
    def steps_per_epoch(self) -> int:
        """The steps each epoch takes: the schedule's epochs are these (--max_steps_per_epoch)."""
        return epoch_steps(self.loaders[0], self.settings)

    def save(self, name: str) -> None:
        self.ckpts.save(make_checkpoint(self), name, self.state.global_step)


def epoch_steps(train_loader: Any, settings: Settings) -> int:
    """The steps an epoch of ``train_loader`` takes under ``--max_steps_per_epoch``."""
    n = len(train_loader)
    return min(n, settings.run.max_steps_per_epoch or n)


def build_run(settings: Settings, env: DistEnv) -> Run:
    """Data, network, optimiser and checkpoints of a run, in that order (nothing trained yet)."""
    torch.manual_seed(settings.run.seed)  # identical initial weights on every rank
    data = prepare_data(settings, env)
    heldout = prepare_heldout(settings, env, data)
    train_loader, val_loader, heldout_loader = build_loaders(settings, env, data, heldout)
    classes = train_loader.classes
    check_robustness_layouts(settings, data, classes)  # a bad tree fails now, not after training
    net = AugmentedClassifier(
        build_model(settings.model.arch, len(classes), settings.model.pretrained),
        settings.augment.aug_type,
        build_augmenter(settings.augment, settings.severity, settings.data.normalization),
        amp_dtype=amp_dtype(settings.model.precision),
        channels_last=settings.model.channels_last,
        normalization=NORMALIZATIONS[settings.data.normalization],
    ).to(env.device)
    if settings.model.channels_last:
        net.model.to(memory_format=torch.channels_last)
    sev = settings.severity
    updater = None
    if heldout_loader is not None:
        hold = sev.severity_hold_epochs * epoch_steps(train_loader, settings)
        updater = HeldoutSeverityUpdater(net, heldout_loader, env, every=sev.severity_update_every,
                                         lr=sev.severity_hyper_lr, beta_jsd=settings.augment.beta_jsd,
                                         lookaheads=sev.severity_lookaheads,
                                         fixed_length=sev.severity_step_length == "fixed",
                                         estimator=sev.severity_estimator,
                                         log_step=sev.severity_log_step,
                                         horizon=sev.severity_horizon,
                                         rule=sev.severity_update_rule,
                                         hold_steps=hold, grad_clip=settings.optim.grad_clip_val)  # fmt: skip
    run = settings.run
    return Run(
        settings=settings,
        env=env,
        data=data,
        classes=classes,
        loaders=(train_loader, val_loader),
        net=net,
        optimizer=build_optimizer(net, settings.optim, run.batch, sev.severity_lr_mult),
        scaler=torch.amp.GradScaler(env.device.type, enabled=settings.model.precision == "16"),
        generator=torch.Generator(env.device).manual_seed(run.seed * 1_000_003 + env.rank),
        updater=updater,
        heldout=heldout,
        ckpts=RunCheckpoints(
            settings.run_dir,
            env,
            every_steps=run.save_every_steps,
            every_minutes=run.save_every_minutes,
            debug_fault=run.debug_fault,
            log=lambda message: log(env, message),
        ),  # fmt: skip
    )


def describe(run: Run) -> None:
    s, env, train_loader = run.settings, run.env, run.loaders[0]
    log(env, f"data: {run.data.description}; {len(run.classes)} classes; {len(train_loader)} "
             f"steps/epoch/rank; world size {env.world_size} on {env.device}")  # fmt: skip
    if run.heldout is not None:
        sev = s.severity
        held = (f"{len(run.heldout.source_files)} training images held out (seed "
                f"{sev.heldout_seed}), corrupted by {', '.join(run.heldout.corruptions)} in "
                f"{run.heldout.root}")  # fmt: skip
        if run.updater is None:  # --exclude_heldout alone
            log(env, f"held-out split excluded from training (--exclude_heldout): {held}")
        else:
            log(env, f"held-out objective: {held}; severity update every "
                     f"{sev.severity_update_every} steps")  # fmt: skip


def restore(run: Run) -> None:
    """Continue from a checkpoint: ``--resume``, or by itself after a torchrun restart."""
    resume = run.ckpts.find_resume(run.settings.run.resume)
    if resume.state is not None:
        resume_from(resume.path, resume.state, run)
    state = run.state
    run.ckpts.settle(
        resume, f"epoch {state.epoch}, step {state.step_in_epoch} (global {state.global_step})"
    )


def wrap(run: Run) -> StepContext:
    """DDP (and ``--compile``) around the network; what every step reads."""
    net, env, settings = run.net, run.env, run.settings
    if env.distributed and run.updater is not None:
        # The held-out objective all-reduces the severity's gradient itself
        # (heldout_severity.py); DDP would wait for a gradient the training loss never produces.
        DDP._set_params_and_buffers_to_ignore_for_model(
            net, [f"augmenter.severity.{n}" for n, _ in net.severity.named_parameters()]
        )
    ddp_net = net
    if env.distributed:
        ddp_net = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if settings.model.compile:
        # As torch documents for DDP: compile the DDP-wrapped module, so that dynamo's DDP
        # optimiser splits the graph at the gradient buckets and the all-reduce still overlaps
        # backward. AugMix stays eager (AugmentedClassifier.keep_augmix_eager); evaluation runs
        # the uncompiled network, so it never triggers a recompile.
        net.keep_augmix_eager()
        ddp_net = torch.compile(ddp_net)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: choose kernels once
    return StepContext(ddp_net, net, run.optimizer, run.scaler, settings, env, run.generator,
                       run.steps_per_epoch, run.stop, run.updater, save_due=run.ckpts.due)  # fmt: skip


def start_outputs(run: Run) -> None:
    """The run folder's resolved settings (rank 0), and W&B if asked for."""
    out, env = run.settings.run_dir, run.env
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run.settings.to_dict(), indent=2, default=str))
    run.wandb = init_wandb(run.settings, env)
    run.wandb_logged = len(run.state.severity_trajectory)


def init_wandb(settings: Settings, env: DistEnv):
    if settings.run.wandb == "disabled" or not env.is_main:
        return None
    try:
        import wandb
    except ImportError:
        log(env, "note: W&B logging skipped (pip install 'augmix-gpu[wandb]' to enable it)")
        return None
    return wandb.init(project="augmix-gpu", config=settings.to_dict(), dir=str(settings.run_dir),
                      mode=settings.run.wandb)  # fmt: skip


def log_trajectory(run: Run) -> None:
    """Send W&B the per-step values read since the last call (every --log_every steps and at the
    epoch's end: DeviceLog), each at its own step."""
    if run.wandb is not None:
        for record in run.state.severity_trajectory[run.wandb_logged :]:
            run.wandb.log(record, step=record["step"])
    run.wandb_logged = len(run.state.severity_trajectory)


def fit(settings: Settings, env: DistEnv) -> int:
    """Train, validating and saving at every epoch's end; then the results and robustness."""
    run = build_run(settings, env)
    describe(run)
    fits = check_memory(settings, run.net, len(run.classes), env)  # CUDA: stop what won't fit
    if fits:
        log(env, fits)
    restore(run)
    ctx = wrap(run)
    run.stop.install()
    start_outputs(run)
    best_top1 = max((h["val_top1"] for h in run.history), default=-1.0)
    while run.state.epoch < settings.run.epochs:
        metrics = train_epoch(run, ctx)
        if run.stop.requested:
            run.save(LAST)
            log(env, f"{run.stop.signal_name or 'stop'} received: saved {settings.run_dir / LAST} "
                     f"at epoch {run.state.epoch}, step {run.state.step_in_epoch}; continue with "
                     "--resume auto")  # fmt: skip
            return 0
        record = end_epoch(run, metrics)
        run.save(LAST)
        if record["val_top1"] > best_top1:
            best_top1 = record["val_top1"]
            run.save(BEST)
    barrier(env)
    finish(run, best_top1)
    return 0


def train_epoch(run: Run, ctx: StepContext) -> dict[str, float]:
    """The epoch's remaining steps, with a progress bar and the per-step hooks."""
    s, state = run.settings, run.state

    def on_step(st: TrainState) -> None:
        if st.global_step == s.run.debug_stop_at_step:
            run.stop.requested, run.stop.signal_name = True, "debug stop"
        run.ckpts.inject(st.global_step)  # test hook: --debug_fault sigkill@STEP
        # The epoch's last step is saved after validation (fit).
        if run.ckpts.due(st.global_step) and st.step_in_epoch < run.steps_per_epoch:
            run.save(LAST)
        log_trajectory(run)

    bar = tqdm(total=run.steps_per_epoch, initial=state.step_in_epoch,
               desc=f"epoch {state.epoch + 1}/{s.run.epochs}", dynamic_ncols=True,
               disable=not run.env.is_main or s.run.no_progress)  # fmt: skip
    batches = run.loaders[0].epoch(state.epoch, start_step=state.step_in_epoch)
    metrics = train_one_epoch(ctx, state, batches, on_step=on_step, progress=bar)
    bar.close()
    log_trajectory(run)  # the steps read at the epoch's end
    return metrics


def end_epoch(run: Run, metrics: dict[str, float]) -> dict[str, Any]:
    """Validate, record the epoch in the history, log it; the state moves to the next epoch."""
    val = evaluate_clean(run)
    state = run.state
    record = {"epoch": state.epoch + 1, "global_step": state.global_step, **metrics,
              "lr": run.optimizer.param_groups[0]["lr"], "val_top1": val.top1,
              "val_top5": val.top5, "val_nll": val.nll}  # fmt: skip
    if run.net.severity is not None:
        record.update(run.net.severity.stats())
    if run.updater is not None:  # the epoch's hypergradient signal-to-noise
        after = run.history[-1]["global_step"] if run.history else 0
        record.update(hypergradient_snr(state.severity_trajectory, after_step=after))
    run.history.append(record)
    state.epoch += 1
    state.step_in_epoch = 0
    log(run.env, "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()))  # fmt: skip
    if run.wandb is not None:
        run.wandb.log(record, step=state.global_step)
    return record


def evaluate_clean(run: Run):
    s, net = run.settings, run.net
    net.model.eval()
    result = evaluate_loader(net.model, run.loaders[1], run.env, desc="val",
                             amp_dtype=amp_dtype(s.model.precision),
                             progress=run.env.is_main and not s.run.no_progress,
                             channels_last=s.model.channels_last,
                             normalization=s.data.normalization)  # fmt: skip
    net.model.train()
    return result


def replica_checksum(net: AugmentedClassifier) -> float:
    """A float64 sum over every trainable parameter (network and severity): equal on all ranks iff
    the replicas agree. BatchNorm running statistics are rank-local between DDP's buffer broadcasts
    (rank 0's are the ones saved), so they are left out."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in net.parameters()))


def finish(run: Run, best_top1: float) -> None:
    """results.json (history, severity trajectory, skipped files, robustness) and W&B's summary."""
    s, env, out = run.settings, run.env, run.settings.run_dir
    history = run.history
    train_loader, val_loader = run.loaders
    skipped = all_gather_objects(train_loader.skipped + val_loader.skipped, env)
    results: dict[str, Any] = {
        "config": s.to_dict(),
        "history": history,
        "severity_trajectory": run.state.severity_trajectory,
        "skipped_nonfinite": run.state.skipped_nonfinite,
        "world_size": env.world_size,
        "best": max(history, key=lambda h: h["val_top1"]) if history else None,
        "final": history[-1] if history else None,
        "classes": run.classes,
        "replica_checksums": all_gather_objects(replica_checksum(run.net), env),
        # Files skipped as corrupt (--on_corrupt skip), on any rank: each named once.
        "skipped_files": sorted({p for rank in skipped for p in rank}),
        "heldout": heldout_summary(run),
    }
    if run.data.roots:
        results["robustness"] = evaluate_after_training(
            run.net.model, run.data, run.classes, s, env
        )
    if env.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        log(env, f"results: {out / 'results.json'}")
    if run.wandb is not None:
        run.wandb.summary.update(
            {"best_val_top1": best_top1, "skipped_files": len(results["skipped_files"])}
        )
        run.wandb.finish()


def heldout_summary(run: Run) -> dict[str, Any] | None:
    if run.heldout is None:
        return None
    return {
        "root": str(run.heldout.root),
        "images": len(run.heldout.source_files),
        "seed": run.settings.severity.heldout_seed,
        "corruptions": list(run.heldout.corruptions),
        "skipped_nonfinite_updates": run.updater.skipped_nonfinite if run.updater else None,
        "read_by": "the severity's objective" if run.updater else "nothing (--exclude_heldout)",
    }
