"""Layout checks for ImageNet-C, CIFAR-C and ImageNet-P trees, run before the first image is read.

A typo in a path should cost seconds, not a night of evaluation: every check here lists folders
only (no decoding) and raises a ``DatasetError`` that names the path and says what to do.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import protocols


def dataset_error(message: str) -> Exception:
    from ..data import DatasetError

    return DatasetError(message)


def check_names(names: Sequence[str], known: Sequence[str], what: str) -> None:
    """A ``ValueError`` for the first name not in ``known``, with the closest spellings."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown {what} {name!r}{hint}: expected some of {list(known)}")


def default_corruptions(root: str | os.PathLike) -> list[str]:
    """The 15 corruptions, plus each of the 4 extras whose folder (or .npy) is present."""
    root = Path(root)
    extras = [
        c
        for c in protocols.EXTRA_CORRUPTIONS
        if (root / c).is_dir() or (root / f"{c}.npy").is_file()
    ]
    return [*protocols.CORRUPTIONS, *extras]


def default_perturbations(root: str | os.PathLike) -> list[str]:
    """The 10 perturbations, plus each of the 4 validation ones whose folder is present."""
    root = Path(root)
    return [
        *protocols.PERTURBATIONS,
        *[p for p in protocols.EXTRA_PERTURBATIONS if (root / p).is_dir()],
    ]


def present_perturbations(root: str | os.PathLike) -> list[str]:
    """The perturbations (of the 14) whose folder exists: what train.py's end-of-run evaluation
    reads from a given tree (fewer than the 10 is reported as partial)."""
    root = Path(root)
    if not root.is_dir():
        raise dataset_error(f"ImageNet-P root {str(root)!r} is not a folder (--imagenet_p)")
    found = [
        p for p in (*protocols.PERTURBATIONS, *protocols.EXTRA_PERTURBATIONS) if (root / p).is_dir()
    ]
    if not found:
        present = sorted(x.name for x in root.iterdir() if x.is_dir())
        raise dataset_error(
            f"{str(root)!r} holds no perturbation folder (found {present[:20]}): expected some of "
            f"{list(protocols.PERTURBATIONS)}"
        )
    return found


def _check_class_folders(
    folder: Path, known: set[str] | None, extensions: tuple[str, ...] | None, what: str
) -> None:
    """``folder`` holds class folders, each known to the model and holding at least one file."""
    class_dirs = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not class_dirs:
        raise dataset_error(
            f"empty folder {str(folder)!r}: expected one sub-folder per class ({what}); "
            "re-extract the archive"
        )
    if known is not None:
        unknown = [d for d in class_dirs if d not in known]
        if unknown:
            raise dataset_error(
                f"class folder(s) {unknown[:5]} in {str(folder)!r} are not among the model's "
                f"{len(known)} classes (first: {sorted(known)[:3]}): evaluate with the "
                "checkpoint the data belongs to, or remove folders that are not classes"
            )
    for d in class_dirs:
        with os.scandir(folder / d) as it:
            files = [e for e in it if e.is_file() and not e.name.startswith(".")]
        if extensions is not None:
            files = [e for e in files if e.name.lower().endswith(extensions)]
        if not files:
            kind = "videos (" + ", ".join(extensions) + ")" if extensions else "images"
            raise dataset_error(
                f"empty class folder {str(folder / d)!r}: it holds no {kind}; "
                "re-extract it or remove the folder"
            )
        for e in files:
            if extensions is not None and e.stat().st_size == 0:
                raise dataset_error(f"empty video {e.path!r} (0 bytes): re-extract or delete it")


def check_c_layout(
    root: str | os.PathLike,
    corruptions: Sequence[str],
    severities: Sequence[int],
    classes: Sequence[str] | None,
) -> None:
    """Raise a ``DatasetError`` naming the path for the first structural problem of a -C tree.

    Checks ``root/<corruption>/<severity>/<class>/<image>``: every requested corruption and severity
    folder exists, holds class folders, each class folder is one of ``classes`` (the checkpoint's)
    and holds at least one file. Cheap (directory listings only); the per-file header scan happens
    when each loader is built.
    """
    root = Path(root)
    if not root.is_dir():
        raise dataset_error(
            f"ImageNet-C root {str(root)!r} is not a folder: pass the folder that holds "
            "<corruption>/<severity>/<class>/<image> (e.g. .../ImageNet-C)"
        )
    known = set(classes) if classes is not None else None
    for c in corruptions:
        cdir = root / c
        if not cdir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise dataset_error(
                f"missing corruption folder {str(cdir)!r} (found {present[:20]}): download/extract "
                f"it, or evaluate a subset with --corruptions (reported as partial, not as mCE)"
            )
        for s in severities:
            sdir = cdir / str(int(s))
            if not sdir.is_dir():
                raise dataset_error(
                    f"missing severity folder {str(sdir)!r}: ImageNet-C holds severities 1-5 per "
                    "corruption; re-extract it, or pass --severities (reported as partial)"
                )
            _check_class_folders(sdir, known, None, "<corruption>/<severity>/<class>/<image>")


def check_p_layout(
    root: str | os.PathLike,
    perturbations: Sequence[str],
    difficulties: Sequence[int],
    classes: Sequence[str] | None,
) -> dict[tuple[str, int], Path]:
    """Check ``root/<perturbation>[_<difficulty>]/<class>/<name>.mp4``; return each folder.

    The ``_<difficulty>`` suffix exists for the noise perturbations only (difficulty 1 has none);
    the others are read from the one folder at every difficulty, which sets the comparison step
    (hendrycks/robustness ImageNet-P/test.py).
    """
    from ..data.video import VIDEO_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise dataset_error(
            f"ImageNet-P root {str(root)!r} is not a folder: pass the folder that holds "
            "<perturbation>[_<difficulty>]/<class>/<name>.mp4 (e.g. .../ImageNet-P)"
        )
    known = set(classes) if classes is not None else None
    folders = {}
    for p in perturbations:
        for d in difficulties:
            folder = root / protocols.perturbation_folder(p, int(d))
            if not folder.is_dir():
                present = sorted(x.name for x in root.iterdir() if x.is_dir())
                raise dataset_error(
                    f"missing perturbation folder {str(folder)!r} (found {present[:20]}): "
                    "download/extract it, or evaluate a subset with --perturbations / "
                    "--p_difficulties (reported as partial, not as mFR)"
                )
            if folder not in folders.values():
                _check_class_folders(
                    folder, known, VIDEO_EXTENSIONS, "<perturbation>/<class>/<name>.mp4"
                )
            folders[(p, int(d))] = folder
    return folders


def check_cifar_c_layout(root: str | os.PathLike, corruptions: Sequence[str]) -> None:
    """Every ``<corruption>.npy`` and ``labels.npy`` present with matching lengths."""
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
    n = np.load(labels, mmap_mode="r").shape[0]
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
