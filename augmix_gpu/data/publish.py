"""Generated data sets appear whole or not at all: one way to start, finish and reuse them.

Every generator here (the synthetic set, -C, CIFAR-C, -P, the held-out split) writes into a
temporary folder beside its output and renames it into place with a ``.complete`` marker holding
its parameters. A finished set with the same parameters is reused; anything else at the output is
an error unless ``overwrite`` (a half-written set from an interrupted run is redone). Two
processes that make the same set at once (two trainings sharing a cache) both succeed: the second
rename finds the first one's finished set and keeps it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .folders import DatasetError

MARKER = ".complete"


def is_complete(out: str | os.PathLike, params: dict | None = None) -> bool:
    """True when ``out`` holds a finished set (marker present and, if given, the same parameters)."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    return params is None or json.loads(marker.read_text()) == params


def begin(out: Path, params: dict, overwrite: bool, what: str) -> Path | None:
    """None when ``out`` already holds this finished set; else a fresh temporary folder beside it.

    ``what`` names the kind of set in the error ("-C set", ...).
    """
    if is_complete(out, params):
        return None
    if out.exists():
        if not overwrite:
            raise DatasetError(
                f"{str(out)!r} exists but is not a finished {what} made with these parameters: "
                "delete it, choose another folder, or pass overwrite=True (--overwrite)"
            )
        shutil.rmtree(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish(tmp: Path, out: Path, params: dict) -> Path:
    """Mark ``tmp`` finished and rename it to ``out`` (atomic on one filesystem)."""
    (tmp / MARKER).write_text(json.dumps(params))
    try:
        os.replace(tmp, out)
    except OSError:  # ``out`` appeared meanwhile: another process made the same set
        if not is_complete(out, params):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
