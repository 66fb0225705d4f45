"""`make gpu-check` without a GPU: its staging (stub stages: one that raises, one that runs past
its time, --only, --budget, the JSON written after every stage), its exit where a GPU is visible
but CUDA is not usable, and the one line where there is no GPU at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _gpu_stages  # noqa: E402
import gpu_check  # noqa: E402
from _gpu_stages import Context, Stage, pytest_counts, run_command, wait_for_line  # noqa: E402


@pytest.fixture
def ctx(tmp_path) -> Context:
    return Context(data=tmp_path / "data", scratch=tmp_path / "runs", results=tmp_path)


def _stage(name: str, fn, estimate: float = 1.0, timeout: float = 60.0) -> Stage:
    return Stage(name, fn, estimate, timeout)


def _boom(ctx):
    raise ValueError("boom")


def _sleeps(ctx, pid_file: Path) -> dict:
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    return run_command(ctx, [sys.executable, "-c", code])


def test_a_failing_and_a_timed_out_stage_get_rows_and_the_next_stages_run(ctx, tmp_path):
    out, lines, seen = tmp_path / "check.json", [], []
    pid_file = tmp_path / "pid"
    stages = [
        _stage("first", lambda c: {"summary": "fine", "figure": 3}),
        _stage("raises", _boom),
        _stage("hangs", lambda c: _sleeps(c, pid_file), timeout=2.0),
        _stage("reads", lambda c: seen.append(json.loads(out.read_text())) or {}),
    ]
    start = time.monotonic()
    report = gpu_check.run_stages(stages, ctx, {}, out, budget=None, emit=lines.append)
    rows = report["stages"]
    assert [r["status"] for r in rows] == ["ok", "failed", "timeout", "ok"]
    assert rows[0]["figure"] == 3 and "ValueError: boom" in rows[1]["summary"]
    assert "boom" in rows[1]["tail"] and "time.sleep(60)" in rows[2]["tail"]
    assert time.monotonic() - start < 30  # the sleeper was killed at its 2 s, not waited for
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    # Each row was on disk before the next stage ran, and printed as it ended.
    assert [r["stage"] for r in seen[0]["stages"]] == ["first", "raises", "hangs"]
    assert json.loads(out.read_text())["stages"] == rows
    assert [ln.split(" | ")[0] for ln in lines] == ["| first", "| raises", "| hangs", "| reads"]


def test_the_budget_stops_before_a_stage_that_would_not_fit(ctx, tmp_path):
    now, ran, limits = [0.0], [], []

    def takes(seconds: float):
        def run(c):
            ran.append(seconds)
            limits.append(c.timeout_s)
            now[0] += seconds
            return {}

        return run

    stages = [_stage("a", takes(15), 10), _stage("b", takes(15), 10), _stage("c", takes(5), 50)]
    out = tmp_path / "check.json"
    report = gpu_check.run_stages(
        stages, ctx, {}, out, budget=40, clock=lambda: now[0], emit=lambda line: None
    )
    assert ran == [15, 15]  # c (~50 s) is not started with 10 s left
    assert limits == [40, 25]  # a stage's commands get at most the budget left
    assert [r["stage"] for r in report["stages"]] == ["a", "b"]
    saved = json.loads(out.read_text())
    assert saved["budget_s"] == 40 and "not started: c" in saved["stopped"]


def test_only_runs_the_named_stages_with_the_data_they_need():
    all_stages = _gpu_stages.stages(lambda: "580.0")
    names = lambda chosen: [s.name for s in chosen]  # noqa: E731
    assert names(gpu_check.select(all_stages, [])) == names(all_stages)
    assert names(gpu_check.select(all_stages, ["evaluate"])) == ["data", "evaluate"]
    assert names(gpu_check.select(all_stages, ["compile", "cuda_tests"])) == [
        "data",
        "cuda_tests",
        "compile",
    ]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "nope"], names(all_stages))


def test_cuda_tests_that_all_skip_fail_the_stage(ctx, monkeypatch):
    """`pytest -m cuda` exits 0 when every test skips: the stage calls that a failure."""
    ran = {"exit_code": 0, "command": "pytest", "output": "SKIPPED [9] no GPU\n9 skipped in 2.0s"}
    monkeypatch.setattr(_gpu_stages, "run_command", lambda c, cmd: dict(ran))
    row = _gpu_stages.cuda_tests(ctx)
    assert row["status"] == "failed" and row["counts"] == {"skipped": 9}
    ran["output"] = "12 passed, 1 skipped in 30.1s"
    assert "status" not in _gpu_stages.cuda_tests(ctx)


def test_pytest_counts():
    assert pytest_counts("x\n3 passed, 2 skipped, 1 deselected in 4.2s\n") == {
        "passed": 3,
        "skipped": 2,
        "deselected": 1,
    }
    assert pytest_counts("1 failed, 2 passed, 2 errors in 3.0s") == {
        "failed": 1,
        "passed": 2,
        "error": 2,
    }
    assert pytest_counts("Traceback ...") == {}


def test_wait_for_line_reads_until_the_line_or_its_deadline():
    code = "import time; print('a', flush=True); print('epoch=1 x', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for_line(_gpu_stages._lines(proc), "epoch=1", 30) == ["a\n", "epoch=1 x\n"]
        with pytest.raises(TimeoutError):
            wait_for_line(_gpu_stages._lines(proc), "never", 0.5)
    finally:
        proc.kill()
        proc.wait()


def test_a_visible_gpu_that_cuda_cannot_use_fails_and_says_why(monkeypatch, capsys):
    """An old driver: torch's CUDA build and the driver named, exit 1, one line."""
    monkeypatch.setattr(gpu_check, "_cuda_usable", lambda: (False, "driver too old"))
    monkeypatch.setattr(gpu_check, "gpu_visible", lambda: "/dev/nvidia0 exists")
    monkeypatch.setattr(gpu_check, "driver_version", lambda: "535.104.05")
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/dev/nvidia0 exists" in err[0] and "driver too old" in err[0]
    cuda = torch.version.cuda
    if cuda is not None and cuda.startswith(("12", "13")):
        need = gpu_check.MIN_DRIVER[cuda.split(".")[0]]
        assert f"built for CUDA {cuda}" in err[0] and "driver is 535.104.05" in err[0]
        assert (f"too old: CUDA {cuda} needs >= {need}" in err[0]) == (need > 535)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check runs there")
def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    if gpu_check.gpu_visible() is not None:
        pytest.skip("a GPU is visible here: the check exits 1 instead (the test above)")
    proc = run_script("benchmarks/gpu_check.py", [])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no GPU on this machine" in lines[0]


def test_the_train_and_evaluate_stages_pass_flags_the_clis_accept(ctx):
    """The command lines the GPU stages run, read by train.py's and evaluate.py's own parsers."""
    from augmix_gpu.eval.cli import parse_settings
    from augmix_gpu.train.config import resolve_settings, validate_settings

    for folder in (ctx.syn / "train", ctx.syn / "val", ctx.data / "c", ctx.data / "p"):
        folder.mkdir(parents=True)
    s = resolve_settings(_gpu_stages.train_args(ctx, "train"))
    validate_settings(s, world_size=1)
    assert (s.model.arch, s.model.precision, s.model.channels_last) == ("resnet50", "bf16", True)
    made = dict(zip(_gpu_stages.SYNTHETIC[::2], map(int, _gpu_stages.SYNTHETIC[1::2])))
    images = made["--classes"] * made["--train_per_class"]
    assert images // s.run.batch * s.run.epochs == 200 and s.data.crop_size == made["--size"]
    e = parse_settings(_gpu_stages.evaluate_args(ctx))
    assert e.model.ckpt_path == str(ctx.checkpoint) and e.run.device == "cuda"
    assert set(e.roots) >= {"imagenet_c", "imagenet_p"}


@pytest.mark.slow
def test_the_sigterm_stage_on_the_cpu(ctx, tmp_path, monkeypatch):
    """The stage's own logic end to end, with train.py on the small CPU task: wait for the first
    epoch's line, SIGTERM, exit 0 with last.ckpt saved, --resume auto goes on from it."""
    small = ["--synthetic_train_per_class", "12", "--synthetic_val_per_class", "4", "--no_c_eval",
             "--batch", "20", "--crop_size", "32", "--val_resize", "36", "--workers", "1",
             "--no_progress", "--wandb", "disabled", "--device", "cpu"]  # fmt: skip

    def cpu_args(c, out, arch="tiny_resnet", epochs=20):
        return [*small, "--epochs", str(epochs), "--ckpt_dir_base", str(c.scratch / out)]

    monkeypatch.setattr(_gpu_stages, "train_args", cpu_args)
    monkeypatch.setenv("AUGMIX_GPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx.timeout_s = 240
    row = _gpu_stages.sigterm_resume(ctx)
    assert row.get("status", "ok") == "ok", row
    assert row["summary"] == "stopped, saved, resumed" and "--resume auto" in row["command"]
    assert (ctx.scratch / "sigterm" / "learnable_augmix_jsd" / "last.ckpt").is_file()
