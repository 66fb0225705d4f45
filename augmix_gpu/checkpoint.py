"""Checkpoint files that survive the faults of a long run: killed processes, full disks, bad files.

Writing (:func:`save_atomic`): ``torch.save`` into a temporary file beside the target, fsync it,
move the current file to ``<stem>.prev<suffix>`` (the last two are kept), rename the temporary
file over the target, then fsync the folder (a file's fsync does not make its rename durable). A
process killed at any point leaves the target, or its previous copy, complete; the next save
removes the orphaned temporary file. A failed write (a full disk) removes its temporary file and
raises :class:`CheckpointWriteError` naming the folder; the files already there are untouched.

Reading (:func:`load_checkpoint`): the zip records ``torch.save`` writes carry CRC-32s that
``torch.load`` never checks, so a flipped byte in a tensor loads silently as a wrong weight. They
are checked first: a truncated or garbled file raises :class:`CorruptCheckpointError` naming it,
and :func:`load_latest` falls back to the previous copy. Then ``torch.load(weights_only=True)``:
unpickling may call any importable function a file names, so opening someone else's checkpoint
(``evaluate.py --ckpt_path``, ``--resume``) could run their code. Only tensors, numbers, strings
and containers are accepted; a file that needs more raises :class:`UnsafeCheckpointError` before
anything it names is called. So the run's state is stored in those types (``train/resume.py``).

A run's policy (which checkpoint to continue from, when to save, the injected faults) lives in
``train/resume.py``. The checkpoint's content is the caller's dict: add state without touching
this module.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# 2: every entry loads with weights_only=True (format 1 held numpy RNG states as numpy objects).
FORMAT_VERSION = 2
_ENOSPC_AFTER_BYTES = 64 * 1024  # the injected full disk accepts this much, then fails


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); nothing partial was left."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or garbled."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain types: refused unread."""


# --- writing -------------------------------------------------------------------------------------


def previous_path(path: str | Path) -> Path:
    """Where the previous copy of ``path`` is kept: ``last.ckpt`` -> ``last.prev.ckpt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class _RecordingWriter:
    """Forward writes to ``f`` and remember the first OSError.

    torch's zip writer swallows an exception raised by ``write`` and fails later with an unrelated
    message ("unexpected pos ..."), losing the errno that says the disk is full. ``fail_after``
    (tests) writes that many bytes and then fails with ENOSPC, as a full disk does.
    """

    def __init__(self, f: Any, fail_after: int | None = None) -> None:
        self.f, self.written, self.fail_after = f, 0, fail_after
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        try:
            if self.fail_after is not None and self.written + n > self.fail_after:
                self.f.write(memoryview(data).cast("B")[: self.fail_after - self.written])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """load_checkpoint checks the zip CRC-32s: make sure torch writes them (torch >= 2.5 can skip)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable: POSIX keeps a directory entry apart from the file's data."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _remove_orphans(path: Path) -> None:
    """Temporary files of ``path`` left by a process killed mid-save (one writer per folder)."""
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        orphan.unlink(missing_ok=True)


def _write_failure(path: Path, err: OSError) -> str:
    try:
        left = shutil.disk_usage(path.parent).free
        free = f"{left / 2**30:.1f} GiB" if left >= 2**30 else f"{left / 2**20:.1f} MiB"
        free += " free there"
    except OSError:
        free = "free space unknown"
    kept = next((p for p in (path, previous_path(path)) if p.is_file()), None)
    intact = f"{kept} is intact" if kept else "no earlier checkpoint exists"
    return (
        f"could not write checkpoint {path.name} into {path.parent}: {err.strerror or err} "
        f"({free}); no partial file was left behind and {intact}"
    )


def save_atomic(
    state: dict[str, Any],
    path: str | Path,
    *,
    keep_previous: bool = False,
    _fault: str | None = None,
) -> Path:
    """Write ``state`` to ``path`` so that a crash at any point leaves a complete file behind.

    ``keep_previous`` moves the current ``path`` to :func:`previous_path` once the new file is
    complete (the last two kept). ``_fault`` (tests): ``"enospc"`` fails the write as a full disk
    does; ``"sigkill_before_rename"`` kills this process between the complete temporary file and
    the rename. Raises :class:`CheckpointWriteError` (the temporary file removed) on an OSError.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f, _ENOSPC_AFTER_BYTES if _fault == "enospc" else None)
            with _crc32_on():
                torch.save({"format_version": FORMAT_VERSION, **state}, writer)
            f.flush()
            os.fsync(f.fileno())
        if _fault == "sigkill_before_rename":
            print(f"debug fault: SIGKILL between {tmp} and its rename", file=sys.stderr)
            _die()
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError):
            raise CheckpointWriteError(_write_failure(path, cause)) from cause
        raise
    _remove_orphans(path)
    return path


def _die() -> None:
    """SIGKILL this process, as the OOM killer or a lost node would (no handler, no cleanup)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# --- reading -------------------------------------------------------------------------------------


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless every zip record matches its CRC-32.

    Costs one more read of the file (~0.4 s for a 300 MB ResNet-50 checkpoint here, page-cached).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, garbled headers: all "unusable"
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is truncated or garbled ({type(e).__name__}: {e})"
        ) from e
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is garbled: its record {bad!r} fails the CRC-32 check"
        )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error for bad paths.

    A truncated or garbled file raises :class:`CorruptCheckpointError` (a ValueError) naming it;
    one whose unpickling would call code raises :class:`UnsafeCheckpointError` (the module doc).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if verify:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UnsafeCheckpointError(_refusal(path, e)) from None
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} could not be read ({e})") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} could not be read ({e})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this project (no 'model' entry)")
    return state


def _refusal(path: Path, error: Exception) -> str:
    """One line for a refused file: what it would have called, and what to do."""
    named = re.search(r"GLOBAL (\S+)", str(error))
    called = named.group(1) if named else ""
    what = f"would call {called}" if called else "needs more than tensors and plain types"
    hint = "; load only checkpoints of this project or plain state dicts"
    if called.startswith("numpy"):
        hint = (
            f"; a checkpoint of this project written before format {FORMAT_VERSION} held numpy "
            "RNG states: retrain, or re-save it from a copy you trust"
        )
    return (
        f"checkpoint {str(path)!r} refused: unpickling it {what}, and a file that names code to "
        "call could run anything (torch.load weights_only=True loads tensors, numbers, strings "
        f"and containers only){hint}"
    )


@dataclass
class Latest:
    """The newest usable checkpoint of a name (``state`` None: none), and what was passed over."""

    path: Path | None = None
    state: dict[str, Any] | None = None
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # (file, why): set aside
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # complete, but not accepted


def load_latest(
    path: str | Path, *, accept: Callable[[dict[str, Any]], str | None] | None = None
) -> Latest:
    """Load ``path``, or its previous copy when ``path`` is missing, truncated or garbled.

    ``accept(state)`` may return a reason to pass over a complete checkpoint. ``path`` is always the
    newer of the two: the previous copy is only ever replaced by the file ``path`` held.
    """
    found = Latest()
    for candidate in (Path(path), previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            state = load_checkpoint(candidate)
        except UnsafeCheckpointError:
            raise  # not damaged but refused: never passed over for an older copy in silence
        except ValueError as e:
            found.corrupt.append((candidate, str(e)))
            continue
        reason = accept(state) if accept is not None else None
        if reason:
            found.skipped.append((candidate, reason))
            continue
        found.path, found.state = candidate, state
        break
    return found


def set_aside(path: Path) -> Path:
    """Move an unusable checkpoint out of the rotation (kept for inspection) and say where."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    return target
