"""Checkpoints load with ``weights_only=True``: a file that would run code is refused before the
code runs, and everything this project saves (RNG states included) still loads and resumes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from cli_runner import run_script

from augmix_gpu.checkpoint import UnsafeCheckpointError, load_checkpoint, load_latest, save_atomic
from augmix_gpu.train.resume import capture_rng_state, restore_rng_state
from augmix_gpu.weights import load_weights


class TouchesAFile:
    """Unpickling it calls ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(folder: Path) -> tuple[Path, Path]:
    """(a checkpoint with valid CRCs whose unpickling would create a file, that file)."""
    marker = folder / "code-ran"
    path = save_atomic({"model": {}, "payload": TouchesAFile(marker)}, folder / "hostile.ckpt")
    return path, marker


def test_the_hostile_file_would_run_code_if_unpickled(tmp_path):
    """The control: the payload does run under ``weights_only=False``, so the refusal below is
    what keeps the marker away."""
    path, marker = hostile_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    path, marker = hostile_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"hostile\.ckpt' refused: .*would call posix"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):  # not passed over for an older copy in silence
        load_latest(path)
    assert not marker.exists()


def test_evaluate_py_refuses_it_in_one_line(tmp_path):
    path, marker = hostile_checkpoint(tmp_path)
    (tmp_path / "val").mkdir()
    proc = run_script("evaluate.py", ["--ckpt_path", str(path), "--val", str(tmp_path / "val")])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hostile.ckpt' refused" in lines[0], proc.stderr
    assert not marker.exists()


def test_a_format_1_checkpoint_with_numpy_state_is_refused_with_the_reason(tmp_path):
    path = save_atomic({"model": {}, "rng": np.random.get_state()}, tmp_path / "old.ckpt")  # noqa: NPY002
    with pytest.raises(UnsafeCheckpointError, match=r"numpy.*before format 2"):
        load_checkpoint(path)


def _draws() -> tuple:
    return (
        random.random(),
        np.random.normal(size=3).tolist(),  # noqa: NPY002 - the legacy global generator
        torch.rand(3).tolist(),
    )


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    """Saved, loaded with weights_only=True and restored: the same numbers are drawn next, down
    to numpy's cached second Gaussian (an odd number of normals drawn before the capture)."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: NPY002
    np.random.normal(size=1)  # noqa: NPY002 - leaves has_gauss = 1
    path = save_atomic({"model": {}, "rng": capture_rng_state()}, tmp_path / "rng.ckpt")
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_a_torchvision_state_dict_still_loads(tmp_path):
    net = torchvision.models.resnet18(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    state = load_weights(tmp_path / "resnet18.pth").state
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
