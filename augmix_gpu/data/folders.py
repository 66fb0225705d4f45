"""ImageFolder-compatible scan of `root/<class>/<file>` trees, validated before DALI starts.

Why: DALI reports a missing or broken file deep inside a worker thread, long after the run began.
We walk the tree once up front, in exactly torchvision's `ImageFolder` order (sorted class folder
names -> label index; files sorted within each class, `os.walk` with symlinks followed), and turn
every problem into a `DatasetError` that names the path and says how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

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


def _header_ok(path: str, ext: str) -> bool:
    """Cheap magic-byte check (12 bytes): catches HTML error pages, empty and renamed files."""
    with open(path, "rb") as f:
        head = f.read(12)
    if ext in (".jpg", ".jpeg"):
        return head[:3] == b"\xff\xd8\xff"
    if ext == ".png":
        return head[:8] == b"\x89PNG\r\n\x1a\n"
    if ext == ".bmp":
        return head[:2] == b"BM"
    if ext in (".tif", ".tiff"):
        return head[:4] in (b"II*\x00", b"MM\x00*")
    if ext in (".ppm", ".pgm"):
        return len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456"
    if ext == ".webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return False


def scan_folder(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    *,
    check_headers: bool = True,
) -> list[tuple[str, int]]:
    """`[(path, label)]` in `ImageFolder` order, every file checked.

    `classes` (e.g. the list saved in a checkpoint) fixes the label of each folder name, so a
    -C tree with a subset of the classes maps to the training indices; a folder that is not in
    it is an error. Files whose extension is not an image one are an error too (ImageFolder
    would silently skip them; a stray file in a class folder is almost always a mistake), except
    hidden dot-files such as `.DS_Store`, which are ignored.
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
    samples: list[tuple[str, int]] = []
    for name in found:  # sorted, as ImageFolder
        label = class_to_idx[name]
        class_dir = os.path.join(root, name)
        n_before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                ext = os.path.splitext(fname)[1].lower()
                if ext not in IMG_EXTENSIONS:
                    if fname.startswith("."):
                        continue
                    raise DatasetError(
                        f"{path!r} is not an image (extension {ext or 'none'!r}; expected one of "
                        f"{', '.join(IMG_EXTENSIONS)}): move it out of the class folder"
                    )
                if check_headers:
                    if os.path.getsize(path) == 0:
                        raise DatasetError(f"{path!r} is empty (0 bytes): delete or re-download it")
                    if not _header_ok(path, ext):
                        raise DatasetError(
                            f"{path!r} has a {ext} extension but its first bytes are not a {ext} "
                            "header (truncated download, HTML page or renamed file?): "
                            "delete or re-download it"
                        )
                samples.append((path, label))
        if len(samples) == n_before:
            raise DatasetError(
                f"class folder {class_dir!r} holds no image files: add images or remove the "
                "folder (torchvision's ImageFolder refuses empty classes too)"
            )
    return samples
