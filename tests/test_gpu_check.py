"""`make gpu-check` on a machine without CUDA: one line, exit 0 (CI runs no GPU check)."""

from __future__ import annotations

import pytest
import torch
from cli_runner import run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check runs there")
def test_gpu_check_without_cuda_says_so_and_exits_0() -> None:
    proc = run_script("benchmarks/gpu_check.py", [])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
