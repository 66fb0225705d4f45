"""ImageNet-V2 (Recht et al., ICML 2019, "Do ImageNet Classifiers Generalize to ImageNet?").

A new test set of 10,000 images (10 per class) collected by ImageNet's own protocol; the usual
variant is MatchedFrequency. Released as ``imagenetv2-matched-frequency-format-val/<i>/<hash>.jpeg``
with folders named by the class's index ``0``..``999`` in the sorted wnid list (modestyachts/
ImageNetV2), so folder ``i`` holds class ``i`` of the model's (sorted-wnid) class list. Reading it
with a plain ImageFolder would sort the names as strings ("0", "1", "10", "100", ...) and mislabel
almost every class (modestyachts/ImageNetV2 issue #6); the labels here are the integers.

Plain top-1 / top-5 error, NLL and calibration over every image, resize 256 + centre crop 224 as
clean val.
"""

from __future__ import annotations

from pathlib import Path

from .folder_benchmarks import FolderPlan, folder_benchmark
from .layouts import check_not_empty, check_root, class_folder_names, dataset_error
from .settings import DataSettings

LAYOUT = "<class index>/<image> (e.g. imagenetv2-matched-frequency-format-val)"


def check_layout(root: Path, classes: list[str], options: DataSettings) -> FolderPlan:
    """Every folder is a class index ``0``..``len(classes) - 1`` (written as ``str(i)``) and holds
    images; folder ``str(i)`` holds label ``i``."""
    root = check_root(root, "ImageNet-V2", LAYOUT)
    names = [str(i) for i in range(len(classes))]
    known = set(names)
    folders = class_folder_names(root, LAYOUT)
    bad = [f for f in folders if f not in known]
    if bad:
        raise dataset_error(
            f"folder(s) {bad[:5]} in {str(root)!r} are not class indices 0..{len(classes) - 1} of "
            f"the model's {len(classes)} classes: ImageNet-V2 names each class folder by the "
            "class's index in the sorted wnid list; pass the released *-format-val folder"
        )
    for f in folders:
        check_not_empty(root / f)
    labels = f"folder i holds class i of the model's {len(classes)}"
    return FolderPlan(
        "imagenet_v2",
        "ImageNet-V2",
        root,
        names,
        None,
        labels,
        "as clean val; modestyachts/ImageNetV2",
    )


BENCHMARK = folder_benchmark(
    "imagenet_v2",
    "ImageNet-V2",
    "ImageNet-V2 root: <class index 0..999>/<image> (imagenetv2-*-format-val)",
    check_layout,
)
