"""Real ImageNet's odd files through the loader: a PNG named .JPEG, CMYK, greyscale, progressive,
EXIF-rotated and truncated JPEGs. Every file DALI decodes is accepted whatever its extension says
and comes out as 3-channel RGB equal to PIL's; the truncated one is skipped by name (the default).
The same tree trains and evaluates under torchrun in `test_train.py`.

`quirk_tree(root)` is shared with the end-to-end test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import natural_image
from PIL import Image

from augmix_gpu.data import build_loader

QUIRKS = ("png", "cmyk", "grey", "progressive", "exif_rotated", "truncated")
CPU = dict(device="cpu", num_threads=1, prefetch=1)


def write_quirk(path: Path, quirk: str, seed: int) -> None:
    """One odd file at `path` (always named .JPEG, as in ImageNet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(natural_image((48 + seed % 5, 64 + seed % 7), seed=seed))
    if quirk == "png":  # train/n02105855/n02105855_2933.JPEG
        img.save(path, format="PNG")
    elif quirk == "cmyk":  # ~22 ImageNet training JPEGs are CMYK
        img.convert("CMYK").save(path, format="JPEG", quality=95)
    elif quirk == "grey":
        img.convert("L").save(path, format="JPEG", quality=95)
    elif quirk == "progressive":
        img.save(path, format="JPEG", quality=95, progressive=True)
    elif quirk == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 on display; ImageFolder (PIL) ignores it, and so do we
        img.save(path, format="JPEG", quality=95, exif=exif)
    elif quirk == "truncated":
        img.save(path, format="JPEG", quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # PIL and DALI both refuse it
    elif quirk == "plain":
        img.save(path, format="JPEG", quality=95)
    else:
        raise ValueError(quirk)


def quirk_tree(root: Path, plain_per_class: int = 6) -> Path:
    """`root/{train,val}/{c0,c1}/`: plain JPEGs plus every quirk in each split."""
    for split in ("train", "val"):
        for c in range(2):
            for i in range(plain_per_class):
                write_quirk(root / split / f"c{c}" / f"plain{i}.JPEG", "plain", 100 * c + i)
        for k, quirk in enumerate(QUIRKS):
            write_quirk(root / split / f"c{k % 2}" / f"{quirk}.JPEG", quirk, 50 + k)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return quirk_tree(tmp_path_factory.mktemp("quirks"), plain_per_class=2)


def test_every_decodable_quirk_is_rgb_like_pil_and_the_truncated_one_is_skipped(tree):
    """Decoded pixels against torchvision's loader (`PIL.Image.open(f).convert("RGB")`). The
    'corrupted' recipe with a crop larger than the images returns them whole, undisturbed by
    resampling, so the comparison is of the decoders alone."""
    val = tree / "val"
    loader = build_loader(val, "corrupted", batch_size=1, crop_size=256, **CPU)
    paths = list(loader._paths)  # file order == batch order with batch 1, one rank
    with pytest.warns(UserWarning, match=r"truncated\.JPEG' cannot be decoded"):
        batches = list(loader.epoch(0))
    assert [Path(p).name for p in loader.skipped] == ["truncated.JPEG"]
    assert loader.num_samples == len(paths) - 1
    for (x, _, valid), path in zip(batches, paths):
        name = Path(path).stem
        if name == "truncated":
            assert not valid.any()
            continue
        ref = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)  # CHW
        assert valid.all() and x.dtype == torch.uint8 and x.shape == (1, *ref.shape), name
        diff = np.abs(x[0].numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 1, (name, diff.max())  # libjpeg-turbo on both sides
        if name == "grey":  # replicated into 3 equal channels, not a 1-channel image
            assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])


def test_train_recipe_crops_every_quirk_to_3_channels(tree):
    loader = build_loader(tree / "train", "train", batch_size=4, crop_size=24, **CPU)
    seen = 0
    with pytest.warns(UserWarning, match=r"truncated\.JPEG"):  # found when its batch is read
        for epoch in range(3):
            for x, y, valid in loader.epoch(epoch):
                assert x.shape == (4, 3, 24, 24) and valid.all() and y.shape == (4,)
                seen += 1
    assert seen == 3 * len(loader)
    assert [Path(p).name for p in loader.skipped] == ["truncated.JPEG"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (DALI mixed decoder)")
def test_gpu_and_cpu_decoders_agree(tree):
    """The mixed decoder (nvJPEG, fancy chroma upsampling on) against libjpeg-turbo on the CPU.

    Measured on the first GPU session; with `jpeg_fancy_upsampling=False` nvJPEG's nearest
    chroma differs by ~1 grey level on average (see the README's loader section).
    """
    kw = dict(batch_size=1, crop_size=32, resize_size=40, num_threads=1, prefetch=1)
    cpu = build_loader(tree / "val", "val", device="cpu", **kw)
    gpu = build_loader(tree / "val", "val", device="gpu", **kw)
    with pytest.warns(UserWarning):
        pairs = list(zip(cpu.epoch(0), gpu.epoch(0)))
    for (xc, _, vc), (xg, _, vg) in pairs:
        assert torch.equal(vc, vg.cpu())
        if vc.all():
            assert (xc.float() - xg.cpu().float()).abs().mean() < 1.0


@pytest.mark.slow
def test_quirk_tree_trains_and_evaluates_under_torchrun(tmp_path):
    """The first real-ImageNet run in miniature: 2 gloo ranks, the default loader options, a tree
    holding every quirk in train/ and val/. It must train, evaluate every decodable val image
    exactly once across the ranks (evaluate_loader checks its count against the loader's), and
    name the truncated file instead of stopping."""
    from cli_runner import ok, run_script

    data = quirk_tree(tmp_path / "data")
    args = [
        "--data", str(data), "--arch", "tiny_resnet", "--crop_size", "32", "--val_resize", "36",
        "--batch", "4", "--epochs", "1", "--workers", "1", "--device", "cpu",
        "--no_progress", "--wandb", "disabled", "--ckpt_dir_base", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = ok(run_script("train.py", args, torchrun=2, timeout=400))
    res = json.loads((tmp_path / "run" / "learnable_augmix_jsd" / "results.json").read_text())
    assert res["world_size"] == 2 and res["history"][0]["global_step"] == 18 // 4
    assert 0 <= res["final"]["val_top1"] <= 100
    assert str(data / "val" / "c1" / "truncated.JPEG") in res["skipped_files"]
    assert "skipping corrupt image(s)" in proc.stderr and "truncated.JPEG" in proc.stderr
