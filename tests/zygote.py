"""A warm interpreter that forks the tests' train.py / evaluate.py runs (cli_runner.run_script).

Why: a small CLI run here spends ~90 % of its CPU importing torch, torch._dynamo (the first
optimiser imports it) and DALI, ~6-8 s per process on this 2-core machine, and the suite starts
dozens of them. This process imports them once, with no thread started, and then forks one child
per run: the child is a new process with its own pid, signals and exit code, running the script
as ``python SCRIPT ARGS`` would (``__main__``, ``sys.argv``, ``sys.path[0]``, the environment,
stdin from /dev/null, stdout and stderr into files, atexit handlers at exit).

Protocol, one run at a time, one JSON line each way on stdin / stdout:
  request  {"script", "args", "env", "cwd", "stdout", "stderr"}  ->  {"pid": N}  then  {"rc": N}
cli_runner uses it only where the run's environment equals this process's apart from variables
that nothing reads at import (``RUNTIME_ENV``), so the preloaded modules saw what a fresh
interpreter would; anything else (torchrun, TRITON_INTERPRET, ...) is launched as a subprocess.
"""

from __future__ import annotations

import json
import os
import sys

# Read by the project or its tools at run time only, never while a preloaded module imports
# (PYTEST_CURRENT_TEST: pytest rewrites it for every test).
RUNTIME_ENV = frozenset(
    {"AUGMIX_GPU_CACHE", "WANDB_SILENT", "WANDB_MODE", "WANDB_DIR", "PYTEST_CURRENT_TEST"}
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preload() -> None:
    """What train.py and evaluate.py import before their first line of work, in their order."""
    sys.path[0] = REPO  # as for `python train.py` run from the repository
    from augmix_gpu.runtime import prefer_passive_openmp

    prefer_passive_openmp()  # train.py does this before torch loads OpenMP
    import nvidia.dali  # noqa: F401
    import torch._dynamo  # noqa: F401

    import augmix_gpu.eval.cli  # noqa: F401
    import augmix_gpu.train.run  # noqa: F401

    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads != 1:  # forking a process with threads could copy a held lock into the child
        raise RuntimeError(f"zygote: {threads} threads after the imports; cannot fork safely")


def child(request: dict) -> None:
    """Become ``python SCRIPT ARGS``; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.close(null)
        script = os.path.abspath(request["script"])
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(script)
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
