"""The clean evaluation, first of every run: an ImageNet-layout val folder or the CIFAR test split.

Its error is what relative mCE subtracts (``Context.clean_error``), so it runs before the
benchmarks. Val images are resized (shorter side ``resize_size``) and centre-cropped
(``crop_size``); CIFAR arrays are read as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .benchmark import Outcome
from .layouts import dataset_error
from .loop import Context
from .settings import DataSettings


def evaluate_clean(
    model: nn.Module, context: Context, classes: Sequence[str], data: DataSettings
) -> Outcome | None:
    """The ``clean`` block (``EvalResult.summary``) of ``data.val`` or ``data.cifar``; None if
    neither is given."""
    from ..data import load_cifar

    if data.val:
        loader = context.loader(data.val, "val", classes=list(classes))
        read = f"resize shorter side {context.resize_size} + centre crop {context.crop_size}"
    elif data.cifar:
        arrays = load_cifar(data.cifar, data.cifar_name, train=False)
        _check_cifar_classes(arrays.classes, classes, data.cifar)
        loader = context.loader(arrays, "val")
        read = "as stored (32x32 arrays)"
    else:
        return None
    r = context.count(model, loader, desc="clean")
    return Outcome(r.summary(), r.n, r.seconds, preprocessing={"clean": read})


def _check_cifar_classes(found: Sequence[str], classes: Sequence[str], root: Any) -> None:
    if list(found) != list(classes):
        raise dataset_error(
            f"the CIFAR classes in {str(root)!r} ({list(found)[:3]}..., {len(found)}) differ from the "
            f"model's ({list(classes)[:3]}..., {len(classes)}): check --cifar_name"
        )
