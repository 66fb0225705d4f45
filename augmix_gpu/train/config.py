"""Training configuration: the reference script's CLI, preset files, and how they compose.

Precedence, lowest to highest: built-in defaults < ``--config FILE`` (TOML) < flags given on the
command line. The resolved configuration is a plain dict, saved beside every run and inside every
checkpoint, so a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from ..augment.augmix import STRATEGIES
from ..augment.severity import OBJECTIVES
from ..data.heldout import check_heldout_corruptions
from ..models import check_arch
from ..protocols import EXTRA_CORRUPTIONS
from .resume import parse_debug_fault

AUG_TYPES = ("none", "augmix", "augmix_jsd", "learnable_augmix_jsd")
DATASETS = ("imagenet", "cifar10", "cifar100", "synthetic")
CIFAR_LOADERS = ("resident", "dali")
PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "16": "16",
    "16-mixed": "16",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
}
# The held-out objective's cadence and step size (chosen by measurement: README, severity study).
HELDOUT_DEFAULTS = {"severity_update_every": 10, "severity_hyper_lr": 0.05}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = "demo.toml"

# Per-dataset defaults for the values left at None: the embedded synthetic task must train on two
# CPU cores in minutes, ImageNet is the real target (ResNet-50 at 224 px).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "imagenet": {"arch": "resnet50", "crop_size": 224, "val_resize": 256, "crop_area_min": 0.08},
    # The synthetic task's label is one shape: an 8% crop often misses it entirely.
    "synthetic": {"arch": "tiny_resnet", "crop_size": 56, "val_resize": 64, "crop_area_min": 0.35},
    # CIFAR: the AugMix paper's WRN-40-2 (32 px, pad-4 crop + flip; the crop keys are unused).
    "cifar10": {"arch": "wrn40_2", "crop_size": 32, "val_resize": 32, "crop_area_min": 0.08},
    "cifar100": {"arch": "wrn40_2", "crop_size": 32, "val_resize": 32, "crop_area_min": 0.08},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a classifier with (learnable) AugMix + JSD under torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # --- the reference learnable-severity script's interface ---
    a("--epochs", type=int, default=90)
    a("--batch", type=int, default=128, help="global batch size (split evenly over ranks)")
    a("--workers", type=int, default=4, help="DALI threads per rank")
    a("--lr", type=float, default=1e-4, help="network learning rate (see --lr_scale_batch)")
    a("--gpus", type=int, default=-1, help="compat: 0 forces the CPU; use torchrun for several")
    a(
        "--precision",
        choices=sorted(PRECISIONS),
        default="32",
        help="32 | 16 (fp16 + GradScaler) | bf16",
    )
    a("--matmul_precision", choices=("highest", "high", "medium"), default="highest")
    a("--grad_clip_val", type=float, default=0.0, help="clip the global grad norm (0: off)")
    a("--ckpt_dir_base", default="./checkpoints")
    a("--eval_only", action="store_true", help="evaluate --ckpt_path (or --pretrained) and exit")
    a("--ckpt_path", default=None, help="checkpoint to evaluate with --eval_only")
    a(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="checkpoint to continue from; alone or 'auto': --ckpt_path if given, else "
        "<run dir>/last.ckpt",
    )
    a("--seed", type=int, default=0)
    a("--no_wandb", action="store_true", help="same as --wandb disabled")
    a("--aug_type", choices=AUG_TYPES, default="learnable_augmix_jsd")
    a("--augmix_mixture_width", type=int, default=3)
    a("--augmix_mixture_depth", type=int, default=-1, help="-1: uniform in {1,2,3} per chain")
    a(
        "--initial_aug_severity",
        type=float,
        default=3.0,
        help="fixed severity, or the learnable start",
    )
    a("--prior_severity_std_learnable_aug", type=float, default=1.0)
    a("--prior_severity_mean_offset_learnable_aug", type=float, default=0.0)
    a("--beta_jsd", type=float, default=12.0)
    a(
        "--beta_augmenter_reg",
        type=float,
        default=1.0,
        help="KL weight (KL divided by global batch)",
    )
    a("--beta_net", type=float, default=0.01, help="the network's weight decay")
    # --- ours ---
    a("--config", default=None, help="TOML preset; flags given here override it")
    a(
        "--data",
        default=None,
        help="ImageNet layout DIR/train, DIR/val (CIFAR: the torchvision folder)",
    )
    a(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="default: synthetic without --data, else imagenet",
    )
    a(
        "--imagenet_c",
        default=None,
        help="-C tree to evaluate after training (synthetic: generated)",
    )
    a(
        "--arch",
        default=None,
        help="torchvision classifier, tiny_resnet, or for CIFAR wrn<depth>_<width> / resnet18_cifar",
    )
    a("--pretrained", default=None, help="local weights file or a cached torchvision weights name")
    a("--optimizer", choices=("sgd", "adamw"), default="adamw")
    a("--momentum", type=float, default=0.9)
    a(
        "--lr_scale_batch",
        type=int,
        default=0,
        help="if >0: lr *= global batch / this (linear scaling)",
    )
    a(
        "--schedule",
        choices=("cosine", "step", "step_thirds", "cosine_restarts", "constant"),
        default="cosine",
        help="step_thirds: x0.1 at epochs//3 and 2*(epochs//3) (official AugMix imagenet.py)",
    )
    a("--warmup_epochs", type=float, default=0.0)
    a("--step_epochs", type=int, default=30, help="step schedule: x0.1 every this many epochs")
    a("--restart_epochs", type=int, default=10, help="cosine_restarts: period in epochs")
    a(
        "--severity_lr_mult",
        type=float,
        default=10.0,
        help="severity lr = lr x this (reference: 10)",
    )
    a("--initial_severity_sigma", type=float, default=0.1)
    a(
        "--per_sample_severity",
        action="store_true",
        help="one severity draw per sample, not per batch",
    )
    a("--max_severity", type=float, default=10.0)
    a(
        "--severity_objective",
        choices=OBJECTIVES,
        default="minimize",
        help="minimize: the training loss (the reference script's); adversarial: ascend it; "
        "heldout: the hypergradient of a held-out corrupted loss (README: learnable severity)",
    )
    a(
        "--severity_update_every",
        type=int,
        default=HELDOUT_DEFAULTS["severity_update_every"],
        help="heldout: one severity update every N training steps",
    )
    a(
        "--severity_hyper_lr",
        type=float,
        default=HELDOUT_DEFAULTS["severity_hyper_lr"],
        help="heldout: Adam learning rate of (mu, log_sigma), log-severity per update",
    )
    a(
        "--heldout_images",
        type=float,
        default=0,
        help="heldout: training images held out: a count, a fraction (<1), or 0 for "
        "min(10000, 10%%); the fraction must be in (0, 0.5]",
    )
    a(
        "--heldout_corruptions",
        nargs="+",
        default=list(EXTRA_CORRUPTIONS),
        help="heldout: corruptions of the held-out images (never the 15 evaluation ones)",
    )
    a("--heldout_seed", type=int, default=0, help="heldout: the split's seed (fixed across --seed)")
    a(
        "--heldout_batch",
        type=int,
        default=0,
        help="heldout: held-out images per rank per update (0: the per-rank train batch)",
    )
    a("--all_ops", action="store_true", help="add color/contrast/brightness/sharpness (overlap -C)")
    a(
        "--augmix_strategy",
        choices=STRATEGIES,
        default="auto",
        help="AugMix's form: grouped (one host sync per call), static (none), auto (grouped on "
        "the CPU, static on a GPU)",
    )
    a("--channels_last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--wandb", choices=("online", "offline", "disabled"), default="offline")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--crop_size", type=int, default=None)
    a("--val_resize", type=int, default=None)
    a("--crop_area_min", type=float, default=None, help="random-resized crop area range [min, 1]")
    a(
        "--no_train_antialias",
        action="store_true",
        help="resize train crops without antialiasing (faster on the CPU, not PIL's filter)",
    )
    a(
        "--max_steps_per_epoch",
        type=int,
        default=0,
        help="cap steps per epoch (0: all); for smoke runs",
    )
    a(
        "--log_every",
        type=int,
        default=10,
        help="read the steps' losses and severity to the host every N steps (each read waits for "
        "the GPU; the values are still recorded per step)",
    )
    a(
        "--max_nonfinite",
        type=int,
        default=20,
        help="stop after this many non-finite steps in a row",
    )
    # Faults (README "Faults and restarts"): a fault costs at most the steps since last.ckpt.
    a(
        "--save_every_steps",
        type=int,
        default=0,
        help="write last.ckpt every N global steps (0: every --save_every_minutes)",
    )
    a(
        "--save_every_minutes",
        type=float,
        default=10.0,
        help="write last.ckpt about this often, in minutes of training (turned into steps once, "
        "from the pace of the first steps); 0 with --save_every_steps 0: epoch ends only",
    )
    a("--synthetic_train_per_class", type=int, default=200)
    a("--synthetic_val_per_class", type=int, default=50)
    a(
        "--synthetic_seed",
        type=int,
        default=0,
        help="the generated dataset's seed (fixed across --seed)",
    )
    a("--c_severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    a("--no_c_eval", action="store_true", help="skip the -C evaluation after training")
    # ImageNet-P after training (synthetic: a -P set made from the val images)
    a(
        "--imagenet_p",
        default=None,
        help="-P tree to evaluate after training (synthetic: generated)",
    )
    a("--no_p_eval", action="store_true", help="skip the -P evaluation after training")
    a("--synthetic_p_per_class", type=int, default=2, help="generated -P sequences per class")
    a("--no_progress", action="store_true")
    # --- the recipes exactly (optimizer, schedule) and the loader at scale ---
    a("--nesterov", action="store_true", help="SGD with Nesterov momentum (both recipes: plain)")
    a(
        "--no_decay_norm_bias",
        action="store_true",
        help="no weight decay on norm weights and biases (both recipes decay every parameter)",
    )
    a("--restart_mult", type=int, default=1, help="cosine_restarts: period x this (T_mult)")
    a(
        "--lr_min_factor",
        type=float,
        default=0.0,
        help="cosine schedules end at lr x this (eta_min / lr)",
    )
    a(
        "--lr_interval",
        choices=("step", "epoch"),
        default="step",
        help="cosine schedules: update the lr every step, or once per epoch (Lightning's default)",
    )
    a(
        "--on_corrupt",
        choices=("skip", "error"),
        default="skip",
        help="a file that cannot be decoded: skip it (named in a warning and results.json) or stop",
    )
    a(
        "--read_threads",
        type=int,
        default=16,
        help="threads per rank reading files ahead of DALI (hide filesystem latency)",
    )
    # --- CIFAR (--dataset cifar10|cifar100) ---
    a(
        "--cifar_c",
        default=None,
        help="CIFAR-10-C/100-C folder (<corruption>.npy, labels.npy) to evaluate after training",
    )
    a(
        "--cifar_loader",
        choices=CIFAR_LOADERS,
        default="resident",
        help="resident: the set on the device, crop+flip there; dali: the DALI pipeline",
    )
    # Test hooks, hidden from --help: stop as if SIGTERM arrived at this global step; force a NaN
    # loss at these global steps.
    a("--debug_stop_at_step", type=int, default=-1, help=argparse.SUPPRESS)
    a("--debug_nonfinite_steps", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    # ... and inject one real fault (KIND@STEP, see checkpoint.RunCheckpoints).
    a("--debug_fault", default=None, help=argparse.SUPPRESS)
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The flags the user actually typed (argparse cannot tell a default from a typed default)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public iterator
        if action.option_strings and action.dest != "help":
            kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
                kwargs["action"] = "store_true"
            else:
                kwargs.update(
                    type=action.type, nargs=action.nargs, choices=action.choices, const=action.const
                )
            shadow.add_argument(*action.option_strings, **kwargs)
    return vars(shadow.parse_known_args(argv)[0])


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise FileNotFoundError(
            f"--config {str(path)!r}: no such file (presets live in {CONFIG_DIR})"
        )
    with path.open("rb") as f:
        return tomllib.load(f)


def resolve_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults < config file < typed flags, then dataset defaults fill what is still None."""
    parser = build_parser()
    defaults = vars(parser.parse_args(argv))
    explicit = _explicit_flags(parser, argv)
    config = dict(defaults)
    if (
        not defaults["config"]
        and not defaults["data"]
        and defaults["dataset"] in (None, "synthetic")
    ):
        defaults["config"] = config["config"] = DEMO_CONFIG  # no data given: the embedded demo
    if defaults["config"]:
        from_file = load_config_file(defaults["config"])
        unknown = sorted(set(from_file) - set(defaults))
        if unknown:
            raise ValueError(f"--config {defaults['config']}: unknown keys {unknown}")
        config.update(from_file)
    config.update(explicit)
    if config["dataset"] is None:
        config["dataset"] = "imagenet" if config["data"] else "synthetic"
    for key, value in DATASET_DEFAULTS[config["dataset"]].items():
        if config.get(key) is None:
            config[key] = value
    config["precision"] = PRECISIONS[str(config["precision"])]
    if config["no_wandb"]:
        config["wandb"] = "disabled"
    # The reference script's `--resume --ckpt_path X` (a flag and a path): continue from X.
    if config["resume"] == "auto" and config["ckpt_path"] and not config["eval_only"]:
        config["resume"] = config["ckpt_path"]
    return config


def validate_config(config: dict[str, Any], world_size: int) -> None:
    """Fail before any work, with a message that says what to fix."""

    def bad(flag: str, got: Any, want: str) -> None:
        raise ValueError(f"--{flag} {got!r}: {want}")

    if config["epochs"] < 1:
        bad("epochs", config["epochs"], "need at least 1 epoch")
    if config["batch"] < world_size:
        bad("batch", config["batch"], f"the global batch must be >= the world size ({world_size})")
    if config["batch"] % world_size:
        bad(
            "batch", config["batch"], f"the global batch must divide evenly over {world_size} ranks"
        )
    if config["lr"] <= 0:
        bad("lr", config["lr"], "must be > 0")
    if config["augmix_mixture_width"] < 1:
        bad("augmix_mixture_width", config["augmix_mixture_width"], "must be >= 1")
    if config["augmix_mixture_depth"] == 0 or config["augmix_mixture_depth"] < -1:
        bad(
            "augmix_mixture_depth",
            config["augmix_mixture_depth"],
            "must be -1 (random 1-3) or >= 1",
        )
    if not 0 < config["initial_aug_severity"] <= config["max_severity"]:
        bad(
            "initial_aug_severity",
            config["initial_aug_severity"],
            f"must be in (0, {config['max_severity']}]",
        )
    if not 0 < config["crop_area_min"] <= 1:
        bad("crop_area_min", config["crop_area_min"], "must be in (0, 1]")
    if config["nesterov"] and (config["optimizer"] != "sgd" or config["momentum"] <= 0):
        bad("nesterov", True, "needs --optimizer sgd and --momentum > 0")
    if config["restart_mult"] < 1:
        bad("restart_mult", config["restart_mult"], "must be >= 1 (1: equal periods)")
    if not 0 <= config["lr_min_factor"] < 1:
        bad("lr_min_factor", config["lr_min_factor"], "must be in [0, 1)")
    if config["read_threads"] < 1:
        bad("read_threads", config["read_threads"], "must be >= 1")
    if config["save_every_steps"] < 0:
        bad("save_every_steps", config["save_every_steps"], "must be >= 0 (0: by the minute)")
    if config["save_every_minutes"] < 0:
        bad("save_every_minutes", config["save_every_minutes"], "must be >= 0")
    if config["debug_fault"]:
        parse_debug_fault(config["debug_fault"])
    if config["grad_clip_val"] < 0:
        bad("grad_clip_val", config["grad_clip_val"], "must be >= 0 (0 disables clipping)")
    if config["data"] is not None and not Path(config["data"]).is_dir():
        bad(
            "data",
            config["data"],
            "no such folder (expected DIR/train/<class>/... and DIR/val/<class>/...)",
        )
    if config["dataset"] == "synthetic" and config["data"] is not None:
        bad(
            "dataset",
            "synthetic",
            "the synthetic dataset is generated; drop --data or pick another --dataset",
        )
    if config["dataset"] in ("cifar10", "cifar100") and config["data"] is None:
        bad(
            "data",
            None,
            f"--dataset {config['dataset']} needs --data pointing at torchvision's CIFAR folder",
        )
    if config["dataset"] in ("cifar10", "cifar100"):
        if config["imagenet_c"]:
            bad("imagenet_c", config["imagenet_c"], "a CIFAR run is evaluated with --cifar_c DIR")
        if config["imagenet_p"]:
            bad("imagenet_p", config["imagenet_p"], "a CIFAR run has no -P evaluation here")
    if config["cifar_c"] is not None:
        if config["dataset"] not in ("cifar10", "cifar100"):
            bad("cifar_c", config["cifar_c"], "needs --dataset cifar10 or cifar100 (and --data)")
        if not (Path(config["cifar_c"]) / "labels.npy").is_file():
            bad(
                "cifar_c",
                config["cifar_c"],
                "expected a folder holding labels.npy and <corruption>.npy",
            )
    if config["eval_only"] and not (config["ckpt_path"] or config["pretrained"]):
        bad("eval_only", True, "needs --ckpt_path (or --pretrained) to know what to evaluate")
    if config["resume"] and config["resume"] != "auto" and not Path(config["resume"]).is_file():
        bad("resume", config["resume"], "no such checkpoint file (or use --resume auto)")
    if config["gpus"] > 1 and world_size == 1:
        bad(
            "gpus",
            config["gpus"],
            f"launch several processes with torchrun --nproc_per_node={config['gpus']}",
        )
    if config["log_every"] < 1:
        bad("log_every", config["log_every"], "must be >= 1")
    if config["severity_update_every"] < 1:
        bad(
            "severity_update_every",
            config["severity_update_every"],
            "must be >= 1 (the held-out objective updates the severity every N steps)",
        )
    if config["severity_objective"] == "heldout":
        if config["aug_type"] != "learnable_augmix_jsd":
            bad(
                "severity_objective",
                "heldout",
                f"needs --aug_type learnable_augmix_jsd (--aug_type {config['aug_type']} has a "
                "fixed severity, nothing to learn)",
            )
        if config["dataset"] in ("cifar10", "cifar100"):
            bad("severity_objective", "heldout", "needs an image-folder dataset (not CIFAR arrays)")
        images = config["heldout_images"]
        if images < 0 or (0 < images < 1 and images > 0.5):
            bad("heldout_images", images, "the held-out fraction must be in (0, 0.5]")
        if config["severity_hyper_lr"] <= 0:
            bad("severity_hyper_lr", config["severity_hyper_lr"], "must be > 0")
        if config["heldout_batch"] < 0:
            bad("heldout_batch", config["heldout_batch"], "must be >= 0 (0: the train batch)")
    check_heldout_corruptions(config["heldout_corruptions"])
    check_arch(config["arch"])
