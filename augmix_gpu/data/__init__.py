"""Data layer: one DALI pipeline builder (train / val / corrupted), sharded seeded epochs,
ImageFolder-compatible validation, CIFAR arrays (and a device-resident CIFAR loader), an embedded
synthetic task, -C and -P makers, and the ImageNet-P sequence reader (`sequences.py`, `video.py`).

Importing this package does not import DALI, imagecorruptions or touch CUDA: pipelines are built
inside `DaliLoader.epoch()`, corruptions are imported when a -C set is written.
"""

from .cifar import CifarArrays, load_cifar, load_cifar_c
from .folders import IMG_EXTENSIONS, DatasetError, find_classes, list_images, scan_folder
from .loader import DaliLoader, build_loader
from .make_c import CORRUPTIONS, EXTRA_CORRUPTIONS, make_corrupted_dataset
from .make_p import make_perturbed_dataset
from .resident import ResidentLoader, pad_crop_flip
from .synthetic import make_synthetic_dataset

__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "IMG_EXTENSIONS",
    "CifarArrays",
    "DaliLoader",
    "DatasetError",
    "ResidentLoader",
    "build_loader",
    "find_classes",
    "list_images",
    "load_cifar",
    "load_cifar_c",
    "make_corrupted_dataset",
    "make_perturbed_dataset",
    "make_synthetic_dataset",
    "pad_crop_flip",
    "scan_folder",
]
