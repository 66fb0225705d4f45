"""CIFAR pickles / CIFAR-C .npy readers and the external_source path (fake files in tmp_path)."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from augmix_gpu.data import CifarArrays, DatasetError, build_loader, load_cifar, load_cifar_c

CPU = dict(device="cpu", num_threads=1, prefetch=1)


def _images(n: int, seed: int) -> np.ndarray:
    """[n, 32, 32, 3] uint8, every image distinct (a ramp plus noise)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    all_x, all_y = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = _images(per_batch, seed=i)
        y = [(i + j) % 10 for j in range(per_batch)]
        chw = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # the pickles store CHW rows
        with open(base / name, "wb") as f:
            pickle.dump({b"data": chw, b"labels": y}, f)
        if name != "test_batch":
            all_x.append(x)
            all_y += y
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{k}".encode() for k in range(10)]}, f)
    return np.concatenate(all_x), np.array(all_y)


def test_load_cifar10_matches_the_pickles(tmp_path):
    x, y = _write_cifar10(tmp_path)
    tr = load_cifar(tmp_path, "cifar10", train=True)
    assert np.array_equal(tr.images, x) and np.array_equal(tr.labels, y)
    assert tr.labels.dtype == np.int64 and tr.classes[3] == "class3" and len(tr) == 20
    assert len(load_cifar(tmp_path, "cifar10", train=False)) == 4


def test_load_cifar100(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    x = _images(6, seed=9)
    for name in ("train", "test"):
        with open(base / name, "wb") as f:
            pickle.dump(
                {
                    b"data": x.transpose(0, 3, 1, 2).reshape(6, -1),
                    b"fine_labels": [99, 0, 5, 5, 1, 2],
                },
                f,
            )
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{k}".encode() for k in range(100)]}, f)
    te = load_cifar(tmp_path, "cifar100", train=False)
    assert (
        np.array_equal(te.images, x)
        and te.labels.tolist() == [99, 0, 5, 5, 1, 2]
        and len(te.classes) == 100
    )


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="never downloads"):
        load_cifar(tmp_path, "cifar10")
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3.*re-extract"):
        load_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="'cifar10' or 'cifar100'"):
        load_cifar(tmp_path, "svhn")
    with pytest.raises(DatasetError, match="fog.npy.*labels.npy"):
        load_cifar_c(tmp_path, "fog", 1)


def test_load_cifar_c_slices_one_severity(tmp_path):
    data = _images(5 * 6, seed=4)
    labels = np.tile(np.arange(6) % 3, 5)
    np.save(tmp_path / "fog.npy", data)
    np.save(tmp_path / "labels.npy", labels)
    c = load_cifar_c(tmp_path, "fog", 2, classes=["a", "b", "c"])
    assert np.array_equal(c.images, data[6:12]) and c.labels.tolist() == labels[6:12].tolist()
    assert c.classes == ["a", "b", "c"]
    with pytest.raises(ValueError, match="severity must be in 1..5"):
        load_cifar_c(tmp_path, "fog", 6)


def _find_source(out_chw: np.ndarray, images: np.ndarray) -> tuple[int, int, int, bool] | None:
    """Which image, pad-4 offset and flip produce this output (brute force over all of them)."""
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    target = out_chw.transpose(1, 2, 0)
    for i in range(len(images)):
        for dy in range(9):
            for dx in range(9):
                win = padded[i, dy : dy + 32, dx : dx + 32]
                for flip in (False, True):
                    if np.array_equal(win[:, ::-1] if flip else win, target):
                        return i, dy - 4, dx - 4, flip
    return None


def test_cifar_train_is_pad4_crop_flip_sharded(tmp_path):
    images = _images(24, seed=1)
    arrays = CifarArrays(images, np.arange(24) % 10, [str(k) for k in range(10)])
    seen, offsets, flips = [], set(), set()
    for rank in range(2):
        ld = build_loader(arrays, "train", batch_size=4, rank=rank, world_size=2, seed=3, **CPU)
        assert len(ld) == 3
        for x, y, v in ld.epoch(0):
            assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and v.all()
            for out, label in zip(x.numpy(), y.tolist()):
                found = _find_source(out, images)
                assert found is not None  # every output is one padded crop (+flip) of an input
                i, dy, dx, flip = found
                assert label == i % 10
                seen.append(i)
                offsets.add((dy, dx))
                flips.add(flip)
    assert len(seen) == len(set(seen)) == 24  # the two shards partition the set (24 = 2 x 3 x 4)
    assert len(offsets) > 5 and flips == {False, True}  # the crops and flips do vary


def test_cifar_resume_is_exact_and_eval_counts_once(tmp_path):
    images = _images(22, seed=2)
    arrays = CifarArrays(images, np.arange(22) % 10, [str(k) for k in range(10)])
    ld = build_loader(arrays, "train", batch_size=4, seed=5, **CPU)
    full = [x.clone() for x, _, _ in ld.epoch(2)]
    resumed = [x for x, _, _ in ld.epoch(2, start_step=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))  # crops too, not only files
    for world in (1, 3):
        counted = Counter()
        for rank in range(world):
            ev = build_loader(arrays, "corrupted", batch_size=4, rank=rank, world_size=world, **CPU)
            for x, _, v in ev.epoch(0):
                for out in x[v].numpy():
                    counted[_find_source(out, images)] += 1
        assert counted == Counter({(i, 0, 0, False): 1 for i in range(22)})  # as is, once each
