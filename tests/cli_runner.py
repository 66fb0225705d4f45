"""Run the project's CLIs (train.py, evaluate.py) as new processes, alone or under torchrun.

A run without torchrun whose environment differs from the suite's only in ``RUNTIME_ENV`` is forked
from a warm interpreter (zygote.py: the same process a fresh ``python SCRIPT`` would be, without its
~6-8 s of imports); any other run is a plain subprocess. ``AUGMIX_GPU_TEST_ZYGOTE=0`` turns the
zygote off.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from zygote import RUNTIME_ENV

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


class Zygote:
    """The client side of zygote.py: one warm interpreter per test process, started on first use."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "zygote.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True,
        )  # fmt: skip
        if json.loads(self.proc.stdout.readline() or "{}").get("ready") is not True:
            raise RuntimeError("zygote.py did not start (its error is above)")
        atexit.register(self.close)

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a run with ``env`` sees what it would in a fresh interpreter."""
        keys = (set(env) | set(self.env)) - RUNTIME_ENV
        return self.proc.poll() is None and all(env.get(k) == self.env.get(k) for k in keys)

    def run(self, script: str, args: list[str], env: dict, timeout: float):
        with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"script": str(REPO / script), "args": [str(a) for a in args], "env": env,
                       "cwd": str(REPO), "stdout": str(out), "stderr": str(err)}  # fmt: skip
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            timer = _Killer(pid, timeout)
            rc = json.loads(self.proc.stdout.readline())["rc"]
            timer.cancel()
            command = [sys.executable, script, *args]
            if timer.fired:
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(command, rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


class _Killer:
    """SIGKILL ``pid`` after ``timeout`` seconds, as subprocess.run's timeout does."""

    def __init__(self, pid: int, timeout: float) -> None:
        self.fired = False
        self.pid = pid
        self.timer = threading.Timer(timeout, self._kill)
        self.timer.daemon = True
        self.timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self.timer.cancel()


_zygote: Zygote | None = None


def _warm(env: dict[str, str]) -> Zygote | None:
    global _zygote
    if os.environ.get("AUGMIX_GPU_TEST_ZYGOTE", "1") == "0":
        return None
    if _zygote is None:
        _zygote = Zygote({k: v for k, v in env.items() if k not in RUNTIME_ENV})
    return _zygote if _zygote.serves(env) else None


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
    zygote = None if torchrun else _warm(full_env)
    if zygote is not None:
        return zygote.run(script, args, full_env, timeout)
    return subprocess.run(
        script_command(script, args, torchrun=torchrun),
        env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    )
    return proc
