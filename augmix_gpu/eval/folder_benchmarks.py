"""Benchmarks that are one folder of labelled images, read as clean val is: ImageNet-R, -A, -V2,
-Sketch (one module each; what they share is here).

Every image is resized (shorter side ``--resize_size``, 256) and centre-cropped (``--crop_size``,
224), as clean val and as the official eval scripts do (torchvision ``Resize(256)``,
``CenterCrop(224)``), and counted by the one loop: top-1 / top-5 error, NLL and calibration over
every image, all ranks summed. What differs is the :class:`FolderPlan` a module's
``check_layout`` returns:

- ``folder_classes``: the folder holding label ``i`` is named ``folder_classes[i]`` (the model's
  wnids; ImageNet-V2's class indices ``"0"``..``"999"``);
- ``scored``: the model's classes whose logits are scored, in label order. ImageNet-R and -A hold
  200 of the 1000 classes and are scored on the model's logits at those 200, as their official
  eval code does (``output[:, indices_in_1k]``): top-1 over the subset, softmax over the subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .benchmark import Benchmark, Outcome, fmt
from .layouts import check_not_empty, check_root, class_folder_names, dataset_error
from .loop import Context


@dataclass(frozen=True)
class FolderPlan:
    """What a folder benchmark reads, and how its folders and logits map to labels."""

    name: str  # the benchmark's name (results key)
    title: str  # "ImageNet-R"
    root: Path
    folder_classes: list[str]  # label i <- the folder named folder_classes[i]
    scored: list[int] | None  # the model's class indices scored, in label order (None: all)
    labels: str  # how the labels were read, for the block
    source: str  # whose preprocessing this follows, for the record


class ScoredLogits(nn.Module):
    """The model's logits at ``indices`` only (``[B, len(indices)]``): a subset's classifier."""

    def __init__(self, model: nn.Module, indices: Sequence[int], device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.as_tensor(indices, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).index_select(1, self.indices)


def check_subset_layout(
    root: Path, classes: list[str], official: Sequence[str], title: str, name: str, source: str
) -> FolderPlan:
    """A 200-class subset released as ``root/<wnid>/<image>`` (ImageNet-R, -A).

    A model whose classes include the ``official`` wnids is an ImageNet-1k model: every folder
    must be one of them, and the official classes are scored (all of them, whichever folders are
    present, as the official mask is fixed). Any other model (tests, the embedded task): every
    folder must be one of its classes, and the folders present are scored.
    """
    root = check_root(root, title, f"<wnid>/<image> ({len(official)} class folders)")
    folders = class_folder_names(root, "<wnid>/<image>")
    imagenet = set(official) <= set(classes)
    allowed = set(official) if imagenet else set(classes)
    unknown = [f for f in folders if f not in allowed]
    if unknown:
        among = (
            f"{title}'s {len(official)} classes (the official list)"
            if imagenet
            else f"the model's {len(classes)} classes (first: {list(classes)[:3]})"
        )
        raise dataset_error(
            f"class folder(s) {unknown[:5]} in {str(root)!r} are not among {among}: pass the "
            f"released {title} folder, and evaluate with the checkpoint it belongs to"
        )
    for f in folders:
        check_not_empty(root / f)
    keep = allowed if imagenet else set(folders)
    subset = [c for c in classes if c in keep]  # the model's order: label i = subset[i]
    index = {c: i for i, c in enumerate(classes)}
    labels = (
        f"the {len(subset)} {title} classes of the official list"
        if imagenet
        else f"the {len(subset)} class folders present, among the model's {len(classes)}"
    )
    return FolderPlan(name, title, root, subset, [index[c] for c in subset], labels, source)


def evaluate(model: nn.Module, context: Context, plan: FolderPlan) -> Outcome:
    loader = context.loader(plan.root, "val", classes=plan.folder_classes)
    scored = model
    if plan.scored is not None:
        scored = ScoredLogits(model, plan.scored, context.env.device)
    r = context.count(scored, loader, desc=plan.name)
    block = {
        "dataset": plan.title,
        "root": str(plan.root),
        "classes": len(plan.folder_classes),
        "labels": plan.labels,
        **r.summary(),
    }
    read = (
        f"resize shorter side {context.resize_size} + centre crop {context.crop_size} "
        f"({plan.source})"
    )
    return Outcome(block, r.n, r.seconds, preprocessing={plan.name: read})


# --- reports (from the block alone) -------------------------------------------------------------


def headline(block: dict) -> dict[str, float | None]:
    return {f"{block['dataset']} error": block.get("error")}


def report_lines(block: dict) -> list[str]:
    return [
        "",
        f"{block['dataset']} ({block['n']} images; {block['labels']}): top-1 error "
        f"{fmt(block.get('error'))} %, top-5 error {fmt(block.get('top5_error'))} %, NLL "
        f"{fmt(block.get('nll'), 3)}, RMS calib. error {fmt(block.get('rms_calibration_error'))} "
        f"%, ECE {fmt(block.get('ece'))} %.",
    ]


def folder_benchmark(name: str, title: str, help: str, check_layout: Any, **kw: Any) -> Benchmark:
    """A folder benchmark: its own layout check, the shared evaluation and reports."""
    return Benchmark(
        name=name, title=title, help=help, check_layout=check_layout, evaluate=evaluate,
        headline=headline, report_lines=report_lines, **kw,
    )  # fmt: skip
