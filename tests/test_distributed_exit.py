"""A rank that has finished leaves no gloo thread behind for the interpreter's teardown.

Importing torch._dynamo after the process group exists (torch's optimisers and DDP do, on first
use) keeps the group alive past ``destroy_process_group``; a rank that exits with its gloo threads
still running aborts now and then ("terminate called without an active exception"), and torchrun
fails the finished job. ``start_process_group`` imports it first (distributed.py). Each case runs
in a fresh interpreter: the test process (and the zygote) imported torch._dynamo long ago.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from cli_runner import REPO

SCRIPT = """
import gc, os, sys
import torch, torch.distributed as dist
from augmix_gpu.distributed import start_process_group
start = start_process_group if sys.argv[1] == "ours" else dist.init_process_group
start(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))  # imports torch._dynamo
net(torch.ones(4, 3)).sum().backward()
torch.optim.AdamW(net.parameters()).step()
del net
dist.destroy_process_group()
gc.collect()
print(sorted({open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}))
"""


def gloo_threads_after_destroy(start: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, start], env=env, capture_output=True, text=True,
        timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    return [n for n in names if "gloo" in n]


pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)"
)


def test_start_process_group_leaves_no_gloo_thread_after_cleanup():
    assert gloo_threads_after_destroy("ours") == []


def test_plain_init_process_group_does_leave_them():
    """The reason for the import order; when this fails, torch no longer leaks the group and
    start_process_group can call init_process_group alone."""
    assert "pt_gloo_runloop" in gloo_threads_after_destroy("plain")
