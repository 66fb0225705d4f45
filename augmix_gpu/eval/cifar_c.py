"""CIFAR-10-C / CIFAR-100-C: ImageNet-C's protocol on 32 px arrays, reported unnormalised.

Layout: ``root/<corruption>.npy`` (``[5 x N, 32, 32, 3]`` uint8: the N test images at severity 1,
then 2, ... 5) and one ``root/labels.npy``. There is no AlexNet reference for CIFAR: the headline
is the unnormalised mean corruption error, what the official augmix ``cifar.py`` reports. The cell
loop, the block and the reports are ImageNet-C's (``imagenet_c.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from . import imagenet_c
from .benchmark import Benchmark, Outcome
from .layouts import dataset_error
from .loop import Context
from .settings import DataSettings


def check_cifar_c_layout(root: str | os.PathLike, corruptions: Sequence[str]) -> int:
    """Every ``<corruption>.npy`` and ``labels.npy`` present with matching lengths; returns the
    largest label (headers and the small labels file only)."""
    root = Path(root)
    if not root.is_dir():
        raise dataset_error(
            f"CIFAR-C folder {str(root)!r} does not exist (it holds <corruption>.npy)"
        )
    labels = root / "labels.npy"
    if not labels.is_file():
        raise dataset_error(
            f"missing {str(labels)!r}: pass the extracted CIFAR-10-C / CIFAR-100-C folder"
        )
    label_array = np.load(labels, mmap_mode="r")
    n = label_array.shape[0]
    for c in corruptions:
        path = root / f"{c}.npy"
        if not path.is_file():
            raise dataset_error(
                f"missing {str(path)!r}: re-extract CIFAR-C, or evaluate a subset with --corruptions"
            )
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] != n or shape[0] % 5:
            raise dataset_error(
                f"{str(path)!r} holds {shape[0]} images, labels.npy {n}; expected 5 x N"
            )
    return int(label_array.max()) if n else -1


@dataclass(frozen=True)
class CifarCPlan:
    root: Path
    corruptions: list[str]
    severities: list[int]
    classes: list[str]
    dataset: str  # "CIFAR10-C" | "CIFAR100-C"


def check_layout(root: Path, classes: list[str], options: DataSettings) -> CifarCPlan:
    corrs, sevs = imagenet_c.resolve_cells(root, options)
    top = check_cifar_c_layout(root, corrs)
    if top >= len(classes):
        raise dataset_error(
            f"{root}/labels.npy has label {top} but the model has {len(classes)} classes: "
            f"is --cifar_name {options.cifar_name!r} right?"
        )
    return CifarCPlan(Path(root), corrs, sevs, list(classes), f"{options.cifar_name.upper()}-C")


def evaluate(model: nn.Module, context: Context, plan: CifarCPlan) -> Outcome:
    from ..data import load_cifar_c

    def cell_loader(c: str, s: int):
        arrays = load_cifar_c(plan.root, c, s, classes=plan.classes)
        return context.loader(arrays, "corrupted")

    cells = imagenet_c.evaluate_cells(
        model, context, plan.corruptions, plan.severities, cell_loader
    )
    block = imagenet_c.corruption_block(cells, plan, None, normalise=False, dataset=plan.dataset)
    return Outcome(
        block, cells.images, cells.seconds, preprocessing={"corrupted": "as stored (32x32 arrays)"}
    )


BENCHMARK = Benchmark(
    name="cifar_c",
    title="CIFAR-C",
    help="CIFAR-10-C / CIFAR-100-C folder of <corruption>.npy + labels.npy",
    check_layout=check_layout,
    evaluate=evaluate,
    headline=imagenet_c.headline,
    report_lines=imagenet_c.report_lines,
    compare_lines=imagenet_c.compare_lines,
    pictures=imagenet_c.pictures,
    family="cifar",
)
