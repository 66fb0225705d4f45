"""`make test` means the same on a GPU machine: tests not marked `cuda` run on the CPU
(conftest.py's `_cpu_unless_marked_cuda`), in this process and in the processes they start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_AT_START

from augmix_gpu.distributed import resolve_device


def test_a_plain_test_and_its_subprocesses_see_no_gpu():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cpu")
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.cuda
def test_a_cuda_test_sees_the_machine_as_it_is():
    """Runs everywhere (no skip): the fixture leaves `cuda` tests alone."""
    assert torch.cuda.is_available.__module__ == "torch.cuda"  # torch's own, not the fixture's
    assert torch.cuda.is_available() == CUDA_AT_START
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "" or not CUDA_AT_START
