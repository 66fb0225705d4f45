"""Checks the benchmarks share, run before the first image is read: names and class folders.

A typo in a path should cost seconds, not a night of evaluation: every check lists folders only
(no decoding) and raises a ``DatasetError`` that names the path and says what to do. The checks of
one benchmark's own tree live in its module (``imagenet_c.check_c_layout``, ...).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path


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


def check_root(root: str | os.PathLike, title: str, layout: str) -> Path:
    """``root`` as a Path, or a ``DatasetError`` saying it is not a folder and what it must hold."""
    root = Path(root)
    if not root.is_dir():
        raise dataset_error(
            f"{title} root {str(root)!r} is not a folder: pass the folder that holds {layout}"
        )
    return root


def class_folder_names(folder: str | os.PathLike, what: str) -> list[str]:
    """The sorted sub-folder names of ``folder``; a ``DatasetError`` when there are none."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not names:
        raise dataset_error(
            f"empty folder {str(folder)!r}: expected one sub-folder per class ({what}); "
            "re-extract the archive"
        )
    return names


def check_class_folders(
    folder: Path, known: set[str] | None, extensions: tuple[str, ...] | None, what: str
) -> None:
    """``folder`` holds class folders, each known to the model and holding at least one file."""
    class_dirs = class_folder_names(folder, what)
    if known is not None:
        unknown = [d for d in class_dirs if d not in known]
        if unknown:
            raise dataset_error(
                f"class folder(s) {unknown[:5]} in {str(folder)!r} are not among the model's "
                f"{len(known)} classes (first: {sorted(known)[:3]}): evaluate with the "
                "checkpoint the data belongs to, or remove folders that are not classes"
            )
    for d in class_dirs:
        check_not_empty(folder / d, extensions)


def check_not_empty(class_dir: Path, extensions: tuple[str, ...] | None = None) -> None:
    """A class folder holds at least one (non-hidden) file, or one video of ``extensions``."""
    with os.scandir(class_dir) as it:
        files = [e for e in it if e.is_file() and not e.name.startswith(".")]
    if extensions is not None:
        files = [e for e in files if e.name.lower().endswith(extensions)]
    if not files:
        kind = "videos (" + ", ".join(extensions) + ")" if extensions else "images"
        raise dataset_error(
            f"empty class folder {str(class_dir)!r}: it holds no {kind}; "
            "re-extract it or remove the folder"
        )
    for e in files:
        if extensions is not None and e.stat().st_size == 0:
            raise dataset_error(f"empty video {e.path!r} (0 bytes): re-extract or delete it")
