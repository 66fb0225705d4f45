"""The CIFAR path end to end: `train.py --config augmix_cifar.toml --data D --cifar_c C` on the
generated CIFAR-100-format set and its CIFAR-C, then resume across loaders and --eval_only.

Everything of the preset is kept but the budget: 2 epochs of 80 images at batch 32 (3 steps: the
last of 16, kept as cifar.py keeps it), and a WRN-10-1 for the WRN-40-2 (same code, 1/60 of the
compute; the 40-2 is pinned in test_models_cifar).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import ok, run_script

from augmix_gpu.checkpoint import load_checkpoint
from augmix_gpu.data import make_c, synthetic

BUDGET = ["--epochs", "2", "--batch", "32", "--arch", "wrn10_1", "--workers", "1",
          "--no_progress", "--wandb", "disabled"]  # fmt: skip


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, Path]:
    """10 classes in the CIFAR-100 layout: 80 train / 10 test images, and the test set's -C."""
    root = tmp_path_factory.mktemp("cifar")
    data = synthetic.make_synthetic_cifar(
        root / "cifar", name="cifar100", train_per_class=8, test_per_class=1, progress=False
    )
    c = make_c.make_cifar_c(data, root / "CIFAR-100-C", name="cifar100", progress=False)
    return data, c


@pytest.fixture(scope="module")
def straight(cifar, tmp_path_factory) -> tuple[Path, str]:
    """The one command, as a user types it (plus the budget)."""
    data, c = cifar
    out = tmp_path_factory.mktemp("straight")
    args = ["--config", "augmix_cifar.toml", "--data", str(data), "--cifar_c", str(c)]
    proc = ok(run_script("train.py", args + BUDGET + ["--ckpt_dir_base", str(out)]))
    return out / "augmix_jsd", proc.stdout


def official_get_lr(step: int, total: int, lr_max: float = 0.1, lr_min: float = 1e-6) -> float:
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(step / total * math.pi))


@pytest.mark.slow
def test_one_command_trains_the_preset_and_reports_cifar_c(straight):
    run, stdout = straight
    res = json.loads((run / "results.json").read_text())
    c = res["config"]
    assert (c["dataset"], c["schedule"], c["optimizer"], c["aug_type"]) == (
        "cifar100", "cosine", "sgd", "augmix_jsd",
    )  # fmt: skip
    assert (c["initial_aug_severity"], c["beta_jsd"], c["beta_net"]) == (3.0, 12.0, 5e-4)
    assert (c["normalization"], c["last_batch"]) == ("half", "keep")
    # The lr the trainer set at the last step of each epoch: get_lr over 2 epochs x 3 steps
    # (cifar.py's len(train_loader) for 80 images at batch 32: 32, 32, 16).
    assert [h["global_step"] for h in res["history"]] == [3, 6]
    for h in res["history"]:
        assert h["lr"] == pytest.approx(official_get_lr(h["global_step"] - 1, 6), rel=1e-12)
    rob = res["robustness"]
    block = rob["cifar_c"]
    assert block["dataset"] == "CIFAR100-C" and not block["partial"]
    assert len(block["corruptions"]) == 15 and block["severities"] == [1, 2, 3, 4, 5]
    assert "ce" not in block  # no AlexNet normalisation on CIFAR: the unnormalised mean
    per_c = block["corruption_error"]
    assert block["mean_corruption_error"] == pytest.approx(sum(per_c.values()) / 15)
    # The clean error of the DALI evaluation equals the resident loader's val at the last epoch.
    assert rob["clean"]["top1"] == pytest.approx(res["final"]["val_top1"])
    assert {p.name for p in (run / "eval").iterdir()} >= {"results.json", "results.md"}
    assert f"CIFAR100-C mean corruption error: {block['mean_corruption_error']:.2f} %" in stdout


@pytest.mark.slow
def test_dali_run_stopped_mid_epoch_resumes_on_the_resident_loader_exactly(cifar, tmp_path):
    """Both loaders draw the same batches, and a resumed epoch repeats the straight one (the DALI
    loader drops the ragged last batch: --last_batch drop, against a straight resident run)."""
    data, _ = cifar
    args = ["--config", "augmix_cifar.toml", "--data", str(data), "--no_c_eval", *BUDGET,
            "--last_batch", "drop"]  # fmt: skip
    ref, out = ["--ckpt_dir_base", str(tmp_path / "ref")], ["--ckpt_dir_base", str(tmp_path)]
    stop = ["--cifar_loader", "dali", "--debug_stop_at_step", "3"]
    ok(run_script("train.py", args + out + stop))
    assert load_checkpoint(tmp_path / "augmix_jsd" / "last.ckpt")["train_state"]["global_step"] == 3
    ok(run_script("train.py", args + out + ["--resume", "auto"]))
    ok(run_script("train.py", args + ref))
    a = load_checkpoint(tmp_path / "ref" / "augmix_jsd" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "augmix_jsd" / "last.ckpt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_eval_only_reproduces_the_end_of_run_report(cifar, straight, tmp_path):
    data, c = cifar
    run, _ = straight
    args = ["--config", "augmix_cifar.toml", "--data", str(data), "--cifar_c", str(c),
            "--eval_only", "--ckpt_path", str(run / "last.ckpt"), "--ckpt_dir_base", str(tmp_path),
            "--batch", "32", "--workers", "1", "--no_progress"]  # fmt: skip
    ok(run_script("train.py", args))
    again = json.loads((tmp_path / "augmix_jsd" / "eval" / "results.json").read_text())
    first = json.loads((run / "results.json").read_text())["robustness"]
    assert again["cifar_c"]["error"] == first["cifar_c"]["error"]
    assert again["clean"]["top1"] == first["clean"]["top1"]


@pytest.mark.slow
def test_half_normalisation_flows_to_validation_checkpoint_and_evaluate_py(
    cifar, straight, tmp_path
):
    """The preset's 0.5 / 0.5: the trainer's validation NLL and evaluate.py's clean NLL of the
    final weights both equal cifar.py's preprocess ((x / 255 - 0.5) / 0.5) through the network,
    computed here by hand; evaluate.py reads the normalisation from the checkpoint's settings."""
    from augmix_gpu.data import load_cifar
    from augmix_gpu.models import build_model

    data, _ = cifar
    run, _ = straight
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["config"]["normalization"] == "half"
    model = build_model("wrn10_1", len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    test = load_cifar(data, "cifar100", train=False)
    x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model.eval()(x), torch.from_numpy(test.labels))
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["val_nll"] == pytest.approx(nll.item(), rel=1e-4)
    args = ["--ckpt_path", str(run / "last.ckpt"), "--cifar", str(data), "--cifar_name",
            "cifar100", "--device", "cpu", "--no_progress", "--out", str(tmp_path)]  # fmt: skip
    ok(run_script("evaluate.py", args))
    evaluated = json.loads((tmp_path / "results.json").read_text())
    assert evaluated["clean"]["nll"] == pytest.approx(nll.item(), rel=1e-4)
    assert evaluated["preprocessing"]["normalization"].startswith("half")


def test_cifar_arguments_fail_before_any_work(cifar, tmp_path):
    from augmix_gpu.data import DatasetError
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.train.config import resolve_settings, validate_settings
    from augmix_gpu.train.data import prepare_data

    data, c = cifar
    base = ["--config", "augmix_cifar.toml", "--data", str(data)]
    with pytest.raises(ValueError, match="--cifar_c .*needs --dataset cifar10 or cifar100"):
        validate_settings(resolve_settings(["--cifar_c", str(c)]), world_size=1)
    with pytest.raises(ValueError, match="--imagenet_c .*evaluated with --cifar_c"):
        validate_settings(resolve_settings(base + ["--imagenet_c", str(c)]), world_size=1)
    with pytest.raises(ValueError, match="--cifar_c .*holding labels.npy"):
        validate_settings(resolve_settings(base + ["--cifar_c", str(tmp_path)]), world_size=1)
    np.save(tmp_path / "labels.npy", np.arange(5, dtype=np.uint8))  # a 5-class -C set
    config = resolve_settings(base + ["--cifar_c", str(tmp_path)])
    validate_settings(config, world_size=1)
    env = DistEnv(0, 0, 1, torch.device("cpu"), None)
    with pytest.raises(DatasetError, match="holds 5 classes but the cifar100 model has 10"):
        prepare_data(config, env)
