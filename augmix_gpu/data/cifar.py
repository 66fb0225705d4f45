"""CIFAR-10/100 and CIFAR-10-C/100-C as in-memory uint8 arrays (read locally, never downloaded).

Formats: torchvision writes `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` and
`cifar-100-python/{train,test,meta}`, pickles whose `data` is `[N, 3072]` uint8 in CHW order.
CIFAR-10-C/100-C (Hendrycks & Dietterich, 2019) ship `<corruption>.npy` `[50000, 32, 32, 3]`
uint8: the 10000 test images at severity 1, then 2, ... 5, and one `labels.npy`.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .folders import DatasetError

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}  # fmt: skip


@dataclass(frozen=True)
class CifarArrays:
    """Images `[N, H, W, 3]` uint8 (HWC, as stored) with int64 labels `[N]` and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {im.dtype} {tuple(im.shape)}")
        if lb.shape != (im.shape[0],):
            raise ValueError(f"labels must be [N={im.shape[0]}], got shape {tuple(lb.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _unpickle(path: Path) -> dict:
    """The pickle's dict with bytes keys: the official files (Python 2 pickles) load with bytes
    keys, files written by Python 3 (our synthetic set) with str keys; both read alike."""
    if not path.is_file():
        raise DatasetError(f"missing {str(path)!r}")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}


def load_cifar(root: str | os.PathLike, name: str = "cifar10", train: bool = True) -> CifarArrays:
    """The train or test split from the pickles under `root` (the folder holding `cifar-10-batches-py`)."""
    if name not in LAYOUT:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    folder, train_files, test_files, meta_file, label_key, names_key = LAYOUT[name]
    base = Path(root) / folder
    if not base.is_dir():
        raise DatasetError(
            f"{str(base)!r} not found: this project never downloads; fetch it once with "
            f"torchvision.datasets.{name.upper()}({str(root)!r}, download=True) on a machine "
            "with network, or pass the folder that contains it"
        )
    try:
        images, labels = [], []
        for fname in train_files if train else test_files:
            d = _unpickle(base / fname)
            images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(d[label_key])
        meta = _unpickle(base / meta_file)
    except DatasetError as e:
        raise DatasetError(
            f"incomplete {name} folder {str(base)!r}: {e}; re-extract the archive"
        ) from None
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    hwc = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    return CifarArrays(hwc, np.asarray(labels, dtype=np.int64), classes)


def load_cifar_c(
    root: str | os.PathLike, corruption: str, severity: int, classes: list[str] | None = None
) -> CifarArrays:
    """The 10000 images of one corruption at one severity (1-5) from CIFAR-10-C/100-C `.npy` files."""
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    root = Path(root)
    path, labels_path = root / f"{corruption}.npy", root / "labels.npy"
    for p in (path, labels_path):
        if not p.is_file():
            raise DatasetError(
                f"missing {str(p)!r}: pass the extracted CIFAR-10-C / CIFAR-100-C folder "
                "(it holds <corruption>.npy and labels.npy)"
            )
    data = np.load(path, mmap_mode="r")
    labels = np.load(labels_path)
    # The official files hold 5 x 10000; derive the block size so small fixtures work too.
    if data.shape[0] % 5 or labels.shape[0] != data.shape[0]:
        raise DatasetError(
            f"{str(path)!r} holds {data.shape[0]} images and labels.npy {labels.shape[0]} labels; "
            "expected the same count, 5 severities stacked (5 x 10000 for the official files)"
        )
    per = data.shape[0] // 5
    lo, hi = (int(severity) - 1) * per, int(severity) * per
    images = np.ascontiguousarray(data[lo:hi], dtype=np.uint8)
    n_classes = int(labels.max()) + 1
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    return CifarArrays(images, np.asarray(labels[lo:hi], dtype=np.int64), names)


def check_cifar_c_labels(root: str | os.PathLike, num_classes: int, name: str = "cifar") -> None:
    """Fail when `root/labels.npy` cannot belong to a `num_classes` model (cheap: one small file).

    Catches the swap the evaluation could not see: CIFAR-10-C's labels (0-9) are all valid
    indices of a CIFAR-100 model, so the run would report a meaningless error.
    """
    path = Path(root) / "labels.npy"
    if not path.is_file():
        raise DatasetError(
            f"missing {str(path)!r}: pass the extracted CIFAR-10-C / CIFAR-100-C folder "
            "(it holds <corruption>.npy and labels.npy)"
        )
    found = len(np.unique(np.load(path)))
    if found != num_classes:
        raise DatasetError(
            f"{str(path)!r} holds {found} classes but the {name} model has {num_classes}: "
            "pass the -C set of the same dataset (CIFAR-10-C for cifar10, CIFAR-100-C for cifar100)"
        )
