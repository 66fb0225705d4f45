"""The model to evaluate: a checkpoint of this project, or published weights (``--pretrained``).

A checkpoint carries its class list (label order) and training config (arch, crop size, op set,
input normalisation). ``--pretrained`` reads any format ``weights.load_weights`` knows (a
torchvision state dict, an official AugMix imagenet.py / cifar.py checkpoint, a checkpoint of this
project); such files carry no class list, so their labels are the sorted class folders of a data
folder (torchvision's ImageNet index order is the sorted wnids) or CIFAR's class list, and a head
of the wrong size is refused before it could be silently replaced by a random one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .settings import ModelSource

OPS_DESCRIPTION = {
    False: "paper's 9 ops (no overlap with ImageNet-C)",
    True: "all 13 ops: adds color, contrast, brightness, sharpness, which overlap ImageNet-C",
}


@dataclass(frozen=True)
class ModelCard:
    """What an evaluation needs to know of a trained model: its architecture and image sizes,
    and how it was augmented. The fields are the training settings of the same names, read from
    the flat settings a checkpoint stores (a field it lacks stays None)."""

    arch: str | None = None
    aug_type: str | None = None
    all_ops: bool | None = None
    aug_ops: list[str] | None = None  # a subset drawn instead (--aug_ops); [] or None: none
    crop_size: int | None = None
    val_resize: int | None = None
    normalization: str | None = None  # None (a checkpoint from before the setting): ImageNet's

    @classmethod
    def from_settings(cls, flat: Mapping[str, Any]) -> ModelCard:
        """The card of the flat ``{setting: value}`` a run saved (``Settings.to_dict()``)."""
        return cls(**{f.name: flat[f.name] for f in fields(cls) if f.name in flat})


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    classes: list[str]  # label i is classes[i]
    card: ModelCard
    info: dict[str, Any]  # what was evaluated, for results["model"] (describe_model)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_model(card: ModelCard, weights_path: str | os.PathLike | None, **extra: Any) -> dict:
    """What was evaluated: arch, weights file + SHA-256, and the op set it was trained with."""
    info = {
        "arch": card.arch,
        "weights": str(weights_path) if weights_path else None,
        "sha256": file_sha256(weights_path) if weights_path else None,
        "aug_type": card.aug_type,
        "all_ops": card.all_ops,
        "ops": (
            "only " + ", ".join(card.aug_ops)
            if card.aug_ops
            else OPS_DESCRIPTION.get(card.all_ops, "unknown (not recorded in the checkpoint)")
        ),
    }
    info.update(extra)
    return info


def load_model(
    source: ModelSource, device: str | torch.device = "cpu", *, classes: list[str] | None = None
) -> LoadedModel:
    """``source.ckpt_path`` or ``source.pretrained`` (exactly one); ``classes``: ``--pretrained``'s
    label order (the class folders of the clean val folder, say)."""
    if bool(source.ckpt_path) == bool(source.pretrained):
        raise ValueError("pass exactly one of --ckpt_path or --pretrained")
    if source.ckpt_path:
        return load_checkpoint_model(source.ckpt_path, device)
    if not classes:
        raise ValueError("--pretrained needs a class list (a folder of class folders, or CIFAR's)")
    return load_pretrained(source.pretrained, source.arch, classes, device)


def load_checkpoint_model(path: str | os.PathLike, device: str | torch.device) -> LoadedModel:
    """The model of a checkpoint of this project (``checkpoint.save_atomic``), in eval mode."""
    from ..checkpoint import load_checkpoint
    from ..models import build_model

    state = load_checkpoint(path)
    card = ModelCard.from_settings(state.get("config", {}))
    classes = state.get("classes")
    if not classes:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no class list; it cannot map folders to labels"
        )
    model = build_model(card.arch or "resnet50", num_classes=len(classes))
    model.load_state_dict(state["model"])
    info = describe_model(card, path, name=Path(path).stem)
    return LoadedModel(model.to(device).eval(), list(classes), card, info)


def load_pretrained(
    pretrained: str, arch: str | None, classes: list[str], device: str | torch.device
) -> LoadedModel:
    """Published weights (a file in any format ``weights.load_weights`` reads, or a cached
    torchvision weights name) for ``arch`` (None: the one the file names, else resnet50), with
    ``classes`` as its label order; a head of another size is refused."""
    from ..models import build_model, pretrained_weights

    weights = pretrained_weights(arch, pretrained)
    arch = arch or weights.arch or "resnet50"
    model = build_model(arch, len(classes))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.state.items()}
    # Shapes only: old torchvision files lack BatchNorm's num_batches_tracked, which loads fine.
    diff = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if diff:
        raise ValueError(
            f"--pretrained {pretrained} ({weights.format}) does not match --arch {arch} with "
            f"{len(classes)} classes (differs at {diff[:3]}): evaluate on the dataset and "
            "architecture the weights were trained for"
        )
    model.load_state_dict(weights.state)
    card = ModelCard(arch=arch, normalization=weights.normalization)
    path = Path(pretrained) if Path(pretrained).is_file() else None
    info = describe_model(card, path, name=arch, format=weights.format)
    return LoadedModel(model.to(device).eval(), classes, card, info)
