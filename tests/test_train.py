"""train.py end to end on the CPU: modes, DDP under torchrun (gloo), exact resume, SIGTERM,
non-finite losses and argument errors. Small synthetic data, a tiny ResNet, a few steps."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_runner import REPO, ok, run_script, script_command

from augmix_gpu.checkpoint import load_checkpoint

# A small synthetic task: 10 classes x 12 train / 4 val images, 32 px crops, batch 20.
SMALL = [
    "--synthetic_train_per_class", "12", "--synthetic_val_per_class", "4", "--no_c_eval",
    "--batch", "20", "--crop_size", "32", "--val_resize", "36", "--workers", "1",
    "--no_progress", "--wandb", "disabled", "--lr", "3e-3", "--epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One synthetic dataset for the whole module (the trainer generates it on first use)."""
    return tmp_path_factory.mktemp("cache")


def run_train(args: list[str], cache: Path, *, timeout: float = 240, torchrun: int = 0):
    return run_script(
        "train.py", args, torchrun=torchrun, timeout=timeout, env={"AUGMIX_GPU_CACHE": str(cache)}
    )


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("mode", ["none", "augmix", "augmix_jsd", "learnable_augmix_jsd"])
def test_each_mode_trains_one_step(mode, cache, tmp_path):
    ok(
        run_train(
            SMALL
            + ["--aug_type", mode, "--max_steps_per_epoch", "2", "--ckpt_dir_base", str(tmp_path)],
            cache,
        )
    )
    res = results(tmp_path / mode)
    assert res["config"]["aug_type"] == mode
    assert res["history"][0]["global_step"] == 2
    assert res["final"]["loss"] > 0
    ckpt = load_checkpoint(tmp_path / mode / "last.ckpt")
    assert (ckpt["augmenter"] is None) == (mode == "none")
    if mode == "learnable_augmix_jsd":
        assert "log_severity_mu" in "".join(ckpt["augmenter"])
        assert res["severity_trajectory"], "learnable mode must record the severity each step"


@pytest.mark.slow
def test_ddp_two_ranks_gloo(cache, tmp_path):
    """Loss goes down, replicas (weights and severity) stay identical, only rank 0 writes."""
    proc = ok(
        run_train(
            SMALL + ["--epochs", "3", "--device", "cpu", "--ckpt_dir_base", str(tmp_path)],
            cache,
            torchrun=2,
            timeout=400,
        )
    )
    run = tmp_path / "learnable_augmix_jsd"
    res = results(run)
    assert res["world_size"] == 2
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0], losses
    a, b = res["replica_checksums"]
    assert a == b, "ranks diverged: DDP must all-reduce the network AND the severity parameters"
    # Rank 0 alone writes: exactly the files of one run, no per-rank copies.
    assert sorted(p.name for p in run.iterdir()) == [
        "best.ckpt",
        "config.json",
        "last.ckpt",
        "last.prev.ckpt",  # the last two checkpoints are kept (README, "Faults and restarts")
        "results.json",
    ]
    assert "world size 2" in proc.stdout + proc.stderr


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    return {**ckpt["model"], **{f"aug.{k}": v for k, v in (ckpt["augmenter"] or {}).items()}}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_resume_is_exact(where, cache, tmp_path):
    """2 epochs straight == stop (at the end of epoch 1, or inside epoch 2), --resume, finish.

    Mid-epoch, the resumed batches must carry the same crops and flips (drawn per step on the
    host), the same AugMix draws and the same optimizer state as the uninterrupted run's.
    """
    common = SMALL + ["--epochs", "2", "--seed", "3"]
    ok(run_train(common + ["--ckpt_dir_base", str(tmp_path / "straight")], cache))
    straight = tmp_path / "straight" / "learnable_augmix_jsd"
    steps = results(straight)["history"][0]["global_step"]
    stop = steps if where == "epoch_end" else steps + steps // 2
    split = tmp_path / "split"
    ok(
        run_train(
            common + ["--ckpt_dir_base", str(split), "--debug_stop_at_step", str(stop)], cache
        )
    )
    stopped = load_checkpoint(split / "learnable_augmix_jsd" / "last.ckpt")
    assert stopped["train_state"]["global_step"] == stop
    ok(run_train(common + ["--ckpt_dir_base", str(split), "--resume", "auto"], cache))
    a, b = _weights(straight / "last.ckpt"), _weights(split / "learnable_augmix_jsd" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ra, rb = results(straight), results(split / "learnable_augmix_jsd")
    assert ra["history"][-1]["global_step"] == rb["history"][-1]["global_step"] == 2 * steps
    assert ra["history"][-1]["severity_mu"] == pytest.approx(
        rb["history"][-1]["severity_mu"], abs=1e-6
    )


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(cache, tmp_path):
    env = {**os.environ, "AUGMIX_GPU_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = SMALL + ["--epochs", "50", "--ckpt_dir_base", str(tmp_path)]
    # Warm the cache first so the signal lands during training, not during generation.
    ok(
        run_train(
            SMALL + ["--max_steps_per_epoch", "1", "--ckpt_dir_base", str(tmp_path / "warm")], cache
        )
    )
    proc = subprocess.Popen(
        script_command("train.py", args),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = tmp_path / "learnable_augmix_jsd"
    deadline = time.time() + 120
    while not (run / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the first epoch's checkpoint: training is under way
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["train_state"]["global_step"] >= 1
    # ... and the run continues from it.
    ok(
        run_train(
            args[:-4]
            + [
                "--epochs",
                str(ckpt["train_state"]["epoch"] + 1),
                "--ckpt_dir_base",
                str(tmp_path),
                "--resume",
                "auto",
            ],
            cache,
        )
    )


def test_nonfinite_loss_is_skipped_and_counted(cache, tmp_path):
    ok(
        run_train(
            SMALL
            + [
                "--max_steps_per_epoch",
                "3",
                "--debug_nonfinite_steps",
                "1",
                "--ckpt_dir_base",
                str(tmp_path),
            ],
            cache,
        )
    )
    res = results(tmp_path / "learnable_augmix_jsd")
    assert res["skipped_nonfinite"] == 1
    assert res["history"][0]["global_step"] == 3


def test_run_of_nonfinite_losses_stops_with_message(cache, tmp_path):
    proc = run_train(
        SMALL
        + [
            "--max_nonfinite",
            "3",
            "--debug_nonfinite_steps",
            "0",
            "1",
            "2",
            "3",
            "--ckpt_dir_base",
            str(tmp_path),
        ],
        cache,
    )
    assert proc.returncode != 0
    assert "3 non-finite losses in a row, the last at global step 2" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/no/such/dir"], "--data '/no/such/dir': no such folder"),
        (["--arch", "resnet5O"], "--arch 'resnet5O': unknown model"),
        (["--epochs", "0"], "--epochs 0: must be >= 1"),
        (["--initial_aug_severity", "12"], "--initial_aug_severity 12.0: must be in (0, 10.0]"),
        (["--eval_only"], "--eval_only True: needs --ckpt_path"),
        (["--resume", "/no/such.ckpt"], "--resume '/no/such.ckpt': no such checkpoint"),
        (["--gpus", "4"], "torchrun --nproc_per_node=4"),
        (["--crop_area_min", "0"], "--crop_area_min 0.0: must be in (0, 1]"),
        (["--config", "nope.toml"], "--config 'nope.toml': no such file"),
    ],
)
def test_bad_arguments_fail_before_work(args, message, tmp_path):
    from augmix_gpu.train.config import resolve_settings, validate_settings

    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        validate_settings(resolve_settings(args), world_size=1)


def test_batch_smaller_than_world_size():
    from augmix_gpu.train.config import resolve_settings, validate_settings

    with pytest.raises(ValueError, match="must be >= the world size"):
        validate_settings(resolve_settings(["--batch", "1"]), world_size=2)


def test_cli_error_is_a_message_not_a_traceback(tmp_path):
    proc = run_script(
        "train.py", ["--data", str(tmp_path / "missing")], env={"AUGMIX_GPU_CACHE": str(tmp_path)}
    )
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_and_flags_compose(tmp_path):
    """Defaults < --config file < typed flags; dataset defaults fill what is left."""
    from augmix_gpu.train.config import resolve_settings

    preset = tmp_path / "p.toml"
    preset.write_text('epochs = 7\nlr = 0.5\noptimizer = "sgd"\ndataset = "imagenet"\n')
    c = resolve_settings(["--config", str(preset), "--lr", "0.25"])
    assert (c.run.epochs, c.optim.lr, c.optim.optimizer) == (7, 0.25, "sgd")
    assert c.model.arch == "resnet50" and c.data.crop_size == 224  # imagenet defaults
    paper = resolve_settings(["--config", "augmix_paper.toml", "--epochs", "3"])
    p_opt, p_sev = paper.optim.optimizer, paper.augment.initial_aug_severity
    assert (p_opt, p_sev, paper.run.epochs) == ("sgd", 1.0, 3)
    assert resolve_settings([]).run.config == "demo.toml"  # no --data: the embedded demo
    preset.write_text("epochz = 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['epochz'\]"):
        resolve_settings(["--config", str(preset)])
    preset.write_text('optimizer = "adam"\n')  # a preset's value is checked as a typed flag's
    with pytest.raises(ValueError, match=r"--optimizer 'adam': expected one of \['sgd', 'adamw'\]"):
        resolve_settings(["--config", str(preset)])


def test_eval_only_evaluates_a_checkpoint(cache, tmp_path):
    ok(run_train(SMALL + ["--max_steps_per_epoch", "1", "--ckpt_dir_base", str(tmp_path)], cache))
    ckpt = tmp_path / "learnable_augmix_jsd" / "last.ckpt"
    proc = ok(
        run_train(
            SMALL + ["--eval_only", "--ckpt_path", str(ckpt), "--ckpt_dir_base", str(tmp_path)],
            cache,
        )
    )
    report = json.loads((tmp_path / "learnable_augmix_jsd" / "eval" / "results.json").read_text())
    trained = results(tmp_path / "learnable_augmix_jsd")
    assert report["clean"]["top1"] == pytest.approx(trained["final"]["val_top1"])
    assert "clean error" in proc.stdout


def test_bf16_autocast_and_channels_last_train_a_step(cache, tmp_path):
    """The mixed-precision path (autocast around the network only, AugMix and losses in fp32)."""
    args = ["--precision", "bf16", "--channels_last", "--max_steps_per_epoch", "2"]
    ok(run_train(SMALL + args + ["--ckpt_dir_base", str(tmp_path)], cache))
    res = results(tmp_path / "learnable_augmix_jsd")
    assert res["config"]["precision"] == "bf16" and math.isfinite(res["final"]["loss"])


@pytest.mark.slow
def test_compile_trains_and_checkpoints_plain_weights(cache, tmp_path):
    """--compile compiles the (DDP-)wrapped module with AugMix eager; the compiled steps agree with
    eager ones (inductor builds C++ on the CPU, ~40 s here)."""
    args = ["--max_steps_per_epoch", "2", "--no_train_antialias"]
    ok(
        run_train(
            SMALL + args + ["--compile", "--ckpt_dir_base", str(tmp_path / "c")], cache, timeout=600
        )
    )
    ok(run_train(SMALL + args + ["--ckpt_dir_base", str(tmp_path / "e")], cache))
    res = results(tmp_path / "c" / "learnable_augmix_jsd")
    assert res["config"]["compile"] and math.isfinite(res["final"]["loss"])
    ckpt = load_checkpoint(tmp_path / "c" / "learnable_augmix_jsd" / "last.ckpt")
    assert not any("_orig_mod" in k for k in ckpt["model"])  # loadable without compiling
    eager = _weights(tmp_path / "e" / "learnable_augmix_jsd" / "last.ckpt")
    compiled = _weights(tmp_path / "c" / "learnable_augmix_jsd" / "last.ckpt")
    assert eager.keys() == compiled.keys()
    # Same draws, same steps. Inductor reorders float sums, and Adam's normalised step turns a
    # last-bit difference of a near-zero gradient into a different step: up to 2 x lr per step
    # where the gradient's sign flips (seen here: 1 element of 0.3 M). So: at most 1 in 10,000
    # elements beyond a tenth of the 2 steps' travel (2 x lr 3e-3), none beyond 2 steps x 2 lr,
    # and the whole change the same to 0.1 %.
    total = sum(v.numel() for v in eager.values())
    far = sum(int(((compiled[k] - eager[k]).abs() > 6e-4).sum()) for k in eager)
    assert far <= total // 10_000, (far, total)
    for k in eager:
        torch.testing.assert_close(
            compiled[k], eager[k], rtol=0, atol=2 * 2 * 3e-3, msg=lambda m, k=k: f"{k}: {m}"
        )
    diff = sum(float((compiled[k].double() - eager[k].double()).norm() ** 2) for k in eager) ** 0.5
    norm = sum(float(eager[k].double().norm() ** 2) for k in eager) ** 0.5
    assert diff / norm < 1e-3, diff / norm


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~170 s on the loaded 2-core machine: 2 ranks build inductor's C++
def test_ddp_with_compile_on_two_gloo_ranks(cache, tmp_path):
    """torchrun, 2 gloo ranks, --compile: the DDP-wrapped module compiled (dynamo's DDP optimiser
    splits the graph at the gradient buckets). The replicas stay identical and the steps agree
    with eager DDP on the same draws.

    SGD, not AdamW: Adam's normalised first step turns a last-bit difference of a near-zero
    gradient into a whole step of the other sign (2 % of the elements here), which says nothing
    about the gradients. Measured against the two steps' travel (a third, lr ~ 0 run gives the
    initial weights): compiled and eager differ by 0.6 % of it (2 % with the learnable severity,
    whose steps move the views), against 0.001 % in one process or without the JSD batch; a
    missing all-reduce or a gradient scaled by the world size would differ by ~100 %."""
    args = SMALL + ["--max_steps_per_epoch", "2", "--no_train_antialias", "--device", "cpu",
                    "--optimizer", "sgd", "--aug_type", "augmix_jsd"]  # fmt: skip
    # The initial weights come from the seed alone (the same on every rank and in one process,
    # where a run costs a fork instead of a torchrun launch): "z" barely moves them.
    for name, extra, ranks in (("c", ["--compile"], 2), ("e", [], 2), ("z", ["--lr", "1e-12"], 0)):
        base = ["--ckpt_dir_base", str(tmp_path / name)]
        ok(run_train(args + extra + base, cache, torchrun=ranks, timeout=600))
    res = results(tmp_path / "c" / "augmix_jsd")
    assert res["config"]["compile"] and res["world_size"] == 2
    a, b = res["replica_checksums"]
    assert a == b and math.isfinite(res["final"]["loss"])
    compiled, eager, start = (_weights(tmp_path / n / "augmix_jsd" / "last.ckpt") for n in "cez")
    assert compiled.keys() == eager.keys()  # plain names: no _orig_mod. or module. prefix
    learned = [k for k, v in eager.items() if v.is_floating_point() and "running" not in k]

    def norm(delta) -> float:
        return sum(float(delta(k).double().norm() ** 2) for k in learned) ** 0.5

    travel = norm(lambda k: eager[k] - start[k])
    assert travel > 1e-3  # the steps moved the weights
    assert norm(lambda k: compiled[k] - eager[k]) < 0.03 * travel


def test_a_registered_benchmark_is_evaluated_after_training(cache, tmp_path):
    """A benchmark of the evaluation's registry is a train.py flag too: --imagenet_sketch (the
    synthetic val folder has its layout, <class>/<image>) is evaluated after the last epoch, and a
    folder that is not one of the model's classes stops the run before its first step."""
    val = cache / "synthetic-10c-12tr-4va-64px-seed0" / "val"  # SMALL's set, made before the check
    args = SMALL + ["--max_steps_per_epoch", "1", "--imagenet_sketch", str(val)]
    ok(run_train(args + ["--ckpt_dir_base", str(tmp_path)], cache))
    block = results(tmp_path / "learnable_augmix_jsd")["robustness"]["imagenet_sketch"]
    assert block["n"] == 40 and 0 <= block["error"] <= 100  # 10 classes x 4 val images
    bad = tmp_path / "sketch"
    (bad / "not_a_class").mkdir(parents=True)
    (bad / "not_a_class" / "x.jpg").write_bytes(b"")
    proc = run_train(
        SMALL + ["--imagenet_sketch", str(bad), "--ckpt_dir_base", str(tmp_path)], cache
    )
    assert proc.returncode == 2 and "not_a_class" in proc.stderr
    assert "epoch 1" not in proc.stderr + proc.stdout  # refused before training
