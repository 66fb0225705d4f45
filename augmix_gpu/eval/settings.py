"""What an evaluation reads: typed sections whose fields are also evaluate.py's flags.

Each section is a frozen dataclass; each field is declared once with :func:`checks.flag` (name,
type, default, help, check), and ``cli.py`` generates the command line from these declarations
(``checks.add_flags``). A benchmark's root (``--imagenet_c DIR``, ...) is not a field here: the
registry (``registry.py``) holds the benchmarks, and ``EvalSettings.roots`` maps the name of each
one given to its folder, so a new benchmark needs no edit in this file.

Built by code (the trainer's end-of-run evaluation) with plain constructors; every value is
checked as a flag typed on the command line would be::

    EvalSettings(
        data=DataSettings(val="data/val", crop_size=224, resize_size=256),
        run=RunSettings(batch=64, precision="bf16", no_progress=True),
        roots={"imagenet_c": "data/ImageNet-C", "imagenet_p": None},  # None: not evaluated
    )
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..augment.augmix import IMAGENET_MEAN, IMAGENET_STD
from ..checks import at_least, check_flag_value, flag, flag_fields
from ..runtime import PRECISIONS

# The input normalisations a model is trained and evaluated with (--normalization, in train.py
# and evaluate.py), as (mean, std) per channel on [0, 1] RGB: ImageNet's (the default;
# torchvision's and the official imagenet.py's) or 0.5 / 0.5 (the official cifar.py's
# ``transforms.Normalize([0.5] * 3, [0.5] * 3)``).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _path(value: Any) -> Any:
    """A folder or file argument: ``str`` or ``os.PathLike`` (kept as ``str``), or None."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _listed(value: Any) -> Any:
    """A tuple (or any sequence but a string) is accepted where a list is declared."""
    return list(value) if isinstance(value, (tuple, range)) else value


def _check_fields(section: Any) -> None:
    """Check (and canonicalise) every field of a frozen settings section, as argparse would."""
    for f, hint, meta in flag_fields(type(section)):
        value = check_flag_value(f.name, getattr(section, f.name), hint, meta)
        object.__setattr__(section, f.name, value)


@dataclass(frozen=True)
class ModelSource:
    """What to evaluate: exactly one of --ckpt_path, --pretrained."""

    ckpt_path: str | None = flag(
        None, "checkpoint of this project (model, classes, config)", convert=_path
    )
    pretrained: str | None = flag(
        None, "local torchvision weights file (or a cached weights name)", convert=_path
    )
    arch: str | None = flag(
        None, "architecture for --pretrained (default: what the file names, else resnet50)"
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class DataSettings:
    """The clean set, the benchmarks' options and the image sizes (each benchmark's root: below)."""

    val: str | None = flag(
        None, "clean ImageNet-layout folder (resize + centre crop)", convert=_path
    )
    cifar: str | None = flag(
        None, "CIFAR root (holds cifar-10-batches-py) for the clean test error", convert=_path
    )
    cifar_name: str = flag("cifar10", "which CIFAR", choices=("cifar10", "cifar100"))
    corruptions: list[str] = flag(
        [], "-C subset (reported as partial, never as mCE); empty: all present", convert=_listed
    )
    severities: list[int] = flag([], "subset of 1..5 (partial); empty: all 5", convert=_listed)
    c_resize: int | None = flag(
        None, "resize -C images' shorter side first (official augmix: 256)", check=at_least(1)
    )
    perturbations: list[str] = flag(
        [], "-P subset (partial, never an mFR); empty: all present", convert=_listed
    )
    p_difficulties: list[int] = flag([1], "-P difficulties (1 2 3)", convert=_listed)
    p_decoder: str = flag(
        "auto",
        "-P videos: DALI on a GPU (auto), PyAV on the CPU (cpu), or DALI (dali)",
        choices=("auto", "cpu", "dali"),
    )
    p_batch: int | None = flag(
        None, "-P sequences per rank per step (default: ~batch frames)", check=at_least(1)
    )
    p_reference: str | None = flag(
        None, "results.json whose -P figures normalise FR/mFR/mT5D (e.g. AlexNet's)", convert=_path
    )
    crop_size: int | None = flag(
        None, "centre crop (default: checkpoint's, else 224)", check=at_least(1)
    )
    resize_size: int | None = flag(
        None, "clean resize (default: checkpoint's, else 256)", check=at_least(1)
    )
    normalization: str | None = flag(
        None,
        "input normalisation: imagenet (mean/std) or half (0.5/0.5, cifar.py); default: what the "
        "checkpoint or weights file says, else imagenet",
        choices=tuple(NORMALIZATIONS),
    )
    on_corrupt: str = flag(
        "skip",
        "a file that cannot be decoded (any benchmark): skip it (named in a warning and in "
        "results.json's skipped_files) or stop with an error naming it",
        choices=("skip", "error"),
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class RunSettings:
    """Where and how fast it runs, and where the reports go."""

    batch: int = flag(128, "images per rank per step", check=at_least(1))
    workers: int = flag(4, "DALI threads per rank", check=at_least(1))
    device: str = flag("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    precision: str = flag("32", "autocast: 32 (off), 16 or bf16", choices=PRECISIONS)
    channels_last: bool = flag(False, "run the model in channels-last memory format")
    out: str = flag("eval_results", "folder for the JSON, markdown and pictures", convert=_path)
    name: str = flag("results", "file stem of the reports")
    no_progress: bool = flag(False, "no progress bars")
    compare: list[str] = flag(
        [], "A.json B.json: print two results side by side", nargs=2, convert=_listed
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.compare and len(self.compare) != 2:
            raise ValueError(f"--compare: expected two results files, got {self.compare!r}")


@dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation reads. ``roots``: benchmark name (``registry.BENCHMARKS``) ->
    its folder; a None value is dropped, so ``{"imagenet_p": maybe_none}`` is fine."""

    model: ModelSource = field(default_factory=ModelSource)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)
    roots: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, section in (("model", ModelSource), ("data", DataSettings), ("run", RunSettings)):
            if not isinstance(getattr(self, name), section):
                raise ValueError(
                    f"EvalSettings.{name}: expected a {section.__name__}, got "
                    f"{type(getattr(self, name)).__name__}"
                )
        roots = {str(k): os.fspath(v) for k, v in dict(self.roots).items() if v is not None}
        object.__setattr__(self, "roots", roots)
