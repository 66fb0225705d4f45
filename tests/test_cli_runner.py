"""The tests' warm interpreter (zygote.py) runs a script as a fresh ``python SCRIPT`` would: the
same output, exit code, signal and timeout as subprocess.run, and it steps aside for any run whose
environment its preloaded modules did not see."""

from __future__ import annotations

import os
import subprocess
import textwrap

import cli_runner
import pytest
from cli_runner import run_script

PROBE = textwrap.dedent(
    """\
    import os, sys
    print("argv", os.path.basename(sys.argv[0]), sys.argv[1:])
    print("name", __name__, "path0", os.path.basename(sys.path[0]))
    print("cwd", os.getcwd())
    print("cache", os.environ.get("AUGMIX_GPU_CACHE"), "stdin", repr(sys.stdin.read()))
    print("threads", os.environ["OMP_NUM_THREADS"], file=sys.stderr)
    if sys.argv[1] == "kill":
        sys.stdout.flush()
        os.kill(os.getpid(), 9)
    if sys.argv[1] == "sleep":
        import time; time.sleep(60)
    if sys.argv[1] == "raise":
        raise KeyError("boom")
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "tests" / "probe.py"
    path.parent.mkdir()
    path.write_text(PROBE)
    return path


def both(script, args, **kw) -> tuple:
    warm = run_script(str(script), args, **kw)
    assert cli_runner._zygote is not None and cli_runner._zygote.serves(
        {**os.environ, "OMP_NUM_THREADS": "1", **kw.get("env", {})}
    )
    os.environ["AUGMIX_GPU_TEST_ZYGOTE"] = "0"
    try:
        cold = run_script(str(script), args, **kw)
    finally:
        del os.environ["AUGMIX_GPU_TEST_ZYGOTE"]
    return warm, cold


@pytest.mark.parametrize("args", [["0"], ["3"], ["kill"], ["raise"]])
def test_a_forked_run_is_a_subprocess_run(probe, args, tmp_path):
    warm, cold = both(probe, args, env={"AUGMIX_GPU_CACHE": str(tmp_path)})
    assert warm.returncode == cold.returncode == {"0": 0, "3": 3, "kill": -9, "raise": 1}[args[0]]
    assert warm.stdout == cold.stdout and str(tmp_path) in warm.stdout
    assert "argv probe.py" in warm.stdout and "name __main__ path0 tests" in warm.stdout
    assert f"cwd {cli_runner.REPO}" in warm.stdout and "stdin ''" in warm.stdout
    # the tracebacks differ only in the frames above the script (runpy's against none)
    assert warm.stderr.splitlines()[0] == cold.stderr.splitlines()[0] == "threads 1"
    assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1]


def test_train_py_refuses_the_same_way(tmp_path):
    warm, cold = both("train.py", ["--epochs", "0"], env={"AUGMIX_GPU_CACHE": str(tmp_path)})
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode,
        cold.stdout,
        cold.stderr,
    )
    assert warm.returncode == 2 and "--epochs 0: must be >= 1" in warm.stderr


def test_a_timeout_kills_the_run_as_subprocess_run_does(probe):
    for zygote in ("1", "0"):
        os.environ["AUGMIX_GPU_TEST_ZYGOTE"] = zygote
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                run_script(str(probe), ["sleep"], timeout=2)
        finally:
            del os.environ["AUGMIX_GPU_TEST_ZYGOTE"]
    assert run_script(str(probe), ["0"]).returncode == 0  # the zygote serves the next run


def test_runs_that_change_what_imports_read_are_not_forked():
    run_script("train.py", ["--epochs", "0"])  # started
    zygote, env = cli_runner._zygote, {**os.environ, "OMP_NUM_THREADS": "1"}
    assert zygote.serves(env)
    assert zygote.serves({**env, "AUGMIX_GPU_CACHE": "/elsewhere", "PYTEST_CURRENT_TEST": "x"})
    flipped = "0" if env.get("TRITON_INTERPRET") == "1" else "1"
    assert not zygote.serves({**env, "TRITON_INTERPRET": flipped})
    assert not zygote.serves({**env, "OMP_NUM_THREADS": "2"})
    assert not zygote.serves({k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"})
