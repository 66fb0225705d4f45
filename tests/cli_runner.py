"""Run the project's CLIs (train.py, evaluate.py) as subprocesses, alone or under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_command(script: str, args: list[str], *, torchrun: int = 0) -> list[str]:
    """``python SCRIPT ARGS``, or the same under ``torchrun --nproc_per_node=N`` on loopback."""
    if not torchrun:
        return [sys.executable, str(REPO / script), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / script), *args]  # fmt: skip


def run_script(
    script: str,
    args: list[str],
    *,
    torchrun: int = 0,
    timeout: float = 240,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """One intra-op thread per process: the tests share two cores."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        script_command(script, args, torchrun=torchrun),
        env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    )
    return proc
