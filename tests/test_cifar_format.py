"""The generated CIFAR-format set and CIFAR-C `.npy` files, read back by independent readers."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar

from augmix_gpu.data import DatasetError, load_cifar, load_cifar_c, make_c, synthetic
from augmix_gpu.data.cifar import check_cifar_c_labels


@pytest.fixture
def torchvision_reader(monkeypatch):
    """torchvision's CIFAR classes, minus the md5 check against the official archive's files."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *_a, **_k: True)
    return {"cifar10": tv_cifar.CIFAR10, "cifar100": tv_cifar.CIFAR100}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_synthetic_cifar_reads_as_torchvision_reads_it(name, tmp_path, torchvision_reader):
    root = synthetic.make_synthetic_cifar(
        tmp_path / name, name=name, train_per_class=3, test_per_class=2, seed=4, progress=False
    )
    for train, n in ((True, 30), (False, 20)):
        ours = load_cifar(root, name, train=train)
        theirs = torchvision_reader[name](str(root), train=train, download=False)
        assert len(ours) == n
        assert np.array_equal(ours.images, theirs.data)  # HWC uint8 both
        assert ours.labels.tolist() == list(theirs.targets)
        assert ours.classes == list(theirs.classes) == list(synthetic.SHAPES)
    # The pixels are the renderer's for (seed, split, class, index); classes interleaved.
    test = load_cifar(root, name, train=False)
    k = 13  # class 3, index 1
    expected = synthetic.render(3, 32, np.random.default_rng([4, 1, 3, 1]))
    assert test.labels[k] == 3 and np.array_equal(test.images[k], expected)


def test_synthetic_cifar_cache_guards_and_cli(tmp_path):
    kw = dict(num_classes=2, train_per_class=5, test_per_class=1, progress=False)
    out = synthetic.make_synthetic_cifar(tmp_path / "c", **kw)
    stamp = (out / ".complete").stat().st_mtime_ns
    assert synthetic.make_synthetic_cifar(tmp_path / "c", **kw) == out  # reused as is
    assert (out / ".complete").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="not a finished synthetic set"):
        synthetic.make_synthetic_cifar(tmp_path / "c", **{**kw, "train_per_class": 6})
    assert [len(load_cifar(out, train=True)), len(load_cifar(out, train=False))] == [10, 2]
    with pytest.raises(ValueError, match="'cifar10' or 'cifar100'"):
        synthetic.make_synthetic_cifar(tmp_path / "x", name="svhn")
    synthetic.main([str(tmp_path / "cli"), "--format", "cifar100", "--classes", "3",
                    "--train_per_class", "2", "--val_per_class", "1"])  # fmt: skip
    assert load_cifar(tmp_path / "cli", "cifar100").classes == ["circle", "square", "triangle"]
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path / "cli2"), "--format", "cifar10", "--size", "64"])


def test_cifar_c_layout_and_pixels(tmp_path):
    root = synthetic.make_synthetic_cifar(
        tmp_path / "c10", train_per_class=1, test_per_class=1, progress=False
    )
    corruptions = ["gaussian_noise", "fog"]
    out = make_c.make_cifar_c(root, tmp_path / "c10-c", corruptions=corruptions, seed=7,
                              progress=False)  # fmt: skip
    test = load_cifar(root, train=False)
    n = len(test)
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.uint8 and labels.tolist() == np.tile(test.labels, 5).tolist()
    for c in corruptions:
        data = np.load(out / f"{c}.npy")
        assert data.shape == (5 * n, 32, 32, 3) and data.dtype == np.uint8
    # Severity s occupies rows (s-1)*n .. s*n-1, each image seeded by (seed, corruption, s, i).
    for c, s, i in (("fog", 1, 0), ("fog", 5, 9), ("gaussian_noise", 3, 4)):
        seed = make_c.image_seed(7, c, s, i)
        expected = make_c.corrupt_image(test.images[i], c, s, seed, "cifar")
        assert np.array_equal(np.load(out / f"{c}.npy")[(s - 1) * n + i], expected)
        assert np.array_equal(load_cifar_c(out, c, s).images[i], expected)
    assert not np.array_equal(
        load_cifar_c(out, "fog", 1).images, load_cifar_c(out, "fog", 5).images
    )
    # Workers change nothing; the command line writes the same files.
    again = make_c.make_cifar_c(root, tmp_path / "w2", corruptions=["fog"], seed=7, workers=2,
                                progress=False)  # fmt: skip
    assert np.array_equal(np.load(again / "fog.npy"), np.load(out / "fog.npy"))
    make_c.main([str(root), str(tmp_path / "cli"), "--cifar", "cifar10", "--corruptions", "fog",
                 "--seed", "7"])  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "cli" / "fog.npy"), np.load(out / "fog.npy"))


def test_cifar_c_labels_must_match_the_model(tmp_path):
    np.save(tmp_path / "labels.npy", np.tile(np.arange(10, dtype=np.uint8), 5))
    check_cifar_c_labels(tmp_path, 10, "cifar10")
    with pytest.raises(DatasetError, match="holds 10 classes but the cifar100 model has 100"):
        check_cifar_c_labels(tmp_path, 100, "cifar100")
    with pytest.raises(DatasetError, match="missing .*labels.npy"):
        check_cifar_c_labels(tmp_path / "nope", 10)
