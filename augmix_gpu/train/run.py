"""The training run, top to bottom: data, model, augmenter, optimizer, resume, epochs, evaluation.

``fit(config, env)`` is what ``train.py`` calls after resolving the configuration and joining
the process group. Rank 0 logs and writes files; every rank computes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..augment.augmix import AugMixBatch
from ..augment.severity import LearnableSeverity
from ..distributed import DistEnv, barrier
from ..models import build_model
from ..runtime import amp_dtype
from .data import DataSpec, build_loaders, prepare_data, prepare_heldout
from .heldout_severity import HeldoutSeverityUpdater
from .resume import (
    LAST,
    RunCheckpoints,
    _gather,
    make_checkpoint,
    resume_from,
)
from .schedule import build_optimizer
from .step import AugmentedClassifier, StepContext, StopFlag, TrainState, train_one_epoch


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        tqdm.write(message)


def run_dir(config: dict[str, Any]) -> Path:
    return Path(config["ckpt_dir_base"]) / config["aug_type"]


def build_augmenter(config: dict[str, Any]) -> AugMixBatch | None:
    """None for ``none``; a fixed or learnable severity AugMix otherwise."""
    if config["aug_type"] == "none":
        return None
    severity: float | LearnableSeverity = config["initial_aug_severity"]
    if config["aug_type"] == "learnable_augmix_jsd":
        severity = LearnableSeverity(
            initial_aug_severity=config["initial_aug_severity"],
            prior_severity_std=config["prior_severity_std_learnable_aug"],
            prior_severity_mean_offset=config["prior_severity_mean_offset_learnable_aug"],
            per_sample=config["per_sample_severity"],
            max_severity=config["max_severity"],
            initial_sigma=config["initial_severity_sigma"],
            objective=config["severity_objective"],
        )
    return AugMixBatch(
        width=config["augmix_mixture_width"],
        depth=config["augmix_mixture_depth"],
        alpha=1.0,
        all_ops=config["all_ops"],
        severity=severity,
        num_views=1 if config["aug_type"] == "augmix" else 2,
        strategy=config["augmix_strategy"],
    )


def init_wandb(config: dict[str, Any], out: Path, env: DistEnv):
    if config["wandb"] == "disabled" or not env.is_main:
        return None
    try:
        import wandb
    except ImportError:
        log(env, "note: W&B logging skipped (pip install 'augmix-gpu[wandb]' to enable it)")
        return None
    return wandb.init(project="augmix-gpu", config=config, dir=str(out), mode=config["wandb"])


def evaluate_clean(net: AugmentedClassifier, loader, env: DistEnv, config: dict[str, Any]):
    from ..eval.run import evaluate_loader

    net.model.eval()
    result = evaluate_loader(
        net.model,
        loader,
        env,
        amp_dtype=amp_dtype(config["precision"]),
        desc="val",
        progress=env.is_main and not config["no_progress"],
        channels_last=config["channels_last"],
    )
    net.model.train()
    return result


def replica_checksum(net: AugmentedClassifier) -> float:
    """A float64 sum over every trainable parameter (network and severity): equal on all ranks iff
    the replicas agree. BatchNorm running statistics are rank-local between DDP's buffer broadcasts
    (rank 0's are the ones saved), so they are left out."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in net.parameters()))


def fit(config: dict[str, Any], env: DistEnv) -> int:
    out = run_dir(config)
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    spec = prepare_data(config, env)
    heldout = prepare_heldout(config, env, spec)
    train_loader, val_loader, heldout_loader = build_loaders(config, env, spec, heldout)
    classes = train_loader.classes
    if spec.perturbed is not None:  # a bad -P tree fails now, not after the training
        from ..eval.layouts import check_p_layout, present_perturbations

        check_p_layout(spec.perturbed, present_perturbations(spec.perturbed), [1], classes)
    log(
        env,
        f"data: {spec.description}; {len(classes)} classes; {len(train_loader)} steps/epoch/rank; "
        f"world size {env.world_size} on {env.device}",
    )
    if heldout is not None:
        log(
            env,
            f"held-out objective: {len(heldout.source_files)} training images held out "
            f"(seed {config['heldout_seed']}), corrupted by {', '.join(heldout.corruptions)} "
            f"in {heldout.root}; severity update every {config['severity_update_every']} steps",
        )

    model = build_model(config["arch"], len(classes), config["pretrained"])
    net = AugmentedClassifier(
        model,
        config["aug_type"],
        build_augmenter(config),
        amp_dtype=amp_dtype(config["precision"]),
        channels_last=config["channels_last"],
    )
    net = net.to(env.device)
    if config["channels_last"]:
        net.model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, config, config["batch"])
    scaler = torch.amp.GradScaler(env.device.type, enabled=config["precision"] == "16")
    generator = torch.Generator(env.device).manual_seed(config["seed"] * 1_000_003 + env.rank)
    updater = None
    if heldout_loader is not None:
        updater = HeldoutSeverityUpdater(
            net,
            heldout_loader,
            env,
            every=config["severity_update_every"],
            lr=config["severity_hyper_lr"],
            beta_jsd=config["beta_jsd"],
        )

    state, history = TrainState(), []
    ckpts = RunCheckpoints(
        out,
        env,
        every_steps=config["save_every_steps"],
        every_minutes=config["save_every_minutes"],
        debug_fault=config["debug_fault"],
        log=lambda message: log(env, message),
    )
    resume = ckpts.find_resume(config["resume"])  # by itself after a torchrun restart
    if resume.state is not None:
        state, history = resume_from(
            resume.path, resume.state, net, optimizer, scaler, generator, config, env, updater
        )
    ckpts.settle(
        resume, f"epoch {state.epoch}, step {state.step_in_epoch} (global {state.global_step})"
    )
    del resume  # the loaded state: not kept alive for the whole run

    if env.distributed and updater is not None:
        # The held-out objective all-reduces the severity's gradient itself (hypergradient.py);
        # DDP would wait for a gradient the training loss never produces.
        DDP._set_params_and_buffers_to_ignore_for_model(
            net, [f"augmenter.severity.{n}" for n, _ in net.severity.named_parameters()]
        )
    ddp_net = (
        DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.distributed
        else net
    )
    if config["compile"]:
        # As torch documents for DDP: compile the DDP-wrapped module, so that dynamo's DDP
        # optimiser splits the graph at the gradient buckets and the all-reduce still overlaps
        # backward. AugMix stays eager (torch.compiler.disable on AugmentedClassifier.views);
        # evaluation runs the uncompiled network, so it never triggers a recompile.
        ddp_net = torch.compile(ddp_net)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: choose kernels once
    stop = StopFlag()
    stop.install()
    # The steps each epoch actually takes: the schedule's epochs are these (--max_steps_per_epoch).
    steps = min(len(train_loader), config["max_steps_per_epoch"] or len(train_loader))
    ctx = StepContext(
        ddp_net,
        net,
        optimizer,
        scaler,
        config,
        env,
        generator,
        steps,
        stop,
        frozenset(config["debug_nonfinite_steps"]),
        updater,
        save_due=ckpts.due,
    )
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    wandb_run = init_wandb(config, out, env)

    def save(name: str) -> None:
        ckpt = make_checkpoint(
            net, optimizer, scaler, state, generator, config, classes, history, env, updater
        )
        ckpts.save(ckpt, name, state.global_step)

    wandb_logged = [len(state.severity_trajectory)]  # trajectory entries already sent to W&B

    def log_trajectory(s: TrainState) -> None:
        """Send W&B the per-step values read since the last call (every --log_every steps and at
        the epoch's end: DeviceLog), each at its own step."""
        if wandb_run is not None:
            for record in s.severity_trajectory[wandb_logged[0] :]:
                wandb_run.log(record, step=record["step"])
            wandb_logged[0] = len(s.severity_trajectory)

    def on_step(s: TrainState) -> None:
        if s.global_step == config["debug_stop_at_step"]:
            stop.requested, stop.signal_name = True, "debug stop"
        ckpts.inject(s.global_step)  # test hook: --debug_fault sigkill@STEP
        # The epoch's last step is saved after validation, below.
        if ckpts.due(s.global_step) and s.step_in_epoch < steps:
            save(LAST)
        log_trajectory(s)

    best_top1 = max((h["val_top1"] for h in history), default=-1.0)
    while state.epoch < config["epochs"]:
        bar = tqdm(
            total=steps,
            initial=state.step_in_epoch,
            desc=f"epoch {state.epoch + 1}/{config['epochs']}",
            disable=not env.is_main or config["no_progress"],
            dynamic_ncols=True,
        )
        metrics = train_one_epoch(
            ctx,
            state,
            train_loader.epoch(state.epoch, start_step=state.step_in_epoch),
            on_step=on_step,
            progress=bar,
        )
        bar.close()
        log_trajectory(state)  # the steps read at the epoch's end
        if stop.requested:
            save(LAST)
            log(
                env,
                f"{stop.signal_name or 'stop'} received: saved {out / LAST} at epoch "
                f"{state.epoch}, step {state.step_in_epoch}; continue with --resume auto",
            )
            return 0
        val = evaluate_clean(net, val_loader, env, config)
        record = {
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            **metrics,
            "lr": optimizer.param_groups[0]["lr"],
            "val_top1": val.top1,
            "val_top5": val.top5,
            "val_nll": val.nll,
        }
        if net.severity is not None:
            record.update(net.severity.stats())
        history.append(record)
        state.epoch += 1
        state.step_in_epoch = 0
        log(
            env,
            "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            ),
        )
        if wandb_run is not None:
            wandb_run.log(record, step=state.global_step)
        save(LAST)
        if val.top1 > best_top1:
            best_top1 = val.top1
            save("best.ckpt")
    barrier(env)

    results: dict[str, Any] = {
        "config": config,
        "history": history,
        "severity_trajectory": state.severity_trajectory,
        "skipped_nonfinite": state.skipped_nonfinite,
        "world_size": env.world_size,
        "best": max(history, key=lambda h: h["val_top1"]) if history else None,
        "final": history[-1] if history else None,
        "classes": classes,
        "replica_checksums": _gather(replica_checksum(net), env),
        # Files skipped as corrupt (--on_corrupt skip), on any rank: each named once.
        "skipped_files": sorted(
            {p for r in _gather(train_loader.skipped + val_loader.skipped, env) for p in r}
        ),
        "heldout": None
        if heldout is None
        else {
            "root": str(heldout.root),
            "images": len(heldout.source_files),
            "seed": config["heldout_seed"],
            "corruptions": list(heldout.corruptions),
            "skipped_nonfinite_updates": updater.skipped_nonfinite,
        },
    }
    wants_c = (spec.corrupted is not None or spec.cifar_c is not None) and not config["no_c_eval"]
    if wants_c or spec.perturbed is not None:
        results["robustness"] = evaluate_corruptions(net, spec, classes, config, env, out)
    if env.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        log(env, f"results: {out / 'results.json'}")
    if wandb_run is not None:
        wandb_run.summary.update(
            {"best_val_top1": best_top1, "skipped_files": len(results["skipped_files"])}
        )
        wandb_run.finish()
    return 0


def evaluate_corruptions(net, spec: DataSpec, classes, config, env, out: Path) -> dict[str, Any]:
    """Clean vs corrupted (ImageNet-C, or CIFAR-10-C/100-C after a CIFAR run) and perturbed (-P)
    evaluation of the final model, reports and heatmap written under ``out/eval``. For CIFAR the
    headline is the unnormalised mean corruption error (what the official cifar.py and the
    PyTorch port report)."""
    from ..eval.layouts import present_perturbations
    from ..eval.run import describe_model, evaluate_robustness, markdown_table, write_reports

    if spec.cifar_c is not None:
        data = dict(
            cifar_c=spec.cifar_c,
            cifar_dir=config["data"],
            cifar_name=config["dataset"],
            crop_size=32,
            resize_size=32,
        )
    else:
        data = dict(
            val_dir=spec.val,
            imagenet_c_dir=None if config["no_c_eval"] else spec.corrupted,
            imagenet_p_dir=spec.perturbed,
            perturbations=present_perturbations(spec.perturbed) if spec.perturbed else None,
            crop_size=config["crop_size"],
            resize_size=config["val_resize"],
        )
    net.model.eval()
    start = time.perf_counter()
    results = evaluate_robustness(
        net.model,
        env,
        classes=classes,
        **data,
        severities=config["c_severities"],
        batch_size=config["batch"] // env.world_size,
        num_threads=config["workers"],
        progress=env.is_main and not config["no_progress"],
        amp_dtype=amp_dtype(config["precision"]),
        channels_last=config["channels_last"],
        extra_info={"model": describe_model(config, None, name=config["arch"]), "args": config},
    )
    if env.is_main:
        write_reports(results, out / "eval")
        log(env, markdown_table(results))
        if spec.cifar_c is not None:
            block = results["cifar_c"]
            error = block.get("mean_corruption_error", block.get("mean_corruption_error_partial"))
            log(env, f"{block['dataset']} mean corruption error: {error:.2f} %")
        took = time.perf_counter() - start
        log(env, f"robustness evaluation took {took:.0f} s; reports in {out / 'eval'}")
    return results
