"""Weight files as they are published, read into this project's module names; the format is told
by the file's keys, never by its name.

- **A checkpoint of this project** (``best.ckpt``, ``last.ckpt``): read by
  ``checkpoint.load_checkpoint``; the network is its ``model`` entry, its saved settings name the
  architecture and the input normalisation.
- **The official AugMix checkpoints** (google-research/augmix ``imagenet.py`` and ``cifar.py``,
  ``checkpoint.pth.tar`` / ``model_best.pth.tar``, e.g. the released ImageNet ResNet-50): a dict
  ``{'epoch', 'model', 'state_dict', 'optimizer', 'best_acc1' | 'best_acc'}`` (cifar.py adds
  ``'dataset'``) whose ``state_dict`` comes from ``nn.DataParallel``: every key starts with
  ``module.``. imagenet.py's networks are torchvision's (same names). cifar.py's ``wrn`` is the
  Wide ResNet of its ``third_party/WideResNet_pytorch/wideresnet.py`` (``block<g>.layer.<i>.``,
  ``convShortcut``, a final ``bn1``), renamed here to ours, which computes the same function;
  cifar.py normalises its input with mean 0.5, std 0.5.
- **A torchvision state dict** (``resnet50-0676ba61.pth``): ``{name: tensor}``.

Everything but this project's own checkpoints is read with ``torch.load(weights_only=True)``:
tensors and plain containers only, no code run by unpickling.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The input normalisations a format implies (names of eval.loop.NORMALIZATIONS).
CIFAR_PY_NORMALIZATION = "half"  # cifar.py: transforms.Normalize([0.5] * 3, [0.5] * 3)
IMAGENET_NORMALIZATION = "imagenet"  # imagenet.py, torchvision: ImageNet's mean and std
_OFFICIAL_WRN_BLOCK = re.compile(r"block(\d+)\.layer\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Weights:
    """A network's weights, keyed by this project's module names, and what the file says of it."""

    state: dict[str, torch.Tensor]
    format: str  # which published format the keys matched
    arch: str | None  # the architecture the file names or implies (None: it does not say)
    normalization: str | None  # the input normalisation it was trained with (None: not said)


def load_weights(path: str | os.PathLike, arch: str | None = None) -> Weights:
    """The weights in ``path``, in any format above; ``arch`` (optional): the architecture they
    must be for (a file that names another one is refused, naming both)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if _is_project_checkpoint(path):
        weights = _project_checkpoint(path)
    else:
        weights = _published(path, _load_safely(path))
    if arch and weights.arch and arch != weights.arch:
        raise ValueError(
            f"{str(path)!r} holds a {weights.arch} ({weights.format}), not --arch {arch}: "
            f"pass --arch {weights.arch}"
        )
    return weights


def _is_project_checkpoint(path: Path) -> bool:
    """A ``checkpoint.save_atomic`` file: its pickle (read as bytes, not run) names the keys
    ``format_version`` and ``classes`` that every checkpoint of this project holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            data = archive.read(pickle) if pickle else b""
    except (zipfile.BadZipFile, OSError):
        return False
    return b"format_version" in data and b"classes" in data


def _project_checkpoint(path: Path) -> Weights:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    return Weights(
        state=_strip_module_prefix(ckpt["model"]),
        format="augmix-gpu checkpoint",
        arch=config.get("arch"),
        normalization=config.get("normalization") or IMAGENET_NORMALIZATION,
    )


def _load_safely(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{str(path)!r} cannot be read as weights with weights_only=True ({reason}): expected "
            "a state dict, an official AugMix checkpoint or a checkpoint of this project"
        ) from e


def _published(path: Path, raw: Any) -> Weights:
    """An official AugMix checkpoint (``state_dict`` inside) or a bare state dict."""
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, not a state dict")
    official = "state_dict" in raw
    state = _strip_module_prefix(raw["state_dict"] if official else raw)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{str(path)!r} is not a state dict: {bad[0]!r} is not a tensor")
    cifar = official and raw.get("dataset") in ("cifar10", "cifar100")
    if cifar and raw.get("model") != "wrn":
        raise ValueError(
            f"{str(path)!r} is a cifar.py checkpoint of a {raw.get('model')!r} network: of "
            "cifar.py's networks only its Wide ResNet ('wrn') is built here"
        )
    arch = raw.get("model") if official and not cifar else None
    if any(_OFFICIAL_WRN_BLOCK.match(k) for k in state):
        state, arch = official_wrn_to_ours(state)
    fmt = "AugMix cifar.py checkpoint" if cifar else (
        "AugMix imagenet.py checkpoint" if official else "state dict")  # fmt: skip
    norm = CIFAR_PY_NORMALIZATION if cifar else IMAGENET_NORMALIZATION if official else None
    return Weights(state=state, format=fmt, arch=arch, normalization=norm)


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``nn.DataParallel`` / DDP save every key as ``module.<name>``."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def official_wrn_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The official cifar.py Wide ResNet's keys -> ``models.WideResNet``'s, and its
    ``wrn<depth>_<width>`` name (blocks per group and the first group's width, read off the keys)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = _OFFICIAL_WRN_BLOCK.fullmatch(key)
        if block:
            group, index, rest = int(block[1]) - 1, block[2], block[3]
            key = f"groups.{group}.{index}.{rest.replace('convShortcut.', 'shortcut.')}"
        elif key.startswith("bn1."):  # the final BatchNorm (the blocks' bn1 are inside groups.)
            key = "bn." + key.removeprefix("bn1.")
        out[key] = value
    blocks = {int(m[2]) for k in state if (m := _OFFICIAL_WRN_BLOCK.fullmatch(k)) and m[1] == "1"}
    width = out["groups.0.0.conv1.weight"].shape[0] // 16
    return out, f"wrn{6 * len(blocks) + 4}_{width}"
