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


# The effect the GPU decoder test guards: nvJPEG's default (replicated) chroma against the fancy
# upsampling of libjpeg-turbo and PIL differs by 0.46 grey levels on average at decode size on
# 4:2:0 photo-like JPEGs (docs/benchmarks.md, "GPU vs CPU pixels"). The test allows a third of it.
DECODER_BOUND = 0.15  # mean |GPU - CPU| in grey levels, per image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """`root/c0/*.JPEG`: photo-like 4:2:0 JPEGs at quality 90, 448 px (a size nvJPEG's hardware
    engine takes), as the upsampling benchmark writes them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import photo_like

    root = tmp_path_factory.mktemp("photos")
    (root / "c0").mkdir()
    for i in range(8):
        Image.fromarray(photo_like(448, seed=i)).save(root / "c0" / f"{i}.JPEG", quality=90)
    return root


def test_the_decoder_bound_is_below_the_chroma_effect(photos):
    """The control, on the CPU: replicated chroma (the mixed decoder without the flag), emulated
    exactly from libjpeg's native chroma samples, is further from the fancy decode than the GPU
    test's bound on these very images."""
    from bench_loader import cpu_chroma_variants

    diffs = [
        np.abs(f - n).mean() for f, n in map(cpu_chroma_variants, sorted(photos.rglob("*.JPEG")))
    ]
    assert min(diffs) > 2 * DECODER_BOUND, diffs  # ~0.45 each


def _decoded(folder: Path, device: str, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Whole images (the -C recipe, crop larger than every image: no resampling)."""
    kw = dict(batch_size=batch, crop_size=512, num_threads=2, prefetch=1, device=device)
    return [(x.cpu(), v.cpu()) for x, _, v in build_loader(folder, "corrupted", **kw).epoch(0)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (DALI mixed decoder)")
@pytest.mark.parametrize("hw_decoder_load", [0.0, None], ids=["cuda_decoder", "default_hw_share"])
def test_gpu_and_cpu_decoders_agree(tree, photos, hw_decoder_load, monkeypatch):
    """The mixed decoder (nvJPEG, jpeg_fancy_upsampling on) against libjpeg-turbo on the CPU,
    decoders only, within a third of the chroma effect. Twice: every image on the CUDA decoder
    (`hw_decoder_load=0`), and with DALI's default share (0.65) on the hardware JPEG engine of
    A100/H100-class GPUs, which must honour the flag as well."""
    from augmix_gpu.data import pipeline

    if hw_decoder_load is not None:
        real = pipeline._decoder
        monkeypatch.setattr(pipeline, "_decoder",
                            lambda device: {**real(device), "hw_decoder_load": hw_decoder_load})  # fmt: skip
    with pytest.warns(UserWarning, match="truncated"):
        quirks = list(zip(_decoded(tree / "val", "cpu", 1), _decoded(tree / "val", "gpu", 1)))
    pairs = quirks + list(zip(_decoded(photos, "cpu", 4), _decoded(photos, "gpu", 4)))
    for (xc, vc), (xg, vg) in pairs:
        assert torch.equal(vc, vg)
        for a, b in zip(xc[vc], xg[vg]):
            mean = (a.float() - b.float()).abs().mean()
            assert mean < DECODER_BOUND, f"mean |GPU - CPU| = {mean:.3f} levels"


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
