"""train.py and ImageNet-P: the end-of-run -P evaluation, --eval_only forwarding, the demo's set."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import ok, run_script

from augmix_gpu.distributed import DistEnv
from augmix_gpu.eval.settings import ModelSource
from augmix_gpu.train.config import resolve_settings
from augmix_gpu.train.data import prepare_data
from augmix_gpu.train.final_eval import eval_settings

pytest.importorskip("av")
pytest.importorskip("imagecorruptions")
ENV = DistEnv(0, 0, 1, torch.device("cpu"), None)
SMALL = [
    "--synthetic_train_per_class", "12", "--synthetic_val_per_class", "2", "--no_c_eval",
    "--batch", "20", "--crop_size", "32", "--val_resize", "36", "--workers", "1",
    "--no_progress", "--wandb", "disabled", "--epochs", "1", "--max_steps_per_epoch", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def p_tree(tmp_path_factory):
    """The synthetic task of SMALL (made by prepare_data) and a 1-perturbation -P set of its val."""
    from augmix_gpu.data.make_p import make_perturbed_dataset

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUGMIX_GPU_CACHE", str(cache))
        spec = prepare_data(resolve_settings(SMALL), ENV)
    p = make_perturbed_dataset(spec.val, cache / "p", perturbations=["rotate"], per_class=1,
                               preset="ultrafast", progress=False)  # fmt: skip
    return cache, p


def test_data_spec_and_eval_only_forward_the_p_tree(p_tree, monkeypatch, tmp_path):
    cache, p = p_tree
    monkeypatch.setenv("AUGMIX_GPU_CACHE", str(cache))
    spec = prepare_data(resolve_settings(SMALL + ["--imagenet_p", str(p)]), ENV)
    assert spec.roots == {"imagenet_p": p}  # no -C: SMALL has --no_c_eval
    no_p = prepare_data(resolve_settings(SMALL + ["--imagenet_p", str(p), "--no_p_eval"]), ENV)
    assert "imagenet_p" not in no_p.roots
    # The demo's generated set comes with the -C one (SMALL has --no_c_eval: none).
    assert prepare_data(resolve_settings(SMALL), ENV).roots == {}
    settings = resolve_settings(SMALL + ["--imagenet_p", str(p), "--ckpt_path", "x.ckpt",
                                         "--eval_only", "--ckpt_dir_base", str(tmp_path)])  # fmt: skip
    source = ModelSource(ckpt_path="x.ckpt")
    options = eval_settings(settings, prepare_data(settings, ENV), 1, source)
    assert options.roots == {"imagenet_p": str(p)} and options.model.ckpt_path == "x.ckpt"


@pytest.mark.slow
def test_a_run_ends_with_the_p_evaluation(p_tree, tmp_path):
    cache, p = p_tree
    args = SMALL + ["--imagenet_p", str(p), "--ckpt_dir_base", str(tmp_path)]
    proc = ok(run_script("train.py", args, env={"AUGMIX_GPU_CACHE": str(cache)}))
    run = tmp_path / "learnable_augmix_jsd"
    block = json.loads((run / "results.json").read_text())["robustness"]["imagenet_p"]
    assert block["counts"]["rotate"]["1"]["sequences"] == 10 and block["partial"]
    assert "imagenet_c" not in json.loads((run / "eval" / "results.json").read_text())
    assert (run / "eval" / "results_flips.png").is_file() and "| rotate | 1 | 10 |" in proc.stdout


def test_the_demos_c_set_is_made_from_the_first_val_images_of_each_class(tmp_path, monkeypatch):
    """synthetic_c_per_class: clean accuracy on the whole val split, -C on its first N per class
    (the demo: 1000 val images, -C of 100), in a cache folder of its own."""
    monkeypatch.setenv("AUGMIX_GPU_CACHE", str(tmp_path))
    argv = [a for a in SMALL if a != "--no_c_eval"] + [
        "--no_p_eval", "--synthetic_val_per_class", "3", "--synthetic_c_per_class", "1",
        "--c_severities", "2",
    ]  # fmt: skip
    spec = prepare_data(resolve_settings(argv), ENV)
    c_root = spec.roots["imagenet_c"]
    assert c_root.name == "c-sev2-1pc" and "imagenet_p" not in spec.roots
    val = sorted(p.relative_to(spec.val) for p in spec.val.rglob("*.JPEG"))
    assert len(val) == 30
    first = sorted(p for p in val if p.stem.endswith("00000"))
    for corruption in ("gaussian_noise", "jpeg_compression"):
        got = sorted(p.relative_to(c_root / corruption / "2") for p in c_root.rglob("*.JPEG")
                     if p.is_relative_to(c_root / corruption / "2"))  # fmt: skip
        assert got == first
