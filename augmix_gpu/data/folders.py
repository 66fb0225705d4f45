"""ImageFolder-compatible listing of `root/<class>/<file>` trees: names only, no file is opened.

Why listing only: reading a header per file at startup costs ~36 us each on a warm local disk,
~46 s per rank for ImageNet's 1.28M training files (minutes to hours on a network filesystem), on
every rank at once. What a file holds is found out when its bytes are read for decoding anyway:
the train crop windows are sized from those bytes (`crops.encoded_size`), and a file DALI cannot
decode is named at batch time (`loader.py`, `on_corrupt`). So a PNG named `.JPEG` (ImageNet has
one), a CMYK or greyscale JPEG are accepted whatever the extension says, as DALI decodes them.

The order is exactly torchvision's `ImageFolder`: sorted class folder names -> label index; files
sorted within each class; `os.walk` with symlinks followed. Structural problems (missing root, no
or empty classes, a non-image file in a class folder) are a `DatasetError` naming the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS; every one of these DALI's decoders can read.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """The dataset on disk is not usable as given; the message names the path and the fix."""


def find_classes(root: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """Sorted class folder names and their indices, exactly as `ImageFolder.find_classes`."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(
            f"dataset root {str(root)!r} does not exist: pass the folder that holds one "
            "sub-folder per class (root/<class>/<image>)"
        )
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {str(root)!r} is a file, expected a folder of class folders"
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(
            f"no class folders in {str(root)!r}: expected root/<class>/<image> "
            "(ImageNet layout); did you point at a class folder instead of its parent?"
        )
    return classes, {name: i for i, name in enumerate(classes)}


def _list_class(class_dir: str) -> list[str]:
    """The image files under one class folder in ImageFolder order (`sorted(os.walk(...))`).

    `os.walk` reads the file type from the directory entry (no stat per file on local disks).
    """
    paths: list[str] = []
    for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        fnames.sort()
        prefix = os.path.join(dirpath, "")
        images = [prefix + name for name in fnames if name.lower().endswith(IMG_EXTENSIONS)]
        paths.extend(images)
        if len(images) == len(fnames):  # the common case: nothing else in the folder
            continue
        for name in fnames:
            if not name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                # hidden files (.DS_Store) are ignored
                path = prefix + name
                ext = os.path.splitext(name)[1].lower()
                raise DatasetError(
                    f"{path!r} is not an image (extension {ext or 'none'!r}; expected one of "
                    f"{', '.join(IMG_EXTENSIONS)}): move it out of the class folder"
                )
    return paths


def list_images(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """`(paths, labels int64 [N])` in `ImageFolder` order; lists names, opens no file.

    `classes` (e.g. the list saved in a checkpoint) fixes the label of each folder name, so a
    -C tree with a subset of the classes maps to the training indices; a folder that is not in
    it is an error. Files whose extension is not an image one are an error too (ImageFolder
    would silently skip them; a stray file in a class folder is almost always a mistake), except
    hidden dot-files such as `.DS_Store`, which are ignored. Whether a file's bytes are an image
    is decided at batch time, by the decoder.
    """
    root = Path(root)
    found, found_idx = find_classes(root)
    if classes is None:
        class_to_idx = found_idx
    else:
        class_to_idx = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in found if c not in class_to_idx]
        if unknown:
            raise DatasetError(
                f"folder(s) {unknown[:5]} in {str(root)!r} are not among the {len(classes)} "
                f"classes given (first: {list(classes)[:3]}): evaluate with the class list the "
                "model was trained with, and remove folders that are not classes"
            )
    paths: list[str] = []
    counts, labels = [], []
    for name in found:  # sorted, as ImageFolder
        class_dir = os.path.join(root, name)
        files = _list_class(class_dir)
        if not files:
            raise DatasetError(
                f"class folder {class_dir!r} holds no image files: add images or remove the "
                "folder (torchvision's ImageFolder refuses empty classes too)"
            )
        paths.extend(files)
        counts.append(len(files))
        labels.append(class_to_idx[name])
    return paths, np.repeat(np.asarray(labels, dtype=np.int64), counts)


def scan_folder(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> list[tuple[str, int]]:
    """`[(path, label)]` in `ImageFolder` order: `list_images` as `ImageFolder.samples` pairs."""
    paths, labels = list_images(root, classes)
    return list(zip(paths, labels.tolist()))


def first_per_class(samples: list[tuple[str, int]], per_class: int | None) -> list[tuple[str, int]]:
    """The first ``per_class`` samples of each label, in the given order (all of them for None):
    the subset the -C and -P makers corrupt when a set is only sampled (the demo's)."""
    if per_class is None:
        return samples
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    taken: dict[int, int] = {}
    out = []
    for path, label in samples:
        if taken.get(label, 0) < per_class:
            out.append((path, label))
            taken[label] = taken.get(label, 0) + 1
    return out
