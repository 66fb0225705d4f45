"""Faults of a long run, each injected for real (README, "Faults and restarts").

End to end under ``torchrun --standalone`` with 2 gloo ranks on the CPU: a worker SIGKILLed
mid-epoch, rank 0 SIGKILLed between a checkpoint's temporary file and its rename, a garbled
checkpoint on disk, a full disk during a save. Each run must end with the weights of one
uninterrupted run (nothing lost beyond the steps since the last checkpoint, which are redone), or
stop with an error that names the folder and leaves the previous checkpoint intact. Faults are
placed by global step (``--debug_fault KIND@STEP``), never by timing, so a slow machine changes
nothing. The unit tests below them exercise checkpoint.py in-process.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import REPO, ok

from augmix_gpu.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    load_checkpoint,
    load_latest,
    previous_path,
    save_atomic,
)
from augmix_gpu.distributed import DistEnv
from augmix_gpu.train.resume import JOB_KEY, Resume, RunCheckpoints

# 10 classes x 12 train images, batch 20 over 2 ranks: 6 steps per epoch, 12 in all; last.ckpt
# every 2 steps (steps 2, 4, 8, 10; 6 and 12 are saved at the epoch ends, after validation).
ARGS = [
    "--synthetic_train_per_class", "12", "--synthetic_val_per_class", "4", "--no_c_eval",
    "--batch", "20", "--crop_size", "32", "--val_resize", "36", "--workers", "1",
    "--no_progress", "--wandb", "disabled", "--lr", "3e-3", "--epochs", "2", "--seed", "3",
    "--save_every_steps", "2", "--device", "cpu",
]  # fmt: skip
RUN = "learnable_augmix_jsd"  # the default --aug_type names the run folder


def torchrun(args: list[str], cache: Path, base: Path, *, restarts: int = 0):
    """train.py under ``torchrun --standalone`` (c10d rendezvous, as the README launches it)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={restarts}", str(REPO / "train.py"), *args, "--ckpt_dir_base", str(base),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUGMIX_GPU_CACHE": str(cache)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset cache, run folder) of the uninterrupted run every faulted run must reproduce."""
    cache = tmp_path_factory.mktemp("cache")
    base = tmp_path_factory.mktemp("reference")
    ok(torchrun(ARGS, cache, base))
    return cache, base / RUN


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    return {**ckpt["model"], **{f"aug.{k}": v for k, v in (ckpt["augmenter"] or {}).items()}}


def assert_same_weights(run: Path, reference: Path) -> None:
    """Bit for bit: the resumed steps replay the same batches, draws and optimizer state."""
    a, b = weights(reference / "last.ckpt"), weights(run / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert load_checkpoint(run / "last.ckpt")["train_state"]["global_step"] == 12


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def step_of(path: Path) -> int:
    return load_checkpoint(path)["train_state"]["global_step"]


@pytest.mark.slow
def test_worker_sigkilled_mid_epoch_is_restarted_and_loses_nothing(reference, tmp_path):
    """Rank 1 dies after step 9 (epoch 2, last.ckpt at step 8); torchrun restarts both workers,
    which resume from step 8 by themselves (no --resume) and end with the uninterrupted weights."""
    cache, ref = reference
    proc = ok(torchrun(ARGS + ["--debug_fault", "sigkill@9"], cache, tmp_path, restarts=1))
    out = output(proc)
    run = tmp_path / RUN
    assert (
        f"torchrun restart 1: resumed from {run / 'last.ckpt'}: epoch 1, step 2 (global 8)" in out
    )
    assert_same_weights(run, ref)


@pytest.mark.slow
def test_sigkill_between_temp_file_and_rename_keeps_the_previous_checkpoint(reference, tmp_path):
    """Rank 0 dies with step 10's checkpoint complete in its temporary file but not renamed: the
    restart resumes from step 8's, redoes 9-10, and the next save removes the orphan."""
    cache, ref = reference
    args = ARGS + ["--debug_fault", "sigkill_in_save@10"]
    out = output(ok(torchrun(args, cache, tmp_path, restarts=1)))
    run = tmp_path / RUN
    orphan = re.search(r"SIGKILL between (\S+) and its rename", out)
    assert orphan, out
    assert Path(orphan.group(1)).parent == run
    assert (
        f"torchrun restart 1: resumed from {run / 'last.ckpt'}: epoch 1, step 2 (global 8)" in out
    )
    assert_same_weights(run, ref)
    assert not list(run.glob(".*.tmp")), "the orphaned temporary file must be removed"


@pytest.mark.slow
def test_garbled_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    """Flip bytes inside a tensor of last.ckpt (torch.load alone would load it silently): --resume
    auto warns naming it, sets it aside, resumes from last.prev.ckpt and ends on the same weights."""
    cache, ref = reference
    run = tmp_path / RUN
    shutil.copytree(ref, run)
    last = run / "last.ckpt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2  # inside the largest records: tensor data, far from the zip headers
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    last.write_bytes(bytes(data))
    assert step_of(previous_path(last)) == 10
    out = output(ok(torchrun(ARGS + ["--resume", "auto"], cache, tmp_path)))
    assert re.search(
        rf"warning: checkpoint '{re.escape(str(last))}' is garbled: its record '[^']+' fails the "
        r"CRC-32 check; moved to last\.ckpt\.corrupt",
        out,
    ), out
    assert (
        f"--resume auto: resumed from {run / 'last.prev.ckpt'}: epoch 1, step 4 (global 10)" in out
    )
    assert (run / "last.ckpt.corrupt").is_file()
    assert_same_weights(run, ref)


@pytest.mark.slow
def test_disk_full_during_a_save_stops_cleanly_and_loses_nothing(reference, tmp_path):
    """The write of step 10's checkpoint fails with ENOSPC: every rank stops with one message
    naming the folder, no partial file is left, steps 8 and 6 are intact; --resume auto finishes."""
    cache, ref = reference
    run = tmp_path / RUN
    proc = torchrun(ARGS + ["--debug_fault", "enospc_in_save@10"], cache, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    assert (
        f"train.py: error: could not write checkpoint last.ckpt into {run}: No space left on device"
        in err
    ), err
    assert f"no partial file was left behind and {run / 'last.ckpt'} is intact" in err
    assert "train.py: error: rank 0: could not write checkpoint" in err  # rank 1 stops too
    assert sorted(p.name for p in run.iterdir()) == [
        "best.ckpt",
        "config.json",
        "last.ckpt",
        "last.prev.ckpt",
    ]
    assert (step_of(run / "last.ckpt"), step_of(run / "last.prev.ckpt")) == (8, 6)
    ok(torchrun(ARGS + ["--resume", "auto"], cache, tmp_path))
    assert_same_weights(run, ref)


# --- checkpoint.py in-process --------------------------------------------------------------------

ONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(256, 256, generator=g), "b": torch.zeros(3)}, "step": step}


def test_save_keeps_the_last_two(tmp_path):
    last = tmp_path / "last.ckpt"
    for step in (1, 2, 3):
        save_atomic(state(step), last, keep_previous=True)
    assert load_checkpoint(last)["step"] == 3
    assert load_checkpoint(previous_path(last))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_tensor_byte(data: bytes) -> bytes:  # loads silently without the CRC check
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def _zero_block(data: bytes) -> bytes:
    b = bytearray(data)
    b[1000:9000] = bytes(8000)
    return bytes(b)


@pytest.mark.parametrize("damage", [_truncate, _flip_tensor_byte, _zero_block, lambda d: b""])
def test_truncated_or_garbled_file_falls_back_to_the_previous_one(damage, tmp_path):
    last = tmp_path / "last.ckpt"
    save_atomic(state(1), last, keep_previous=True)
    save_atomic(state(2), last, keep_previous=True)
    last.write_bytes(damage(last.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(last))):
        load_checkpoint(last)
    found = load_latest(last)
    assert found.path == previous_path(last) and found.state["step"] == 1
    assert [p for p, _ in found.corrupt] == [last]


@pytest.mark.slow
def test_a_killed_save_between_temp_file_and_rename_leaves_the_previous_file(tmp_path):
    """A real SIGKILL of a process that has written the temporary file and not renamed it."""
    last = tmp_path / "last.ckpt"
    save_atomic(state(1), last, keep_previous=True)
    before = last.read_bytes()
    code = (
        "import sys, torch; from augmix_gpu.checkpoint import save_atomic; "
        "save_atomic({'model': {'w': torch.ones(64)}}, sys.argv[1], keep_previous=True, "
        "_fault='sigkill_before_rename')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(last)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    orphans = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0  # complete, never renamed
    assert last.read_bytes() == before and not previous_path(last).exists()
    save_atomic(state(2), last, keep_previous=True)
    assert not list(tmp_path.glob(".*.tmp")), "the next save removes the orphan"
    assert load_checkpoint(previous_path(last))["step"] == 1


def test_disk_full_leaves_no_partial_file_and_the_previous_ones_intact(tmp_path):
    last = tmp_path / "run" / "last.ckpt"
    save_atomic(state(1), last, keep_previous=True)
    save_atomic(state(2), last, keep_previous=True)
    files = {p.name: p.read_bytes() for p in last.parent.iterdir()}
    with pytest.raises(CheckpointWriteError) as info:
        save_atomic(state(3), last, keep_previous=True, _fault="enospc")
    message = str(info.value)
    assert f"could not write checkpoint last.ckpt into {last.parent}: No space left on" in message
    assert f"{last} is intact" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in last.parent.iterdir()} == files  # no .tmp left


def test_save_every_minutes_becomes_a_step_interval(tmp_path):
    """0.5 s per step measured over the calibration steps -> 1 minute = 120 steps."""
    now = [0.0]
    lines: list[str] = []
    ckpts = RunCheckpoints(tmp_path, ONE, every_minutes=1.0, log=lines.append, clock=lambda: now[0])
    due = []
    for step in range(1, 400):
        now[0] += 0.5  # the step's work
        if ckpts.due(step):
            due.append(step)
    assert ckpts.interval == 120 and due == [120, 240, 360]
    assert lines == [
        f"checkpoints: {tmp_path / 'last.ckpt'} every 120 steps (~1 min at 0.5 s/step)"
    ]
    assert RunCheckpoints(tmp_path, ONE, every_steps=7, every_minutes=1.0).due(14)


def test_after_a_restart_only_this_jobs_checkpoints_resume_without_a_flag(tmp_path, monkeypatch):
    """A fresh run (no --resume) into a folder holding another run's last.ckpt must not pick it up
    when torchrun restarts its workers before their first save; --resume auto does take it."""
    save_atomic({**state(5), JOB_KEY: "old-job"}, tmp_path / "last.ckpt")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "new-job")
    lines: list[str] = []
    ckpts = RunCheckpoints(tmp_path, ONE, log=lines.append)
    fresh = ckpts.find_resume(None)
    assert fresh.state is None and [p.name for p, _ in fresh.skipped] == ["last.ckpt"]
    ckpts.settle(fresh)
    assert (
        lines[-1]
        == f"torchrun restart 1: no complete checkpoint in {tmp_path}, starting from scratch"
    )
    assert ckpts.find_resume("auto").state["step"] == 5
    save_atomic({**state(6), JOB_KEY: "new-job"}, tmp_path / "last.ckpt", keep_previous=True)
    assert ckpts.find_resume(None).state["step"] == 6


def test_a_named_corrupt_checkpoint_is_an_error_that_points_at_its_previous_copy(tmp_path):
    last = tmp_path / "last.ckpt"
    save_atomic(state(1), last, keep_previous=True)
    save_atomic(state(2), last, keep_previous=True)
    last.write_bytes(_truncate(last.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=r"--resume .*last\.prev\.ckpt"):
        RunCheckpoints(tmp_path, ONE).find_resume(str(last))


def test_a_multi_node_job_sharing_torchruns_store_is_warned(tmp_path, monkeypatch):
    """Across nodes the restart count cannot name a fresh key space (distributed.py): say so."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    lines: list[str] = []
    RunCheckpoints(tmp_path, ONE, log=lines.append).settle(Resume())
    assert lines and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines[0]
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: handled, no warning
    lines.clear()
    RunCheckpoints(tmp_path, ONE, log=lines.append).settle(Resume())
    assert lines == []
