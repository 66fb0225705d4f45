"""The device-resident CIFAR loader: its crop against a hand loop, its batches against DALI's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from augmix_gpu.data import CifarArrays, ResidentLoader, build_loader, pad_crop_flip
from augmix_gpu.data.resident import pad_images

DALI_CPU = dict(device="cpu", num_threads=1, prefetch=1)


def _arrays(n: int, seed: int = 0, labels: np.ndarray | None = None) -> CifarArrays:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10 if labels is None else labels
    return CifarArrays(images, labels, [str(k) for k in range(max(10, int(labels.max()) + 1))])


def test_pad_crop_flip_equals_a_hand_loop():
    """torchvision's RandomCrop(padding=4) then RandomHorizontalFlip, written out per image."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 7, 9), dtype=np.uint8)  # H != W catches a swap
    index = rng.integers(0, 6, 12)
    offsets = rng.integers(-4, 5, (12, 2))
    offsets[:3] = [[-4, -4], [4, 4], [0, 0]]  # the extremes and the identity
    flips = rng.integers(0, 2, 12).astype(bool)
    out = pad_crop_flip(
        pad_images(torch.from_numpy(images)),
        torch.from_numpy(index),
        torch.from_numpy(offsets),
        torch.from_numpy(flips),
    )
    for k in range(12):
        padded = np.pad(images[index[k]], ((0, 0), (4, 4), (4, 4)))
        dy, dx = offsets[k] + 4
        window = padded[:, dy : dy + 7, dx : dx + 9]
        expected = window[:, :, ::-1] if flips[k] else window
        assert np.array_equal(out[k].numpy(), expected), k
    assert out.dtype == torch.uint8 and out.shape == (12, 3, 7, 9)
    floats = pad_crop_flip(
        pad_images(torch.from_numpy(images).float()),
        torch.from_numpy(index),
        torch.from_numpy(offsets),
        torch.from_numpy(flips),
    )
    assert torch.equal(floats, out.float())
    strided = pad_images(torch.from_numpy(images)).transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        pad_crop_flip(strided, *(torch.from_numpy(a) for a in (index, offsets, flips)))


def test_train_batches_equal_the_dali_loaders():
    """Same seed, same pixels: the order, the crops and the flips of every step, on every rank."""
    arrays = _arrays(70, seed=1)
    for rank in range(2):
        kw = dict(batch_size=8, rank=rank, world_size=2, seed=11)
        dali = build_loader(arrays, "train", **kw, **DALI_CPU)
        resident = ResidentLoader(arrays, "train", device="cpu", **kw)
        assert len(resident) == len(dali) == 4 and resident.num_samples == dali.num_samples
        for epoch in (0, 3):
            pairs = list(zip(dali.epoch(epoch), resident.epoch(epoch), strict=True))
            for (x1, y1, v1), (x2, y2, v2) in pairs:
                assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(v1, v2)
                assert x2.dtype == torch.uint8 and y2.dtype == torch.int64 and v2.all()


@pytest.mark.parametrize("world", [1, 3])
def test_eval_batches_equal_the_dali_loaders_and_count_once(world):
    arrays = _arrays(23, seed=2, labels=np.arange(23))  # the label names the image
    seen = Counter()
    for rank in range(world):
        kw = dict(batch_size=4, rank=rank, world_size=world)
        dali = build_loader(arrays, "val", **kw, **DALI_CPU)
        resident = ResidentLoader(arrays, "val", device="cpu", **kw)
        assert resident.num_samples == dali.num_samples
        for (x1, y1, v1), (x2, y2, v2) in zip(dali.epoch(0), resident.epoch(0), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(v1, v2)
            seen.update(y2[v2].tolist())
            assert torch.equal(x2[v2].permute(0, 2, 3, 1), torch.from_numpy(arrays.images[y2[v2]]))
    assert seen == Counter(range(23))  # every image once, whatever the world size


def test_resume_mid_epoch_is_exact_and_shards_partition():
    arrays = _arrays(50, seed=3, labels=np.arange(50))
    loaders = [ResidentLoader(arrays, "train", batch_size=4, rank=r, world_size=2, seed=5,
                              device="cpu") for r in range(2)]  # fmt: skip
    full = list(loaders[1].epoch(2))
    resumed = list(loaders[1].epoch(2, start_step=4))
    assert len(resumed) == len(full) - 4
    for (x1, y1, _), (x2, y2, _) in zip(full[4:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    taken = [y for ld in loaders for _, labels, _ in ld.epoch(2) for y in labels.tolist()]
    assert len(taken) == len(set(taken)) == 48  # 2 ranks x 6 steps x 4, ragged tail dropped
    other_epoch = [y for _, labels, _ in loaders[0].epoch(3) for y in labels.tolist()]
    assert other_epoch != [y for _, labels, _ in loaders[0].epoch(2) for y in labels.tolist()]


@pytest.mark.parametrize("world", [1, 3])
def test_kept_last_batch_is_split_evenly_and_extends_the_dropping_epoch(world):
    """keep_last: 55 images at batch 4 (x world) -> the full steps as without it, then one more
    step holding each rank's equal share of the tail, (55 mod 4 world) // world images (1 rank:
    3; 3 ranks: 7 // 3 = 2 each, 1 left out); every image at most once, under world left out."""
    arrays = _arrays(55, seed=4, labels=np.arange(55))
    taken = []
    for rank in range(world):
        kw = dict(batch_size=4, rank=rank, world_size=world, seed=6, device="cpu")
        kept, dropped = ResidentLoader(arrays, "train", keep_last=True, **kw), (
            ResidentLoader(arrays, "train", **kw))  # fmt: skip
        share = {1: 3, 3: 2}[world]
        assert len(kept) == len(dropped) + (1 if share else 0)
        batches = list(kept.epoch(1))
        for (x1, y1, _), (x2, y2, _) in zip(dropped.epoch(1), batches, strict=False):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the same full steps
        if share:
            x, y, valid = batches[-1]
            assert x.shape == (share, 3, 32, 32) and valid.shape == (share,) and valid.all()
            assert list(kept.epoch(1, start_step=len(kept) - 1))[0][1].tolist() == y.tolist()
        assert kept.num_samples == sum(len(b[1]) for b in batches)
        taken += [i for _, labels, _ in batches for i in labels.tolist()]
    assert len(taken) == len(set(taken)) == 55 - {1: 0, 3: 1}[world]


def test_kept_last_batch_of_cifar_py():
    """cifar.py's DataLoader over 50,000 images at batch 128: 391 steps, the last of 80; on 2
    ranks at 64 each: 390 full steps and a last one of 40 per rank (no image left out)."""
    from augmix_gpu.data.sharding import last_batch_size, train_indices, train_steps

    assert (train_steps(50_000, 128, 1, keep_last=True), last_batch_size(50_000, 128, 1)) == (
        391,
        80,
    )
    assert train_steps(50_000, 128, 1) == 390
    assert (train_steps(50_000, 64, 2, keep_last=True), last_batch_size(50_000, 64, 2)) == (391, 40)
    shards = [train_indices(50_000, 64, r, 2, 0, 0, keep_last=True) for r in range(2)]
    assert [len(s) for s in shards] == [390 * 64 + 40] * 2
    assert sorted(np.concatenate(shards).tolist()) == list(range(50_000))


def test_errors_name_the_argument():
    arrays = _arrays(20)
    with pytest.raises(ValueError, match="recipe must be one of"):
        ResidentLoader(arrays, "training", batch_size=4, device="cpu")
    with pytest.raises(TypeError, match="CifarArrays.*build_loader"):
        ResidentLoader("/data/imagenet/train", "train", batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResidentLoader(arrays, "train", batch_size=16, world_size=2, device="cpu")
    loader = ResidentLoader(arrays, "train", batch_size=4, device="cpu")
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 5\], got 6"):
        next(loader.epoch(0, start_step=6))
