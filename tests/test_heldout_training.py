"""train.py with --severity_objective heldout: bad input, DDP under torchrun (every rank keeps the
same severity), and exact resume through the held-out updates."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from cli_runner import ok, run_script
from test_train import SMALL, _weights, results

from augmix_gpu.checkpoint import load_checkpoint

HELDOUT = ["--severity_objective", "heldout", "--severity_update_every", "2"]
PAIRED_HORIZON = ["--severity_estimator", "paired", "--severity_horizon", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_train(args: list[str], cache: Path, *, torchrun: int = 0, timeout: float = 300):
    return run_script(
        "train.py", args, torchrun=torchrun, timeout=timeout, env={"AUGMIX_GPU_CACHE": str(cache)}
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--severity_update_every", "0"], "--severity_update_every 0: must be >= 1"),
        (HELDOUT + ["--heldout_images", "0.7"], "--heldout_images 0.7: the held-out fraction"),
        (
            HELDOUT + ["--aug_type", "augmix_jsd"],
            "--severity_objective 'heldout': needs --aug_type learnable_augmix_jsd",
        ),
        (HELDOUT + ["--heldout_corruptions", "spatter", "fog"], "['fog']: evaluation corruption"),
        (HELDOUT + ["--severity_hyper_lr", "0"], "--severity_hyper_lr 0.0: must be > 0"),
        (
            HELDOUT + ["--severity_lookaheads", "3"],
            "--severity_lookaheads 3: at most --severity_update_every (2)",
        ),
        (
            HELDOUT + ["--severity_horizon", "2"],
            "--severity_horizon 2: a horizon of more than one step is measured by pairs: add "
            "--severity_estimator paired (got pathwise)",
        ),
        (
            HELDOUT + ["--severity_estimator", "paired", "--severity_horizon", "3"],
            "--severity_horizon 3: at most --severity_update_every (2)",
        ),
        (
            HELDOUT + PAIRED_HORIZON + ["--severity_lookaheads", "2"],
            "--severity_lookaheads 2: must be 1 with --severity_horizon > 1",
        ),
        (
            ["--exclude_heldout", "--dataset", "cifar10", "--data", "."],
            "--exclude_heldout True: needs an image-folder dataset (not CIFAR arrays)",
        ),
        (
            HELDOUT + ["--severity_hold_epochs", "3", "--epochs", "3"],
            "--severity_hold_epochs 3: must be below --epochs (3)",
        ),
    ],
)
def test_bad_heldout_arguments_fail_before_work(args, message) -> None:
    from augmix_gpu.train.config import resolve_settings, validate_settings

    with pytest.raises(ValueError, match=re.escape(message)):
        validate_settings(resolve_settings(args), world_size=1)


def test_exclude_heldout_trains_a_fixed_run_on_the_heldout_runs_images(cache, tmp_path) -> None:
    """A fixed severity with --exclude_heldout trains without the held-out split (108 of the
    120 images: 5 steps of 20, not 6), the same split a held-out run takes (its root), and no
    updater reads it."""
    fixed = SMALL + ["--aug_type", "augmix_jsd"]
    runs = {"plain": fixed, "excluded": fixed + ["--exclude_heldout"], "heldout": SMALL + HELDOUT}
    logs = {}
    for name, args in runs.items():
        proc = run_train(args + ["--ckpt_dir_base", str(tmp_path / name)], cache)
        ok(proc)
        logs[name] = proc.stdout + proc.stderr
    assert "held-out split excluded from training (--exclude_heldout)" in logs["excluded"]
    assert "held-out objective:" in logs["heldout"] and "held-out" not in logs["plain"]
    plain = results(tmp_path / "plain" / "augmix_jsd")
    excluded = results(tmp_path / "excluded" / "augmix_jsd")
    heldout = results(tmp_path / "heldout" / "learnable_augmix_jsd")
    assert plain["history"][0]["global_step"] == 6 and plain["heldout"] is None
    assert excluded["history"][0]["global_step"] == 5
    assert excluded["heldout"]["images"] == 12 and excluded["heldout"]["read_by"].startswith(
        "nothing"
    )
    assert excluded["heldout"]["root"] == heldout["heldout"]["root"]
    assert not any("hypergrad_mu" in t for t in excluded["severity_trajectory"])


def test_too_many_heldout_images_is_one_line(cache, tmp_path) -> None:
    """A count is checked against the tree once it is known: one line, no traceback."""
    proc = run_train(
        SMALL + HELDOUT + ["--heldout_images", "100", "--ckpt_dir_base", str(tmp_path)], cache
    )
    assert proc.returncode == 2
    assert "holds out 100 of 120 training images" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_heldout_objective_under_torchrun(cache, tmp_path) -> None:
    ok(
        run_train(
            SMALL
            + HELDOUT
            + ["--epochs", "2", "--device", "cpu", "--ckpt_dir_base", str(tmp_path)],
            cache,
            torchrun=2,
        )
    )
    res = results(tmp_path / "learnable_augmix_jsd")
    a, b = res["replica_checksums"]
    assert a == b, "ranks must keep the same network AND severity"
    held = res["heldout"]
    assert held["images"] == 12 and held["corruptions"] == [
        "speckle_noise", "gaussian_blur", "spatter", "saturate"
    ]  # fmt: skip
    steps = res["history"][-1]["global_step"]
    updates = [t for t in res["severity_trajectory"] if "hypergrad_mu" in t]
    assert [t["step"] for t in updates] == list(range(2, steps + 1, 2))
    assert all(t["heldout_loss"] > 0 for t in updates)
    for epoch in res["history"]:  # each epoch's updates and their signal-to-noise
        first = epoch["global_step"] - steps // 2
        mine = [t["hypergrad_mu"] for t in updates if first < t["step"] <= epoch["global_step"]]
        assert epoch["hypergrad_updates"] == len(mine) >= 2
        assert epoch["hypergrad_mu_mean"] == pytest.approx(sum(mine) / len(mine))
        assert epoch["hypergrad_snr"] == pytest.approx(
            epoch["hypergrad_mu_mean"] / epoch["hypergrad_mu_se"]
        )
    mu0 = torch.tensor(3.0).log().item()
    assert res["history"][-1]["severity_mu"] != pytest.approx(mu0, abs=1e-6), "severity never moved"
    # The training loss does not move the severity: between updates mu stays put.
    traj = res["severity_trajectory"]
    for before, after in zip(traj, traj[1:]):
        if "hypergrad_mu" not in after:
            assert after["severity_mu"] == before["severity_mu"]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [PAIRED_HORIZON, ["--severity_estimator", "paired"]],
                         ids=["horizon", "one_step"])  # fmt: skip
def test_paired_estimators_under_torchrun_keep_the_ranks_alike(cache, tmp_path, estimator) -> None:
    """Two ranks, paired every 3 steps (over a horizon of 2, or one step): each rank draws its
    own severities, so the pair's span and spread are averaged over ranks as its held-out loss
    and (horizon) its copies' gradients are; both ranks take the same updates and end with the
    same network and severity, which moved."""
    args = SMALL + HELDOUT + estimator + ["--severity_update_every", "3", "--epochs", "2",
                                               "--device", "cpu", "--ckpt_dir_base", str(tmp_path)]  # fmt: skip
    ok(run_train(args, cache, torchrun=2))
    res = results(tmp_path / "learnable_augmix_jsd")
    a, b = res["replica_checksums"]
    assert a == b, "ranks must keep the same network AND severity"
    updates = [t["step"] for t in res["severity_trajectory"] if "hypergrad_mu" in t]
    assert updates == list(range(3, res["history"][-1]["global_step"] + 1, 3))
    assert res["history"][-1]["severity_mu"] != pytest.approx(math.log(3.0), abs=1e-6)


@pytest.mark.slow
def test_heldout_resume_is_exact(cache, tmp_path) -> None:
    """2 epochs straight == stopped mid-epoch 2 (between the two lookaheads of one severity
    update: their running sum is part of the checkpoint) + --resume."""
    common = SMALL + HELDOUT + ["--epochs", "2", "--seed", "5", "--severity_update_every", "3",
                                "--severity_lookaheads", "2"]  # fmt: skip
    ok(run_train(common + ["--ckpt_dir_base", str(tmp_path / "straight")], cache))
    straight = tmp_path / "straight" / "learnable_augmix_jsd"
    steps = results(straight)["history"][0]["global_step"]
    # after `stop` steps the first lookahead of a cycle is done (0-based step stop - 1 is 2 steps
    # before its update: -(stop) % 3 == 1), the second and the update are not
    stop = next(c for c in range(steps + 1, 2 * steps) if -c % 3 == 1)
    split = tmp_path / "split"
    ok(
        run_train(
            common + ["--ckpt_dir_base", str(split), "--debug_stop_at_step", str(stop)], cache
        )
    )
    assert load_checkpoint(split / "learnable_augmix_jsd" / "last.ckpt")["severity_updater"]
    ok(run_train(common + ["--ckpt_dir_base", str(split), "--resume", "auto"], cache))
    a, b = _weights(straight / "last.ckpt"), _weights(split / "learnable_augmix_jsd" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ra, rb = results(straight), results(split / "learnable_augmix_jsd")
    assert ra["history"][-1]["severity_mu"] == pytest.approx(
        rb["history"][-1]["severity_mu"], abs=1e-6
    )
    assert ra["history"][-1]["severity_mu"] != ra["history"][0]["severity_mu"]


def test_the_estimator_flags_reach_the_hypergradient(cache, tmp_path) -> None:
    """--severity_step_length free and --severity_estimator paired (and its --severity_log_step):
    the same run (seed, batches, draws) takes other severity updates than with the defaults
    (fixed, pathwise, 0.5); a value outside the choices is refused in one line."""
    bad = run_train(HELDOUT + ["--severity_step_length", "long"], cache)
    assert bad.returncode == 2 and "invalid choice: 'long'" in bad.stderr
    args = SMALL + HELDOUT + ["--max_steps_per_epoch", "4", "--severity_hyper_lr", "0.5"]
    mus = {}
    for name, flags in (("default", []), ("free", ["--severity_step_length", "free"]),
                        ("paired", ["--severity_estimator", "paired"]),
                        ("paired_near", ["--severity_estimator", "paired",
                                         "--severity_log_step", "0.1"])):  # fmt: skip
        out = tmp_path / name
        ok(run_train(args + flags + ["--ckpt_dir_base", str(out)], cache))
        res = results(out / "learnable_augmix_jsd")
        config = res["config"]
        assert (config["severity_step_length"], config["severity_estimator"]) == {
            "default": ("fixed", "pathwise"), "free": ("free", "pathwise"),
            "paired": ("fixed", "paired"), "paired_near": ("fixed", "paired")}[name]  # fmt: skip
        mus[name] = [h["hypergrad_mu_mean"] for h in res["history"]]
        assert all(m is not None and math.isfinite(m) for m in mus[name])
    assert mus["default"] != mus["free"] and mus["default"] != mus["paired"]
    assert mus["paired"] != mus["paired_near"]  # --severity_log_step reaches the estimator


@pytest.mark.slow
def test_horizon_run_holds_its_first_epoch_and_resumes_inside_a_window(cache, tmp_path) -> None:
    """--severity_horizon 2 every 3 steps, held for epoch 1, with --severity_update_rule sign:
    the severity stays at its start through epoch 1 and is updated every third step after it,
    each update moving mu by 0.2 against its reading; a run stopped with the pair forked and one
    of its steps taken (its copies are in the checkpoint) and resumed ends as the straight run
    does."""
    common = SMALL + HELDOUT + PAIRED_HORIZON + [
        "--epochs", "3", "--seed", "4", "--severity_update_every", "3",
        "--severity_hold_epochs", "1", "--severity_hyper_lr", "0.2",
        "--severity_update_rule", "sign"]  # fmt: skip
    ok(run_train(common + ["--ckpt_dir_base", str(tmp_path / "straight")], cache))
    straight = tmp_path / "straight" / "learnable_augmix_jsd"
    res = results(straight)
    steps = res["history"][0]["global_step"]
    updates = [t["step"] for t in res["severity_trajectory"] if "hypergrad_mu" in t]
    first = next(s for s in range(steps + 1, 3 * steps + 1) if s % 3 == 0 and s - 3 >= steps)
    assert updates == list(range(first, 3 * steps + 1, 3)) and len(updates) >= 2
    mu0 = math.log(3.0)
    assert res["history"][0]["severity_mu"] == pytest.approx(mu0, abs=1e-6), "moved in the hold"
    assert res["history"][1]["severity_mu"] != pytest.approx(mu0, abs=1e-3)
    mu = mu0  # the sign rule: each update's step is 0.2 against its reading, nothing between
    for t in res["severity_trajectory"]:
        if "hypergrad_mu" in t:
            mu -= 0.2 * math.copysign(1, t["hypergrad_mu"])
        assert t["severity_mu"] == pytest.approx(mu, abs=1e-5), t
    # stopped after `stop` steps: 0-based step stop - 1 has its update 1 step ahead, so the pair
    # forked after step stop - 2 and took step stop - 1; 2 steps before an update (-stop % 3 == 1)
    stop = next(c for c in range(first, 3 * steps) if -c % 3 == 1)
    split = tmp_path / "split"
    ok(run_train(common + ["--ckpt_dir_base", str(split), "--debug_stop_at_step", str(stop)],
                 cache))  # fmt: skip
    saved = load_checkpoint(split / "learnable_augmix_jsd" / "last.ckpt")["severity_updater"]
    assert saved["horizon_pair"] is not None and saved["horizon_pair"]["steps"] == 1
    ok(run_train(common + ["--ckpt_dir_base", str(split), "--resume", "auto"], cache))
    a, b = _weights(straight / "last.ckpt"), _weights(split / "learnable_augmix_jsd" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert results(split / "learnable_augmix_jsd")["history"][-1]["severity_mu"] == pytest.approx(
        res["history"][-1]["severity_mu"], abs=1e-6
    )
