"""Training settings: typed sections, built once from defaults, a preset file and the flags typed.

Every setting is one field below, declared with :func:`~augmix_gpu.checks.flag`: its name (the
flag), type, default, help and check live in that declaration, and the command line is generated
from them (:func:`build_parser`). Precedence, lowest to highest: the field defaults < ``--config
FILE`` (TOML, flat flag names) < the flags typed; the dataset's defaults then fill what is still
None. The reference learnable-severity script's flags keep their names.

The resolved :class:`Settings` is saved beside every run and inside every checkpoint as one flat
``{flag: value}`` dict (:meth:`Settings.to_dict`), so a run can be reproduced from its own folder
and a checkpoint read back into typed settings (:meth:`Settings.from_dict`).
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from ..augment.augmix import LEVELS, STRATEGIES
from ..augment.ops import AUGMENTATIONS_ALL
from ..augment.severity import OBJECTIVES
from ..checks import add_flags, at_least, check_flag_value, flag, flag_fields, positive
from ..data.heldout import check_heldout_corruptions
from ..data.synthetic import SHIFTS
from ..eval.registry import BENCHMARKS
from ..eval.settings import NORMALIZATIONS
from ..models import check_arch
from ..protocols import EXTRA_CORRUPTIONS
from ..runtime import PRECISIONS
from .heldout_severity import ESTIMATORS, UPDATE_RULES

AUG_TYPES = ("none", "augmix", "augmix_jsd", "learnable_augmix_jsd")
DATASETS = ("imagenet", "cifar10", "cifar100", "synthetic")
CIFAR_DATASETS = ("cifar10", "cifar100")
# Lightning's spellings of the reference script, accepted and stored as ours.
PRECISION_ALIASES = {"32-true": "32", "16-mixed": "16", "bf16-mixed": "bf16"}
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


# The test hooks of --debug_fault KIND@STEP (first worker group only, see train/resume.py).
DEBUG_FAULTS = ("sigkill", "sigkill_in_save", "enospc_in_save")


def parse_debug_fault(spec: str) -> tuple[str, int]:
    """``KIND@STEP`` -> (kind, global step); the test hook behind ``--debug_fault``."""
    kind, _, step = spec.partition("@")
    if kind not in DEBUG_FAULTS or not step.isdigit():
        raise ValueError(
            f"--debug_fault {spec!r}: expected KIND@STEP with KIND one of {', '.join(DEBUG_FAULTS)}"
        )
    return kind, int(step)


def _precision(value: Any) -> str:
    value = str(value)
    return PRECISION_ALIASES.get(value, value)


def _debug_fault(spec: str) -> str | None:
    try:
        parse_debug_fault(spec)
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    return None


def _fraction_or_count(v: float) -> str | None:
    return None if v == 0 or v >= 1 or 0 < v <= 0.5 else "the held-out fraction must be in (0, 0.5]"


@dataclass(frozen=True)
class RunSettings:
    """The run: its length, batch and seed, where it runs, its checkpoints and logs."""

    epochs: int = flag(90, check=at_least(1))
    batch: int = flag(128, "global batch size (split evenly over ranks)", check=at_least(1))
    seed: int = flag(0)
    gpus: int = flag(-1, "compat: 0 forces the CPU; use torchrun for several")
    device: str = flag("auto", choices=("auto", "cpu", "cuda"))
    matmul_precision: str = flag("highest", choices=("highest", "high", "medium"))
    ckpt_dir_base: str = flag("./checkpoints")
    eval_only: bool = flag(False, "evaluate --ckpt_path (or --pretrained) and exit")
    ckpt_path: str | None = flag(None, "checkpoint to evaluate with --eval_only")
    resume: str | None = flag(
        None,
        "checkpoint to continue from; alone or 'auto': --ckpt_path if given, else "
        "<run dir>/last.ckpt",
        nargs="?",
        const="auto",
    )
    no_wandb: bool = flag(False, "same as --wandb disabled")
    wandb: str = flag("offline", choices=("online", "offline", "disabled"))
    max_steps_per_epoch: int = flag(
        0, "cap steps per epoch (0: all); for smoke runs", check=at_least(0)
    )
    log_every: int = flag(
        10,
        "read the steps' losses and severity to the host every N steps (each read waits for the "
        "GPU; the values are still recorded per step)",
        check=at_least(1),
    )
    max_nonfinite: int = flag(
        20, "stop after this many non-finite steps in a row", check=at_least(1)
    )
    no_memory_check: bool = flag(
        False, "CUDA: start even when the memory estimate says the step will not fit"
    )
    # Faults (README "Faults and restarts"): a fault costs at most the steps since last.ckpt.
    save_every_steps: int = flag(
        0, "write last.ckpt every N global steps (0: every --save_every_minutes)", check=at_least(0)
    )
    save_every_minutes: float = flag(
        10.0,
        "write last.ckpt about this often, in minutes of training (turned into steps once, from "
        "the pace of the first steps); 0 with --save_every_steps 0: epoch ends only",
        check=at_least(0),
    )
    no_progress: bool = flag(False)
    config: str | None = flag(None, "TOML preset; flags given here override it")
    # Test hooks, hidden from --help: stop as if SIGTERM arrived at this global step; force a NaN
    # loss at these global steps; inject one real fault (KIND@STEP, see train/resume.py).
    debug_stop_at_step: int = flag(-1, hidden=True)
    debug_nonfinite_steps: list[int] = flag([], hidden=True, nargs="*")
    debug_fault: str | None = flag(None, hidden=True, check=_debug_fault)


@dataclass(frozen=True)
class DataSettings:
    """The data: which dataset, how it is read and cropped, the generated task's size."""

    data: str | None = flag(
        None, "ImageNet layout DIR/train, DIR/val (CIFAR: the torchvision folder)"
    )
    dataset: str | None = flag(
        None, "default: synthetic without --data, else imagenet", choices=DATASETS
    )
    workers: int = flag(4, "DALI threads per rank", check=at_least(1))
    read_threads: int = flag(
        16,
        "threads per rank reading files ahead of DALI (hide filesystem latency)",
        check=at_least(1),
    )
    crop_size: int | None = flag(None, check=at_least(1))
    val_resize: int | None = flag(None, check=at_least(1))
    crop_area_min: float | None = flag(
        None,
        "random-resized crop area range [min, 1]",
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    )
    no_train_antialias: bool = flag(
        False, "resize train crops without antialiasing (faster on the CPU, not PIL's filter)"
    )
    on_corrupt: str = flag(
        "skip",
        "a file that cannot be decoded: skip it (named in a warning and results.json) or stop",
        choices=("skip", "error"),
    )
    normalization: str = flag(
        "imagenet",
        "input normalisation everywhere (AugMix views, clean batches, validation, evaluation): "
        "imagenet (ImageNet's mean/std) or half (mean 0.5, std 0.5: the official cifar.py)",
        choices=tuple(NORMALIZATIONS),
    )
    cifar_loader: str = flag(
        "resident",
        "resident: the set on the device, crop+flip there; dali: the DALI pipeline",
        choices=("resident", "dali"),
    )
    last_batch: str = flag(
        "drop",
        "the ragged last batch of an epoch: drop it, or keep it (CIFAR on the resident loader) as "
        "cifar.py's DataLoader does (50,000 at batch 128: 391 steps, the last of 80), split "
        "evenly over the ranks (at most world size - 1 images left out)",
        choices=("drop", "keep"),
    )
    synthetic_train_per_class: int = flag(200, check=at_least(1))
    synthetic_val_per_class: int = flag(50, check=at_least(1))
    synthetic_seed: int = flag(0, "the generated dataset's seed (fixed across --seed)")
    synthetic_c_per_class: int | None = flag(
        None,
        "the generated -C set from the first N val images per class (default: all of them): a "
        "larger val split for a steadier clean accuracy without a slower -C",
        check=at_least(1),
    )
    synthetic_p_per_class: int = flag(2, "generated -P sequences per class", check=at_least(1))
    synthetic_shift: str = flag(
        "none",
        "nuisances the generated train split lacks and val (and the held-out pool) has: "
        + "; ".join(f"{k}: {v.help}" for k, v in SHIFTS.items()),
        choices=tuple(SHIFTS),
    )

    @property
    def is_cifar(self) -> bool:
        return self.dataset in CIFAR_DATASETS


@dataclass(frozen=True)
class ModelSettings:
    """The network: its architecture, starting weights, and how it runs."""

    arch: str | None = flag(
        None,
        "torchvision classifier, tiny_resnet, or for CIFAR wrn<depth>_<width> / resnet18_cifar",
    )
    pretrained: str | None = flag(None, "local weights file or a cached torchvision weights name")
    precision: str = flag(
        "32",
        "32 | 16 (fp16 + GradScaler) | bf16",
        choices=(*PRECISIONS, *PRECISION_ALIASES),
        convert=_precision,
    )
    channels_last: bool = flag(False)
    compile: bool = flag(False, "torch.compile the network")


@dataclass(frozen=True)
class AugmentSettings:
    """AugMix: the mode, its chains and severity, the JSD weight."""

    aug_type: str = flag("learnable_augmix_jsd", choices=AUG_TYPES)
    augmix_mixture_width: int = flag(3, check=at_least(1))
    augmix_mixture_depth: int = flag(
        -1,
        "-1: uniform in {1,2,3} per chain",
        check=lambda v: None if v == -1 or v >= 1 else "must be -1 (random 1-3) or >= 1",
    )
    initial_aug_severity: float = flag(
        3.0, "fixed severity, or the learnable start", check=positive
    )
    all_ops: bool = flag(False, "add color/contrast/brightness/sharpness (overlap -C)")
    aug_ops: list[str] = flag(
        [],
        "draw only these ops (not with --all_ops), e.g. to leave posterize and solarize out; "
        "none given: the paper's 9, or all 13 with --all_ops",
        choices=AUGMENTATIONS_ALL,
        check=lambda v: None if len(set(v)) == len(v) else "names an op more than once",
    )
    augmix_strategy: str = flag(
        "auto",
        "AugMix's form: grouped (one host sync per call), static (none), fused (Triton kernels, "
        "none), auto (grouped on the CPU, fused on CUDA, static on other accelerators)",
        choices=STRATEGIES,
    )
    beta_jsd: float = flag(12.0, check=at_least(0))
    op_levels: str = flag(
        "continuous",
        "continuous: magnitudes level x max / 10, no rounding between ops (they carry the "
        "severity's gradient); official: the official code's ops, magnitudes truncated as its "
        "int_parameter and uint8 after every op (a fixed severity only)",
        choices=LEVELS,
    )

    @property
    def jsd(self) -> bool:
        """The loss has the JSD term (three views per image)."""
        return self.aug_type in ("augmix_jsd", "learnable_augmix_jsd")

    @property
    def learnable(self) -> bool:
        return self.aug_type == "learnable_augmix_jsd"


@dataclass(frozen=True)
class SeveritySettings:
    """The learnable severity: its prior, its objective and the held-out objective's set."""

    prior_severity_std_learnable_aug: float = flag(1.0, check=positive)
    prior_severity_mean_offset_learnable_aug: float = flag(0.0)
    beta_augmenter_reg: float = flag(
        1.0, "KL weight (KL divided by global batch)", check=at_least(0)
    )
    severity_lr_mult: float = flag(
        10.0, "severity lr = lr x this (reference: 10)", check=at_least(0)
    )
    initial_severity_sigma: float = flag(0.1, check=positive)
    per_sample_severity: bool = flag(False, "one severity draw per sample, not per batch")
    max_severity: float = flag(10.0, check=positive)
    severity_objective: str = flag(
        "minimize",
        "minimize: the training loss (the reference script's); adversarial: ascend it; heldout: "
        "the hypergradient of a held-out corrupted loss (README: learnable severity)",
        choices=tuple(OBJECTIVES),
    )
    severity_update_every: int = flag(
        10, "heldout: one severity update every N training steps", check=at_least(1)
    )
    severity_lookaheads: int = flag(
        1,
        "heldout: average the hypergradient over the last N steps of each update cycle, each a "
        "lookahead on its own held-out batch (less noise; N x the cost per update)",
        check=at_least(1),
    )
    severity_step_length: str = flag(
        "fixed",
        "heldout: the lookahead's step length held fixed, the severity choosing its direction "
        "only (fixed: plain DARTS rewarded longer steps), or free to follow the severity as the "
        "optimiser's step does (docs/studies.md: the horizon probe)",
        choices=("fixed", "free"),
    )
    severity_estimator: str = flag(
        "pathwise",
        "heldout: the hypergradient as the derivative at the sampled severity (pathwise) or as "
        "the slope between the step rendered again at s e^+-severity_log_step (paired: common "
        "random numbers, no derivative of the ops; docs/learnable-severity.md)",
        choices=ESTIMATORS,
    )
    severity_log_step: float = flag(
        0.5, "heldout, paired: half the log-severity distance of the pair", check=positive
    )
    severity_horizon: int = flag(
        1,
        "heldout, paired: the lookahead's length in training steps. 1: the step's own update "
        "(linearised); K > 1: two copies of the network forked K steps before each update, "
        "trained on the run's batches and draws at s e^+-severity_log_step, their held-out "
        "losses compared (2K more training steps per update; docs/learnable-severity.md)",
        check=at_least(1),
    )
    severity_hold_epochs: int = flag(
        0,
        "heldout: the severity stays at its start for the first N epochs (no lookaheads, no "
        "updates): a network at chance gives the held-out loss no slope at any horizon",
        check=at_least(0),
    )
    severity_hyper_lr: float = flag(
        0.05,
        "heldout: the learning rate of (mu, log_sigma), log-severity per update",
        check=positive,
    )
    severity_update_rule: str = flag(
        "adam",
        "heldout: how an update moves (mu, log_sigma) along its reading: adam, or sign (mu by "
        "exactly --severity_hyper_lr against the reading's sign: a few large readings do not "
        "set the step of all others; docs/learnable-severity.md)",
        choices=UPDATE_RULES,
    )
    heldout_images: float = flag(
        0,
        "heldout: training images held out: a count, a fraction (<1), or 0 for min(10000, 10%); "
        "the fraction must be in (0, 0.5]",
        check=_fraction_or_count,
    )
    heldout_corruptions: list[str] = flag(
        list(EXTRA_CORRUPTIONS),
        "heldout: corruptions of the held-out images (never the 15 evaluation ones)",
        check=lambda names: _problem(check_heldout_corruptions, names),
    )
    heldout_seed: int = flag(0, "heldout: the split's seed (fixed across --seed)")
    exclude_heldout: bool = flag(
        False,
        "train without the held-out split even where no objective reads it: the baseline a "
        "held-out run is compared with (the same training images, and none of the held-out "
        "images' clean twins)",
    )
    heldout_batch: int = flag(
        0,
        "heldout: held-out images per rank per update (0: the per-rank train batch)",
        check=at_least(0),
    )


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser and the learning-rate schedule."""

    lr: float = flag(1e-4, "network learning rate (see --lr_scale_batch)", check=positive)
    beta_net: float = flag(0.01, "the network's weight decay", check=at_least(0))
    optimizer: str = flag("adamw", choices=("sgd", "adamw"))
    momentum: float = flag(0.9, check=at_least(0))
    nesterov: bool = flag(False, "SGD with Nesterov momentum (both recipes: plain)")
    no_decay_norm_bias: bool = flag(
        False, "no weight decay on norm weights and biases (both recipes decay every parameter)"
    )
    lr_scale_batch: int = flag(
        0, "if >0: lr *= global batch / this (linear scaling)", check=at_least(0)
    )
    grad_clip_val: float = flag(0.0, "clip the global grad norm (0: off)", check=at_least(0))
    schedule: str = flag(
        "cosine",
        "step_thirds: x0.1 at epochs//3 and 2*(epochs//3) (official AugMix imagenet.py)",
        choices=("cosine", "step", "step_thirds", "cosine_restarts", "constant"),
    )
    warmup_epochs: float = flag(0.0, check=at_least(0))
    step_epochs: int = flag(30, "step schedule: x0.1 every this many epochs", check=at_least(1))
    restart_epochs: int = flag(10, "cosine_restarts: period in epochs", check=at_least(1))
    restart_mult: int = flag(1, "cosine_restarts: period x this (T_mult)", check=at_least(1))
    lr_min_factor: float = flag(
        0.0,
        "cosine schedules end at lr x this (eta_min / lr)",
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    )
    lr_interval: str = flag(
        "step",
        "cosine schedules: update the lr every step, or once per epoch (Lightning's default)",
        choices=("step", "epoch"),
    )


@dataclass(frozen=True)
class _RobustnessOptions:
    """The robustness evaluation after training: one ``--<benchmark> DIR`` per benchmark of the
    evaluation's registry (the synthetic task generates its own -C and -P), and these options."""

    c_severities: list[int] = flag(
        [1, 2, 3, 4, 5],
        check=lambda sevs: (
            None if sevs and all(1 <= s <= 5 for s in sevs) else "severities are 1..5"
        ),
    )
    no_c_eval: bool = flag(False, "skip the -C evaluation after training (and the generated -P)")
    no_p_eval: bool = flag(False, "skip the -P evaluation after training")

    def roots(self) -> dict[str, str | None]:
        """Benchmark name -> the root given for it (None: not given)."""
        return {b.name: getattr(self, b.name) for b in BENCHMARKS}


# One root flag per registered benchmark: a new benchmark needs no edit here.
RobustnessSettings = make_dataclass(
    "RobustnessSettings",
    [(b.name, str | None, flag(None, f"{b.help}; evaluated after training")) for b in BENCHMARKS],
    bases=(_RobustnessOptions,),
    frozen=True,
)
RobustnessSettings.__doc__ = _RobustnessOptions.__doc__


def _problem(check: Any, value: Any) -> str | None:
    """A check that raises, as a flag check: its message, or None."""
    try:
        check(value)
    except ValueError as e:
        return str(e)
    return None


SECTIONS = {
    "run": RunSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "augment": AugmentSettings,
    "severity": SeveritySettings,
    "optim": OptimSettings,
    "robustness": RobustnessSettings,
}


@dataclass(frozen=True)
class Settings:
    """Every training setting, by section (``settings.optim.lr``); see the module docstring."""

    run: RunSettings
    data: DataSettings
    model: ModelSettings
    augment: AugmentSettings
    severity: SeveritySettings
    optim: OptimSettings
    robustness: RobustnessSettings

    @property
    def run_dir(self) -> Path:
        """``<ckpt_dir_base>/<aug_type>``: where the run's checkpoints, config and results go."""
        return Path(self.run.ckpt_dir_base) / self.augment.aug_type

    def per_rank_batch(self, world_size: int) -> int:
        return self.run.batch // world_size

    def to_dict(self) -> dict[str, Any]:
        """The flat ``{flag: value}`` form: config.json, checkpoints, results.json, presets."""
        return {
            f.name: getattr(getattr(self, s), f.name)
            for s, cls in SECTIONS.items()
            for f in fields(cls)
        }

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], *, where: str = "settings", strict: bool = True
    ) -> Settings:
        """Typed settings from a flat dict; each value checked (type, choices, its check).

        Missing keys take their defaults (a checkpoint of an older version); unknown keys are an
        error naming ``where`` (a preset with a typo must not be silently ignored), or dropped
        with ``strict=False`` (a checkpoint written by another version)."""
        known = {f.name for c in SECTIONS.values() for f in fields(c)}
        unknown = sorted(set(values) - known)
        if unknown and strict:
            raise ValueError(f"{where}: unknown keys {unknown}")
        values = {k: v for k, v in values.items() if k in known}
        sections = {}
        for name, section in SECTIONS.items():
            kw = {}
            for f, hint, meta in flag_fields(section):
                if f.name in values:
                    kw[f.name] = check_flag_value(f.name, values[f.name], hint, meta)
            sections[name] = section(**kw)
        return cls(**sections)

    def replace(self, **changes: Any) -> Settings:
        """A copy with flat ``flag=value`` changes, checked as typed flags are."""
        return Settings.from_dict({**self.to_dict(), **changes}, where="Settings.replace")


# What must agree between a checkpoint and the run that continues it.
RESUME_MUST_MATCH = (
    ("augment", "aug_type"),
    ("model", "arch"),
    ("data", "dataset"),
    ("augment", "all_ops"),
    ("augment", "aug_ops"),
    ("run", "batch"),
    ("severity", "severity_objective"),
)


def resume_conflicts(saved: Settings, now: Settings) -> list[tuple[str, Any, Any]]:
    """``(flag, saved value, current value)`` for each setting a resumed run cannot change."""
    out = []
    for section, name in RESUME_MUST_MATCH:
        a, b = getattr(getattr(saved, section), name), getattr(getattr(now, section), name)
        if a != b:
            out.append((name, a, b))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the sections: one ``--flag`` per field, grouped."""
    p = argparse.ArgumentParser(
        description="Train a classifier with (learnable) AugMix + JSD under torchrun.",
        argument_default=argparse.SUPPRESS,
    )
    for section in SECTIONS.values():
        add_flags(p, section, section.__doc__.split(":")[0].strip(". "))
    return p


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A preset's flat ``{flag: value}``; a bare name is looked up in ``configs/``."""
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise FileNotFoundError(
            f"--config {str(path)!r}: no such file (presets live in {CONFIG_DIR})"
        )
    with path.open("rb") as f:
        return tomllib.load(f)


def resolve_settings(argv: list[str] | None = None) -> Settings:
    """Defaults < preset < typed flags; then the derived values (module docstring)."""
    typed = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    preset = typed.get("config")
    if not preset and not typed.get("data") and typed.get("dataset") in (None, "synthetic"):
        preset = DEMO_CONFIG  # no data given: the embedded demo
    if preset:
        values.update(load_config_file(preset))
        values["config"] = preset
    values.update(typed)
    settings = Settings.from_dict(values, where=f"--config {preset}" if preset else "flags")
    return _derived(settings)


def _derived(s: Settings) -> Settings:
    """The dataset and its defaults, W&B off for --no_wandb, --resume with --ckpt_path."""
    dataset = s.data.dataset or ("imagenet" if s.data.data else "synthetic")
    data = replace(s.data, dataset=dataset)
    defaults = DATASET_DEFAULTS[dataset]
    for key in ("crop_size", "val_resize", "crop_area_min"):
        if getattr(data, key) is None:
            data = replace(data, **{key: defaults[key]})
    model = s.model if s.model.arch else replace(s.model, arch=defaults["arch"])
    run = replace(s.run, wandb="disabled") if s.run.no_wandb else s.run
    # The reference script's `--resume --ckpt_path X` (a flag and a path): continue from X.
    if run.resume == "auto" and run.ckpt_path and not run.eval_only:
        run = replace(run, resume=run.ckpt_path)
    return replace(s, data=data, model=model, run=run)


# --- checks across settings: fail before any work, with a message that says what to fix ---------


def _bad(flag_name: str, got: Any, want: str) -> ValueError:
    return ValueError(f"--{flag_name} {got!r}: {want}")


def validate_settings(s: Settings, world_size: int) -> None:
    """Everything one setting's own check cannot see: settings that must agree, paths."""
    _check_run(s, world_size)
    _check_data(s)
    _check_severity(s)
    if s.augment.initial_aug_severity > s.severity.max_severity:
        raise _bad(
            "initial_aug_severity",
            s.augment.initial_aug_severity,
            f"must be in (0, {s.severity.max_severity}]",
        )
    if s.augment.op_levels == "official" and s.augment.learnable:
        raise _bad(
            "op_levels",
            "official",
            "truncated magnitudes carry no gradient to a learnable severity: use --op_levels "
            "continuous, or a fixed severity (--aug_type augmix_jsd)",
        )
    if s.augment.aug_ops and s.augment.all_ops:
        raise _bad("aug_ops", " ".join(s.augment.aug_ops), "names the whole set: drop --all_ops")
    if s.optim.nesterov and (s.optim.optimizer != "sgd" or s.optim.momentum <= 0):
        raise _bad("nesterov", True, "needs --optimizer sgd and --momentum > 0")
    check_arch(s.model.arch)


def _check_run(s: Settings, world_size: int) -> None:
    run = s.run
    if run.batch < world_size:
        raise _bad("batch", run.batch, f"the global batch must be >= the world size ({world_size})")
    if run.batch % world_size:
        raise _bad(
            "batch", run.batch, f"the global batch must divide evenly over {world_size} ranks"
        )
    if run.eval_only and not (run.ckpt_path or s.model.pretrained):
        raise _bad(
            "eval_only", True, "needs --ckpt_path (or --pretrained) to know what to evaluate"
        )
    if run.resume and run.resume != "auto" and not Path(run.resume).is_file():
        raise _bad("resume", run.resume, "no such checkpoint file (or use --resume auto)")
    if run.gpus > 1 and world_size == 1:
        raise _bad(
            "gpus", run.gpus, f"launch several processes with torchrun --nproc_per_node={run.gpus}"
        )


def _check_data(s: Settings) -> None:
    data, rob = s.data, s.robustness
    if data.data is not None and not Path(data.data).is_dir():
        raise _bad(
            "data",
            data.data,
            "no such folder (expected DIR/train/<class>/... and DIR/val/<class>/...)",
        )
    if data.dataset == "synthetic" and data.data is not None:
        raise _bad(
            "dataset",
            "synthetic",
            "the synthetic dataset is generated; drop --data or pick another --dataset",
        )
    if data.last_batch == "keep" and not (data.is_cifar and data.cifar_loader == "resident"):
        raise _bad(
            "last_batch",
            "keep",
            "needs CIFAR on --cifar_loader resident (the DALI loaders drop it): pass --last_batch drop",
        )
    if data.synthetic_shift != "none" and data.dataset != "synthetic":
        raise _bad("synthetic_shift", data.synthetic_shift, "only the synthetic dataset is shifted")
    if data.is_cifar and data.data is None:
        raise _bad(
            "data",
            None,
            f"--dataset {data.dataset} needs --data pointing at torchvision's CIFAR folder",
        )
    family = "cifar" if data.is_cifar else "imagenet"
    for b in BENCHMARKS:
        root = getattr(rob, b.name)
        if root and b.family != family:
            want = "a CIFAR run is evaluated with --cifar_c DIR" if data.is_cifar else (
                "needs --dataset cifar10 or cifar100 (and --data)")  # fmt: skip
            raise _bad(b.name, root, want)
    if rob.cifar_c is not None and not (Path(rob.cifar_c) / "labels.npy").is_file():
        raise _bad(
            "cifar_c", rob.cifar_c, "expected a folder holding labels.npy and <corruption>.npy"
        )


def _check_severity(s: Settings) -> None:
    if s.severity.exclude_heldout and s.data.is_cifar:
        raise _bad("exclude_heldout", True, "needs an image-folder dataset (not CIFAR arrays)")
    if s.severity.severity_objective != "heldout":
        return
    if s.data.normalization != "imagenet":
        raise _bad(
            "normalization",
            s.data.normalization,
            "the held-out objective's loss normalises with ImageNet's mean/std: use imagenet",
        )
    if not s.augment.learnable:
        raise _bad(
            "severity_objective",
            "heldout",
            f"needs --aug_type learnable_augmix_jsd (--aug_type {s.augment.aug_type} has a fixed "
            "severity, nothing to learn)",
        )
    if s.data.is_cifar:
        raise _bad(
            "severity_objective", "heldout", "needs an image-folder dataset (not CIFAR arrays)"
        )
    sev = s.severity
    if sev.severity_horizon > 1 and sev.severity_estimator != "paired":
        raise _bad(
            "severity_horizon",
            sev.severity_horizon,
            f"a horizon of more than one step is measured by pairs: add --severity_estimator "
            f"paired (got {sev.severity_estimator})",
        )
    if sev.severity_horizon > 1 and sev.severity_lookaheads != 1:
        raise _bad(
            "severity_lookaheads",
            sev.severity_lookaheads,
            "must be 1 with --severity_horizon > 1 (one pair per update; more held-out images "
            "per update: --heldout_batch)",
        )
    if sev.severity_horizon > sev.severity_update_every:
        raise _bad(
            "severity_horizon",
            sev.severity_horizon,
            f"at most --severity_update_every ({sev.severity_update_every}): the pair trains on "
            "the last steps of each update cycle",
        )
    if sev.severity_hold_epochs >= s.run.epochs:
        raise _bad(
            "severity_hold_epochs",
            sev.severity_hold_epochs,
            f"must be below --epochs ({s.run.epochs}): the severity would never move",
        )
    if s.severity.severity_lookaheads > s.severity.severity_update_every:
        raise _bad(
            "severity_lookaheads",
            s.severity.severity_lookaheads,
            f"at most --severity_update_every ({s.severity.severity_update_every}): the "
            "lookaheads are the last steps of each update cycle",
        )
