"""A run's checkpoints: where it resumes, when it saves, the faults tests inject, what is saved.

:class:`RunCheckpoints` is the policy: which checkpoint to continue from (``--resume``, or by
itself when torchrun has restarted the workers), when to save, and the test hooks that inject real
faults. :func:`make_checkpoint` / :func:`resume_from` are the run's state in a checkpoint and back.
The file format (atomic writes, verified reads) is ``augmix_gpu/checkpoint.py``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    _die,
    load_checkpoint,
    load_latest,
    previous_path,
    save_atomic,
    set_aside,
)
from ..distributed import DistEnv, all_gather_objects, barrier, restart_hazard
from .config import Settings, parse_debug_fault, resume_conflicts
from .step import TrainState

LAST, BEST = "last.ckpt", "best.ckpt"
JOB_KEY = "torchelastic_run_id"  # which torchrun job wrote a checkpoint (None: no torchrun)
# --save_every_minutes: the pace is measured over these steps, after these warm-up steps
# (cuDNN autotuning, torch.compile and the allocator's first growth make the first steps slow).
CALIBRATION_WARMUP_STEPS, CALIBRATION_STEPS = 5, 20

# --- RNG states ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states, in tensors and plain types only:
    checkpoints load with ``weights_only=True`` (``checkpoint.py``), which refuses numpy objects.

    Python's state is a tuple of ints already; numpy's legacy state tuple is split into its name,
    its 624 uint32 keys (an int64 tensor: exact) and its three scalars.
    """
    # numpy's legacy global generator: the one libraries draw from
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators to a :func:`capture_rng_state` result."""
    random.setstate(state["python"])
    n = state["numpy"]
    legacy = (n["bit_generator"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
              n["has_gauss"], n["cached_gaussian"])  # fmt: skip
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- a training run's policy ---------------------------------------------------------------------


def restart_count() -> int:
    """Worker-group restarts torchrun has made in this job so far (0: first launch or no torchrun)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


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


def make_checkpoint(run: Any) -> dict:
    """The whole state of ``run`` (a :class:`~augmix_gpu.train.run.Run`) after its last step.

    Every rank calls it (the RNG states are gathered); the settings are stored flat (plain types).
    """
    env, net = run.env, run.net
    return {
        "model": net.model.state_dict(),
        "severity_updater": run.updater.state_dict() if run.updater is not None else None,
        "augmenter": net.augmenter.state_dict() if net.augmenter is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "schedule": {"name": run.settings.optim.schedule, "global_step": run.state.global_step},
        "train_state": asdict(run.state),
        "generators": all_gather_objects(run.generator.get_state(), env),
        "rng": all_gather_objects(capture_rng_state(), env),
        "classes": run.classes,
        "config": run.settings.to_dict(),
        "history": run.history,
        "world_size": env.world_size,
    }


def resume_from(path: Path, ckpt: dict, run: Any) -> None:
    """Load ``ckpt`` (read from ``path``) into ``run``: weights, optimiser, RNGs, step, history."""
    saved = Settings.from_dict(ckpt["config"], where=f"--resume {path}", strict=False)
    for name, was, now in resume_conflicts(saved, run.settings):
        raise ValueError(
            f"--resume {path}: it was trained with {name}={was!r}, this run has {now!r}"
        )
    env, net = run.env, run.net
    if ckpt.get("world_size") != env.world_size:
        raise ValueError(
            f"--resume {path}: saved with world size {ckpt.get('world_size')}, now {env.world_size}"
        )
    net.model.load_state_dict(ckpt["model"])
    if net.augmenter is not None:
        net.augmenter.load_state_dict(ckpt["augmenter"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.updater is not None:
        run.updater.load_state_dict(ckpt["severity_updater"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.generator.set_state(ckpt["generators"][env.rank])
    restore_rng_state(ckpt["rng"][env.rank])
    run.state = TrainState(**ckpt["train_state"])
    run.history = ckpt.get("history", [])
