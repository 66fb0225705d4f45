"""DALI loader on the CPU: sharding, exactly-once evaluation, seeding, resume and the three recipes.

Identifiable images: `id_tree` gives every image its own class folder, so its label is its id and a
batch's labels say exactly which files it holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import natural_image
from PIL import Image
from torchvision.transforms import CenterCrop, Resize

from augmix_gpu.data import build_loader
from augmix_gpu.data.sharding import eval_indices, train_indices

CPU = dict(device="cpu", num_threads=1, prefetch=1)


def _save(path: Path, array: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=quality)


@pytest.fixture(scope="module")
def id_tree(tmp_path_factory) -> Path:
    """26 images of assorted sizes (36..70 px), one per class folder: label == image id."""
    root = tmp_path_factory.mktemp("ids")
    for i in range(26):
        h, w = 36 + (i * 7) % 30, 40 + (i * 11) % 30
        _save(root / f"c{i:03d}" / f"{i}.JPEG", natural_image((h, w), seed=i))
    return root


def _labels(loader, epoch=0, start_step=0) -> list[list[int]]:
    return [y.tolist() for _, y, _ in loader.epoch(epoch, start_step)]


def test_train_shards_disjoint_equal_and_cover(id_tree):
    per_rank = []
    for rank in range(2):
        ld = build_loader(
            id_tree, "train", batch_size=4, rank=rank, world_size=2, crop_size=32, **CPU
        )
        assert len(ld) == 26 // 8 and ld.num_samples == 12
        batches = list(ld.epoch(0))
        assert len(batches) == len(ld)
        assert all(v.all() for _, _, v in batches)
        per_rank.append([i for _, y, _ in batches for i in y.tolist()])
    a, b = (set(r) for r in per_rank)
    assert len(per_rank[0]) == len(a) == 12 and len(b) == 12  # no duplicates within a rank
    assert not a & b  # disjoint
    assert len(a | b) == 24 and (a | b) <= set(range(26))  # the set minus the 2-image ragged tail
    # ...and the dropped tail is a fresh draw per epoch: over many epochs every image is seen.
    seen = set()
    for epoch in range(20):
        for rank in range(2):
            seen |= set(train_indices(26, 4, rank, 2, seed=0, epoch=epoch).tolist())
    assert seen == set(range(26))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("recipe", ["val", "corrupted"])
def test_eval_counts_every_image_exactly_once(id_tree, world_size, recipe):
    counted, steps, total = Counter(), set(), 0
    for rank in range(world_size):
        ld = build_loader(
            id_tree, recipe, batch_size=4, rank=rank, world_size=world_size, crop_size=32,
            resize_size=36, c_resize=36, **CPU,
        )  # fmt: skip
        steps.add(len(ld))
        total += ld.num_samples
        for _, y, valid in ld.epoch(0):
            counted.update(y[valid].tolist())
    assert counted == Counter(range(26))  # each id once: padding is masked, nothing is lost
    assert len(steps) == 1 and total == 26  # equal step counts on every rank


def test_eval_padding_is_masked_and_shards_partition():
    for world in (1, 2, 3, 5, 30):
        own = []
        for rank in range(world):
            idx, valid, n = eval_indices(26, 4, rank, world)
            assert len(idx) % 4 == 0 and valid.sum() == n
            own += idx[valid].tolist()
        assert sorted(own) == list(range(26))


def test_same_seed_same_batches_other_seed_or_rank_differs(id_tree):
    def run(seed=0, rank=0):
        ld = build_loader(
            id_tree, "train", batch_size=4, seed=seed, rank=rank, world_size=2, crop_size=32, **CPU
        )
        return [(x.clone(), y.clone()) for x, y, _ in ld.epoch(3)]

    a, b = run(), run()
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_seed = run(seed=1)
    assert [y.tolist() for _, y in a] != [y.tolist() for _, y in other_seed]
    other_rank = run(rank=1)
    assert not {i for _, y in a for i in y.tolist()} & {
        i for _, y in other_rank for i in y.tolist()
    }
    # Two threads or one: the windows and flips are drawn on the host, per batch.
    ld = build_loader(
        id_tree,
        "train",
        batch_size=4,
        rank=0,
        world_size=2,
        crop_size=32,
        device="cpu",
        num_threads=2,
    )
    assert all(torch.equal(x, xa) for (x, _, _), (xa, _) in zip(ld.epoch(3), a))


def test_two_epochs_equal_fresh_loader_and_mid_epoch_resume(id_tree):
    kw = dict(batch_size=4, seed=7, crop_size=32, **CPU)
    ld = build_loader(id_tree, "train", **kw)
    e0 = [(x.clone(), y.clone()) for x, y, _ in ld.epoch(0)]
    e1 = [(x.clone(), y.clone()) for x, y, _ in ld.epoch(1)]
    fresh = build_loader(id_tree, "train", **kw)
    f1 = [(x, y) for x, y, _ in fresh.epoch(1)]
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(e1, f1))
    assert [y.tolist() for _, y in e0] != [y.tolist() for _, y in e1]  # a new order per epoch
    # Resume at batch 3 of epoch 1: the same files and pixels (crop windows, flips) as the
    # uninterrupted run from batch 3 on.
    resumed = [(x, y) for x, y, _ in fresh.epoch(1, start_step=3)]
    assert len(resumed) == len(e1) - 3
    assert all(
        torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(e1[3:], resumed)
    )
    assert _labels(fresh, 1, start_step=len(fresh)) == []


def test_train_crop_size_dtype_and_device(tmp_path):
    for i in range(8):
        _save(tmp_path / f"c{i % 2}" / f"{i}.JPEG", natural_image((64, 64), seed=i))
    for crop in (56, 64):
        ld = build_loader(tmp_path, "train", batch_size=4, crop_size=crop, resize_size=64, **CPU)
        assert ld.device == torch.device("cpu") and ld.classes == ["c0", "c1"]
        for x, y, v in ld.epoch(0):
            assert x.shape == (4, 3, crop, crop) and x.dtype == torch.uint8 and x.is_contiguous()
            assert y.dtype == torch.int64 and v.dtype == torch.bool and v.all()
            assert x.float().std() > 5  # real pixels, not a blank buffer


def test_train_antialias_switch_changes_only_the_filter(tmp_path):
    """Same seed -> same crop windows; without antialiasing a strong downscale keeps aliased
    high frequencies (a larger mean |Laplacian|), with it the crop is smoother."""
    rng = np.random.default_rng(0)
    for i in range(4):
        noisy = np.clip(
            natural_image((160, 160), seed=i) + rng.normal(0, 40, (160, 160, 3)), 0, 255
        )
        _save(tmp_path / "a" / f"{i}.JPEG", noisy.astype(np.uint8), quality=98)

    def crops(antialias: bool) -> torch.Tensor:
        ld = build_loader(tmp_path, "train", batch_size=4, crop_size=32, antialias=antialias, **CPU)
        return next(iter(ld.epoch(0)))[0].float()

    def roughness(x: torch.Tensor) -> float:
        lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]
        return float((lap - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs().mean())

    smooth, aliased = crops(True), crops(False)
    assert torch.equal(smooth, crops(True))  # deterministic
    assert (smooth - aliased).abs().mean() > 1.0  # the filter differs...
    assert (smooth.mean(dim=(2, 3)) - aliased.mean(dim=(2, 3))).abs().max() < 8  # ...not the window
    assert roughness(aliased) > 1.3 * roughness(smooth)


def test_val_is_resize_then_centre_crop_like_pil(tmp_path):
    sizes = [(80, 120), (120, 80), (97, 131)]
    for i, hw in enumerate(sizes):
        _save(tmp_path / "a" / f"{i}.JPEG", natural_image(hw, seed=10 + i), quality=98)
    ld = build_loader(tmp_path, "val", batch_size=1, crop_size=56, resize_size=64, **CPU)
    for (x, _, _), path in zip(ld.epoch(0), sorted((tmp_path / "a").iterdir())):
        pil = Image.open(path).convert("RGB")
        ref = np.asarray(CenterCrop(56)(Resize(64)(pil))).transpose(2, 0, 1).astype(np.float32)
        ours = x[0].numpy().astype(np.float32)
        err = np.abs(ours - ref).mean()
        shifted = np.asarray(Resize(64)(pil))[:56, :56].transpose(2, 0, 1)  # a top-left crop
        assert err < 3.0, (path.name, err)
        assert err < 0.5 * np.abs(ours - shifted).mean()  # the test can tell crops apart


def test_corrupted_recipe_keeps_pixels_and_crops_only_larger(tmp_path):
    img = natural_image((64, 64), seed=3)
    _save(tmp_path / "big" / "0.JPEG", img, quality=98)
    ref = np.asarray(Image.open(tmp_path / "big" / "0.JPEG").convert("RGB"))
    ld = build_loader(tmp_path, "corrupted", batch_size=1, crop_size=56, **CPU)
    (x, _, _), = ld.epoch(0)  # fmt: skip
    assert x.shape == (1, 3, 56, 56)
    assert (
        np.abs(x[0].numpy().transpose(1, 2, 0).astype(int) - ref[4:60, 4:60].astype(int)).max() <= 2
    )
    ld = build_loader(tmp_path, "corrupted", batch_size=1, crop_size=80, **CPU)  # larger than image
    assert next(iter(ld.epoch(0)))[0].shape == (1, 3, 64, 64)  # kept whole, not padded
    ld = build_loader(tmp_path, "corrupted", batch_size=1, crop_size=56, c_resize=72, **CPU)
    assert next(iter(ld.epoch(0)))[0].shape == (1, 3, 56, 56)


def test_bad_arguments(id_tree):
    with pytest.raises(ValueError, match="GLOBAL rank"):
        build_loader(id_tree, "train", batch_size=2, rank=2, world_size=2, **CPU)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(id_tree, "train", batch_size=16, world_size=2, **CPU)
    with pytest.raises(ValueError, match="recipe must be one of"):
        build_loader(id_tree, "test", batch_size=2, **CPU)
    with pytest.raises(ValueError, match="device must be"):
        build_loader(id_tree, "val", batch_size=2, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            build_loader(id_tree, "val", batch_size=2, device="gpu")
        assert build_loader(id_tree, "val", batch_size=2, device="auto").device.type == "cpu"


def test_importing_the_data_package_loads_no_dali_or_corruptions():
    import subprocess
    import sys

    code = (
        "import sys, augmix_gpu.data; "
        "print(any(m.startswith(('nvidia.dali', 'imagecorruptions', 'numba')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
