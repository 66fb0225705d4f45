"""Checkpoints that survive the faults of a long run: killed processes, restarts, full disks, bad files.

Writing (:func:`save_atomic`): ``torch.save`` into a temporary file beside the target, fsync it,
move the current file to ``<stem>.prev<suffix>`` (the last two are kept), rename the temporary
file over the target, then fsync the folder (a file's fsync does not make its rename durable). A
process killed at any point leaves the target, or its previous copy, complete; the next save
removes the orphaned temporary file. A failed write (a full disk) removes its temporary file and
raises :class:`CheckpointWriteError` naming the folder; the files already there are untouched.

Reading (:func:`load_checkpoint`): the zip records ``torch.save`` writes carry CRC-32s that
``torch.load`` never checks, so a flipped byte in a tensor loads silently as a wrong weight. They
are checked first: a truncated or garbled file raises :class:`CorruptCheckpointError` naming it,
and :func:`load_latest` falls back to the previous copy.

A run's policy (:class:`RunCheckpoints`): which checkpoint to continue from (``--resume``, or by
itself when torchrun has restarted the workers), when to save, and the test hooks that inject real
faults. The checkpoint's content is the caller's dict: add state without touching this module.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistEnv, barrier, restart_hazard

FORMAT_VERSION = 1
LAST, BEST = "last.ckpt", "best.ckpt"
JOB_KEY = "torchelastic_run_id"  # which torchrun job wrote a checkpoint (None: no torchrun)
# The test hooks of --debug_fault KIND@STEP (first worker group only, see RunCheckpoints).
DEBUG_FAULTS = ("sigkill", "sigkill_in_save", "enospc_in_save")
_ENOSPC_AFTER_BYTES = 64 * 1024  # the injected full disk accepts this much, then fails
# --save_every_minutes: the pace is measured over these steps, after these warm-up steps
# (cuDNN autotuning, torch.compile and the allocator's first growth make the first steps slow).
CALIBRATION_WARMUP_STEPS, CALIBRATION_STEPS = 5, 20


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); nothing partial was left."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or garbled."""


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

    A truncated or garbled file raises :class:`CorruptCheckpointError` (a ValueError) naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if verify:
        verify_checkpoint(path)
    try:
        # weights_only=False: our own files hold numpy RNG states and the config dict.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} could not be read ({e})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this project (no 'model' entry)")
    return state


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


# --- RNG states ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global state is what libraries use
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- a training run's policy ---------------------------------------------------------------------


def restart_count() -> int:
    """Worker-group restarts torchrun has made in this job so far (0: first launch or no torchrun)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def parse_debug_fault(spec: str) -> tuple[str, int]:
    """``KIND@STEP`` -> (kind, global step); the test hook behind ``--debug_fault``."""
    kind, _, step = spec.partition("@")
    if kind not in DEBUG_FAULTS or not step.isdigit():
        raise ValueError(
            f"--debug_fault {spec!r}: expected KIND@STEP with KIND one of {', '.join(DEBUG_FAULTS)}"
        )
    return kind, int(step)


@dataclass
class Resume:
    """Where a run continues from (``state`` None: from scratch), why, and what was passed over."""

    path: Path | None = None
    state: dict[str, Any] | None = None
    why: str = ""
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class RunCheckpoints:
    """One training run's checkpoints in ``folder``: where it resumes, when it saves, how it fails.

    Every rank calls every method at the same step (some are collectives); rank 0 alone writes.
    ``every_steps`` > 0 saves ``last.ckpt`` every that many global steps; otherwise
    ``every_minutes`` > 0 is turned into steps once, from the pace of the first steps; both 0:
    epoch ends only. ``debug_fault`` ``KIND@STEP`` (tests) injects one real fault at a global step,
    in the first worker group only (a restarted group must be able to get past it):
    ``sigkill`` kills the highest rank after that step; ``sigkill_in_save`` kills rank 0 between
    the complete temporary file and the rename of that step's save; ``enospc_in_save`` fails that
    save's write as a full disk does.
    """

    def __init__(
        self,
        folder: str | Path,
        env: DistEnv,
        *,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        debug_fault: str | None = None,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.folder, self.env, self.log, self.clock = Path(folder), env, log, clock
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.restarts = restart_count()
        self.job = os.environ.get("TORCHELASTIC_RUN_ID")
        self.fault: tuple[str, int] | None = None
        if debug_fault and self.restarts == 0:
            self.fault = parse_debug_fault(debug_fault)
        self.interval: int | None = every_steps or None  # steps between periodic saves
        self._calls, self._t0 = 0, 0.0

    # -- resuming ---------------------------------------------------------------------------------

    def find_resume(self, resume: str | None) -> Resume:
        """The checkpoint to continue from (loaded on every rank; call :meth:`settle` next).

        After a torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0): the newest complete
        ``last.ckpt`` (or its previous copy) this job wrote, with no flag needed; if the job has
        not saved yet, what ``--resume`` named, else a fresh start. ``--resume auto``: the newest
        complete one, whoever wrote it. ``--resume PATH``: that file, which must be complete.
        """
        last = self.folder / LAST
        if self.restarts > 0:
            why = f"torchrun restart {self.restarts}"
            accept = None if resume == "auto" else self._written_by_this_job
            found = load_latest(last, accept=accept)
            if found.state is None and resume not in (None, "auto"):
                return Resume(
                    Path(resume), self._load_named(resume), f"{why}, --resume", found.corrupt
                )
            return Resume(found.path, found.state, why, found.corrupt, found.skipped)
        if resume == "auto":
            found = load_latest(last)
            return Resume(found.path, found.state, "--resume auto", found.corrupt)
        if resume:
            return Resume(Path(resume), self._load_named(resume), "--resume")
        return Resume()

    def _written_by_this_job(self, state: dict[str, Any]) -> str | None:
        saved = state.get(JOB_KEY)
        if saved == self.job:
            return None
        return f"written by another torchrun job ({saved}), not this one ({self.job})"

    @staticmethod
    def _load_named(resume: str) -> dict[str, Any]:
        try:
            return load_checkpoint(resume)
        except CorruptCheckpointError as e:
            prev = previous_path(resume)
            hint = f"; its previous copy {prev} may be complete (--resume {prev})"
            raise CorruptCheckpointError(f"--resume: {e}{hint if prev.is_file() else ''}") from e

    def settle(self, resume: Resume, where: str = "") -> None:
        """After every rank has loaded ``resume``: check that they agree, set corrupt files aside
        (rank 0), and say what happened in one line, after a warning per unusable file."""
        hazard = restart_hazard()
        if hazard is not None:
            self.log(f"warning: {hazard}")
        if self.env.distributed:
            paths: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(paths, str(resume.path))
            if len(set(paths)) > 1:
                raise RuntimeError(
                    f"ranks chose different checkpoints to resume from ({paths}): every node must "
                    f"see the same {self.folder} (a shared filesystem)"
                )
            barrier(self.env)  # every rank has read the files before any is moved
        for path, why in resume.corrupt:
            if self.env.is_main and path.is_file():
                why += f"; moved to {set_aside(path).name}"
            self.log(f"warning: {why}")
        for path, why in resume.skipped:
            self.log(f"note: {path} not resumed: {why} (--resume auto would take it)")
        if resume.state is not None:
            self.log(f"{resume.why}: resumed from {resume.path}{': ' + where if where else ''}")
        elif resume.why:
            self.log(
                f"{resume.why}: no complete checkpoint in {self.folder}, starting from scratch"
            )

    # -- saving -----------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], name: str, step: int) -> Path:
        """Rank 0 writes ``state`` to ``name`` (``last.ckpt`` keeps its previous copy).

        A failed write raises on every rank (CheckpointWriteError elsewhere than rank 0), so that
        the job stops together instead of the other ranks waiting for rank 0 at a collective.
        """
        path = self.folder / name
        error: BaseException | None = None
        if self.env.is_main:
            fault = None
            if self.fault is not None and self.fault[1] == step and name == LAST:
                fault = {
                    "sigkill_in_save": "sigkill_before_rename",
                    "enospc_in_save": "enospc",
                }.get(self.fault[0])
            try:
                save_atomic(
                    {**state, JOB_KEY: self.job}, path, keep_previous=name == LAST, _fault=fault
                )
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                error = e
        message = [str(error) if error is not None else None]
        if self.env.distributed:
            dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise CheckpointWriteError(f"rank 0: {message[0]}")
        return path

    def due(self, step: int) -> bool:
        """Whether to save ``last.ckpt`` after global step ``step``.

        ``every_minutes`` becomes a step interval once, from rank 0's pace over steps 6-25 of this
        process, shared with every rank (one broadcast): deterministic steps, no clock per step.
        """
        if self.interval is None and self.every_minutes > 0:
            self._calibrate()
        return self.interval is not None and step % self.interval == 0

    def _calibrate(self) -> None:
        self._calls += 1
        if self._calls == CALIBRATION_WARMUP_STEPS:
            self._t0 = self.clock()
        elif self._calls == CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS:
            per_step = (self.clock() - self._t0) / CALIBRATION_STEPS
            steps = torch.tensor(
                [max(1, round(self.every_minutes * 60 / max(per_step, 1e-9)))],
                device=self.env.device,
            )
            if self.env.distributed:
                dist.broadcast(steps, src=0)
            self.interval = int(steps.item())
            self.log(
                f"checkpoints: {self.folder / LAST} every {self.interval} steps "
                f"(~{self.every_minutes:g} min at {per_step:.3g} s/step)"
            )

    def inject(self, step: int) -> None:
        """The ``sigkill`` test hook: the highest rank dies right after global step ``step``."""
        if (
            self.fault is not None
            and self.fault == ("sigkill", step)
            and self.env.rank == self.env.world_size - 1
        ):
            _die()


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, class names, resolved training config) from a checkpoint."""
    from .models import build_model

    state = load_checkpoint(path)
    config = state.get("config", {})
    classes = state.get("classes")
    if not classes:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no class list; it cannot map folders to labels"
        )
    model = build_model(config.get("arch", "resnet50"), num_classes=len(classes))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), list(classes), config
