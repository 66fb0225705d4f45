"""W&B for real: a short learnable run logs offline, and wandb's own reader (`wandb leet inspect`)
gives back the resolved config, the severity trajectory step by step and the final metrics.

Also checks, on the same run, that the schedule counts the steps actually taken when
--max_steps_per_epoch caps an epoch (the cosine is at its 3/4 point at the last step)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import ok, run_script

pytest.importorskip("wandb")

ARGS = [
    "--synthetic_train_per_class", "12", "--synthetic_val_per_class", "4", "--no_c_eval",
    "--batch", "20", "--crop_size", "32", "--val_resize", "36", "--workers", "1",
    "--no_progress", "--lr", "3e-3", "--epochs", "2", "--max_steps_per_epoch", "2",
    "--schedule", "cosine", "--warmup_epochs", "0", "--wandb", "offline",
]  # fmt: skip


def _records(run: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", str(run), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_offline_run_reads_back_config_severity_and_final_metrics(tmp_path):
    env = {"AUGMIX_GPU_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    ok(run_script("train.py", ARGS + ["--ckpt_dir_base", str(tmp_path)], env=env, timeout=300))
    out = tmp_path / "learnable_augmix_jsd"
    results = json.loads((out / "results.json").read_text())
    (run,) = (out / "wandb").glob("offline-run-*")
    records = _records(run)
    kinds = [r["type"] for r in records]
    assert "run" in kinds and kinds[-1] == "exit" and records[-1]["exit"].get("exit_code", 0) == 0

    config = next(r for r in records if r["type"] == "run")["run"]["config"]["update"]
    assert config["aug_type"] == "learnable_augmix_jsd" and config["wandb"] == "offline"
    assert config["max_steps_per_epoch"] == 2 and config["initial_aug_severity"] == 3.0

    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    trajectory = results["severity_trajectory"]
    assert [t["step"] for t in trajectory] == [1, 2, 3, 4]
    for t in trajectory:  # every step's severity, as results.json has it
        for key in ("severity_mu", "severity_sigma", "severity_mean", "severity_last"):
            assert by_step[t["step"]][key] == pytest.approx(t[key]), (t["step"], key)

    epochs = [row for row in by_step.values() if "val_top1" in row]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["val_top1"] == pytest.approx(results["final"]["val_top1"])
    # The lr the last step of each epoch ran at: cosine over 2 epochs of 2 steps, steps 1 and 3.
    for e, step in zip(epochs, (1, 3)):
        assert e["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * step / 4)))

    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["best_val_top1"] == pytest.approx(results["best"]["val_top1"])
    assert summary["val_top1"] == pytest.approx(results["final"]["val_top1"])
    assert summary["skipped_files"] == 0
