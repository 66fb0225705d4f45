"""ImageNet-Sketch (Wang et al., NeurIPS 2019, "Learning Robust Global Representations by
Penalizing Local Predictive Power"): black-and-white sketches of the 1000 classes.

About 50,000 images, 50 per class (Google Image results for "sketch of <class>", black and
white, cleaned by hand; HaohanWang/ImageNet-Sketch), released as ``sketch/<wnid>/<image>``. Plain top-1 / top-5 error, NLL and calibration over
every image, resize 256 + centre crop 224 as clean val; each folder is one of the model's classes.
"""

from __future__ import annotations

from pathlib import Path

from .folder_benchmarks import FolderPlan, folder_benchmark
from .layouts import check_class_folders, check_root
from .settings import DataSettings


def check_layout(root: Path, classes: list[str], options: DataSettings) -> FolderPlan:
    root = check_root(root, "ImageNet-Sketch", "<wnid>/<image> (the released sketch/ folder)")
    check_class_folders(root, set(classes), None, "<wnid>/<image>")
    labels = f"folder = one of the model's {len(classes)} classes"
    return FolderPlan(
        "imagenet_sketch", "ImageNet-Sketch", root, list(classes), None, labels, "as clean val"
    )


def class_folder(root: Path, options: DataSettings) -> Path:
    """The released set holds a folder for each of the 1000 classes (``--pretrained``)."""
    return Path(root)


BENCHMARK = folder_benchmark(
    "imagenet_sketch",
    "ImageNet-Sketch",
    "ImageNet-Sketch root: <wnid>/<image> (the released sketch/ folder)",
    check_layout,
    class_folder=class_folder,
)
