"""Device choice under torchrun: several local ranks without usable CUDA stop with one line
instead of silently training gloo ranks on the CPU; --device cpu still runs them there."""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_script

from augmix_gpu.distributed import resolve_device


def test_several_local_ranks_without_cuda_refuse_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"8 processes on this node but CUDA is not usable.*--device cpu"
    ):
        resolve_device("auto", local_rank=3, local_world_size=8)
    assert resolve_device("cpu", local_rank=3, local_world_size=8) == torch.device("cpu")
    assert resolve_device("auto", local_rank=0, local_world_size=1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda was requested but CUDA is not available"):
        resolve_device("cuda")


def test_more_local_ranks_than_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"8 processes on this node but only 4 GPU\(s\).*=4"):
        resolve_device("auto", local_rank=5, local_world_size=8)
    assert resolve_device("auto", local_rank=3, local_world_size=4) == torch.device("cuda", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_train_py_says_it_in_one_line():
    """What a torchrun rank prints (torchrun sets these variables), before any work."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    proc = run_script("train.py", ["--epochs", "1"], env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("train.py: error: 2 processes on this node but CUDA is not usable")
