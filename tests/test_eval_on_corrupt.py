"""evaluate.py --on_corrupt skip|error: a damaged file in a -C folder (an image) and in a -P folder
(a video) is skipped, left out of the counts and named in results.json, or stops the run with an
error naming it. Tiny generated trees, the model of test_evaluate_cli's recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from augmix_gpu.checkpoint import save_atomic
from augmix_gpu.data import DatasetError, make_corrupted_dataset, make_synthetic_dataset
from augmix_gpu.eval.cli import main
from augmix_gpu.models import build_model

GARBAGE = b"\xff\xd8\xff\xe0 not an image"  # a JPEG header, then nothing a decoder can use


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """3 classes x 4 val images at 64 px, a -C tree (fog, severity 1), a -P tree (rotate), and a
    checkpoint; one image of the -C tree and one video of the -P tree overwritten with garbage."""
    from augmix_gpu.data.make_p import make_perturbed_dataset

    root = tmp_path_factory.mktemp("corrupt")
    synth = make_synthetic_dataset(root / "synth", num_classes=3, train_per_class=1,
                                   val_per_class=4, size=64, seed=2, progress=False)  # fmt: skip
    c = make_corrupted_dataset(synth / "val", root / "c", severities=(1,), corruptions=("fog",),
                               seed=0, progress=False)  # fmt: skip
    p = make_perturbed_dataset(synth / "val", root / "p", perturbations=("rotate",),
                               difficulties=[1], preset="ultrafast", progress=False)  # fmt: skip
    bad_image = sorted((c / "fog" / "1").rglob("*.JPEG"))[5]
    bad_video = sorted((p / "rotate").rglob("*.mp4"))[2]
    bad_image.write_bytes(GARBAGE)
    bad_video.write_bytes(GARBAGE)
    classes = sorted(d.name for d in (synth / "val").iterdir() if d.is_dir())
    config = {"arch": "tiny_resnet", "crop_size": 56, "val_resize": 64}
    ckpt = save_atomic({"model": build_model("tiny_resnet", 3).state_dict(), "classes": classes,
                        "config": config}, root / "ckpt.pt")  # fmt: skip
    return {"c": c, "p": p, "ckpt": ckpt, "bad_image": bad_image, "bad_video": bad_video}


def _args(trees, out: Path, *extra: str) -> list[str]:
    return ["--ckpt_path", str(trees["ckpt"]), "--device", "cpu", "--batch", "5",
            "--workers", "1", "--no_progress", "--out", str(out), *extra]  # fmt: skip


def test_a_damaged_c_image_is_skipped_and_named(trees, tmp_path):
    c = ["--imagenet_c", str(trees["c"]), "--corruptions", "fog", "--severities", "1"]
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        assert main(_args(trees, tmp_path, *c)) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skipped_files"] == [str(trees["bad_image"])]
    assert res["imagenet_c"]["counts"]["fog"]["1"]["total"] == 11  # 12 images, 1 not counted
    assert (
        "Skipped as undecodable (not counted): 1 file(s)" in (tmp_path / "results.md").read_text()
    )
    with pytest.raises(DatasetError, match=str(trees["bad_image"])):
        main(_args(trees, tmp_path / "e", *c, "--on_corrupt", "error"))


def test_a_damaged_p_video_is_skipped_and_named(trees, tmp_path):
    p = ["--imagenet_p", str(trees["p"]), "--perturbations", "rotate", "--p_decoder", "cpu"]
    with pytest.warns(UserWarning, match="skipping undecodable video"):
        assert main(_args(trees, tmp_path, *p)) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skipped_files"] == [str(trees["bad_video"])]
    assert res["imagenet_p"]["counts"]["rotate"]["1"]["sequences"] == 11  # 12, 1 left out
    with pytest.raises(DatasetError, match=str(trees["bad_video"])):
        main(_args(trees, tmp_path / "e", *p, "--on_corrupt", "error"))


def test_no_damage_no_skipped_files(trees, tmp_path):
    """The clean val folder is intact: an empty list, and the error mode runs through."""
    val = trees["c"].parent / "synth" / "val"
    assert main(_args(trees, tmp_path, "--val", str(val), "--on_corrupt", "error")) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skipped_files"] == [] and res["clean"]["n"] == 12
    assert torch.load(trees["ckpt"], weights_only=False)["classes"]
