"""The synthetic dataset and the -C maker: layouts, determinism, markers, CLIs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augmix_gpu.data import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    DatasetError,
    find_classes,
    make_c,
    make_corrupted_dataset,
    make_synthetic_dataset,
    scan_folder,
    synthetic,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_layout_and_determinism(tmp_path):
    kw = dict(num_classes=10, train_per_class=3, val_per_class=2, size=64, progress=False)
    a = make_synthetic_dataset(tmp_path / "a", seed=1, **kw)
    b = make_synthetic_dataset(tmp_path / "b", seed=1, **kw)
    c = make_synthetic_dataset(tmp_path / "c", seed=2, **kw)
    assert _digest(a) == _digest(b)  # byte-identical for a seed
    assert _digest(a).keys() == _digest(c).keys() and _digest(a) != _digest(c)
    classes, _ = find_classes(a / "train")
    assert classes == list(synthetic.CLASS_NAMES) == find_classes(a / "val")[0]
    assert len(scan_folder(a / "train")) == 30 and len(scan_folder(a / "val")) == 20
    img = Image.open(next((a / "val" / classes[0]).iterdir()))
    assert img.size == (64, 64) and img.format == "JPEG" and img.mode == "RGB"
    assert json.loads((a / ".complete").read_text())["seed"] == 1
    # Each image depends on (seed, split, class, index) only: a bigger set keeps the small one.
    d = make_synthetic_dataset(tmp_path / "d", seed=1, **{**kw, "train_per_class": 4})
    assert all(
        _digest(d)[k] == v for k, v in _digest(a).items() if k.startswith("val") or "_0000" in k
    )


def test_synthetic_workers_draw_the_same_images(tmp_path):
    """Two worker processes write the set byte for byte as one process does (150 per class: runs
    of 100 images, so a class is split between tasks)."""
    kw = dict(num_classes=2, train_per_class=150, val_per_class=3, size=32, seed=3, progress=False)
    one = make_synthetic_dataset(tmp_path / "one", **kw)
    two = make_synthetic_dataset(tmp_path / "two", workers=2, **kw)
    assert len(_digest(one)) == 307 and _digest(two) == _digest(one)


def test_synthetic_cache_and_guards(tmp_path):
    kw = dict(num_classes=2, train_per_class=1, val_per_class=1, size=32, progress=False)
    out = make_synthetic_dataset(tmp_path / "s", **kw)
    stamp = (out / ".complete").stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "s", **kw) == out  # finished + same params: reused
    assert (out / ".complete").stat().st_mtime_ns == stamp
    (out / ".complete").unlink()  # now it looks interrupted
    with pytest.raises(DatasetError, match="not a finished synthetic set.*overwrite=True"):
        make_synthetic_dataset(tmp_path / "s", **kw)
    make_synthetic_dataset(tmp_path / "s", overwrite=True, **kw)
    assert synthetic.is_complete(out)
    assert not list(tmp_path.glob(".s.tmp-*"))  # the temporary folder was renamed away
    with pytest.raises(ValueError, match="num_classes must be in 1..10"):
        make_synthetic_dataset(tmp_path / "x", **{**kw, "num_classes": 11})


def test_synthetic_classes_differ_in_shape_not_colour():
    """The label must be carried by the shape: no class stands out by its mean brightness."""
    means = []
    for label in range(10):
        imgs = [
            synthetic.render(label, 64, np.random.default_rng([0, 0, label, i])) for i in range(24)
        ]
        means.append(np.mean([im.mean() for im in imgs]))
    assert np.std(means) < 12  # no class is given away by its brightness (0..255 scale)


def test_synthetic_cli(tmp_path):
    synthetic.main(
        [
            str(tmp_path / "o"),
            "--classes",
            "3",
            "--train_per_class",
            "2",
            "--val_per_class",
            "1",
            "--size",
            "48",
            "--seed",
            "4",
        ]
    )
    assert (
        len(scan_folder(tmp_path / "o" / "train")) == 6
        and len(scan_folder(tmp_path / "o" / "val")) == 3
    )


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("csrc")
    make_synthetic_dataset(
        root / "syn", num_classes=2, train_per_class=1, val_per_class=1, size=64, progress=False
    )
    return root / "syn" / "val"


def test_make_c_tree_and_determinism(small_src, tmp_path):
    kw = dict(
        severities=(1, 3),
        corruptions=("gaussian_noise", "contrast", "frost"),
        seed=5,
        progress=False,
    )
    out = make_corrupted_dataset(small_src, tmp_path / "c", **kw)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.JPEG"))
    src_files = [Path(p).relative_to(small_src) for p, _ in scan_folder(small_src)]
    expected = sorted(
        f"{c}/{s}/{r.parent}/{r.stem}.JPEG"
        for c in kw["corruptions"]
        for s in (1, 3)
        for r in src_files
    )
    assert files == expected
    for c in kw["corruptions"]:  # each severity folder is a valid ImageFolder with the same classes
        assert find_classes(out / c / "3")[0] == find_classes(small_src)[0]
    again = make_corrupted_dataset(small_src, tmp_path / "c2", **kw)
    assert _digest(out) == _digest(again)
    other = make_corrupted_dataset(small_src, tmp_path / "c3", **{**kw, "seed": 6})
    noisy = [k for k in _digest(out) if k.startswith("gaussian_noise")]
    assert all(_digest(out)[k] != _digest(other)[k] for k in noisy)
    # Severity matters: contrast 3 is further from the clean image than contrast 1.
    rel = src_files[0]
    clean = np.asarray(Image.open(small_src / rel), dtype=float)
    d1, d3 = (
        np.abs(
            np.asarray(
                Image.open(out / "contrast" / s / rel.parent / f"{rel.stem}.JPEG"), dtype=float
            )
            - clean
        ).mean()
        for s in ("1", "3")
    )
    assert d3 > d1 > 0


def test_make_c_per_class_is_the_first_images_of_each_class_byte_for_byte(tmp_path):
    """`per_class` corrupts the first N images of each class in torchvision ImageFolder's order,
    and each file is the one the whole set has (an image's seed is its place in the folder)."""
    from torchvision.datasets import ImageFolder

    src = make_synthetic_dataset(tmp_path / "syn", num_classes=2, train_per_class=1,
                                 val_per_class=3, size=64, progress=False) / "val"  # fmt: skip
    kw = dict(severities=(2,), corruptions=("gaussian_noise", "pixelate"), seed=3, progress=False)
    whole = _digest(make_corrupted_dataset(src, tmp_path / "whole", **kw))
    part = _digest(make_corrupted_dataset(src, tmp_path / "part", per_class=2, **kw))
    folder = ImageFolder(str(src))
    first_two = [p for c in (0, 1) for p in [q for q, y in folder.samples if y == c][:2]]
    expected = {f"{c}/2/{Path(p).parent.name}/{Path(p).stem}.JPEG" for c in kw["corruptions"]
                for p in first_two}  # fmt: skip
    assert {k for k in part if k.endswith(".JPEG")} == expected
    assert all(part[k] == whole[k] for k in expected)
    marker = json.loads((tmp_path / "part" / make_c.MARKER).read_text())
    assert marker["per_class"] == 2 and marker["n"] == 4


def test_make_c_full_tree_all_19_corruptions_on_64px(small_src, tmp_path):
    out = make_corrupted_dataset(
        small_src, tmp_path / "full", corruptions=CORRUPTIONS + EXTRA_CORRUPTIONS, progress=False
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        CORRUPTIONS + EXTRA_CORRUPTIONS
    )
    for c in CORRUPTIONS + EXTRA_CORRUPTIONS:
        for s in range(1, 6):
            imgs = list((out / c / str(s)).rglob("*.JPEG"))
            assert len(imgs) == 2
            assert Image.open(imgs[0]).size == (64, 64)


def test_make_c_cli_and_errors(small_src, tmp_path):
    make_c.main(
        [
            str(small_src),
            str(tmp_path / "o"),
            "--severities",
            "2",
            "--corruptions",
            "pixelate",
            "--extra",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == sorted(
        ("pixelate", *EXTRA_CORRUPTIONS)
    )
    with pytest.raises(ValueError, match="unknown corruption"):
        make_corrupted_dataset(small_src, tmp_path / "x", corruptions=("blur",))
    with pytest.raises(ValueError, match="subset of 1..5"):
        make_corrupted_dataset(small_src, tmp_path / "x", severities=(0,))
    (tmp_path / "taken").mkdir()
    with pytest.raises(DatasetError, match="not a finished -C set"):
        make_corrupted_dataset(
            small_src,
            tmp_path / "taken",
            severities=(1,),
            corruptions=("contrast",),
            progress=False,
        )
    assert (
        CORRUPTIONS[0] == "gaussian_noise"
        and CORRUPTIONS[-1] == "jpeg_compression"
        and len(CORRUPTIONS) == 15
    )


def _make_same_set(args) -> str:
    out, barrier = args
    barrier.wait()  # both processes write their temporary sets at the same time
    kw = dict(num_classes=2, train_per_class=3, val_per_class=1, size=32, progress=False)
    return str(make_synthetic_dataset(out, **kw))


def test_two_processes_making_the_same_set_both_succeed(tmp_path):
    """Two trainings sharing a cache: the second rename finds the first one's finished set."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        outs = pool.map(_make_same_set, [(tmp_path / "s", barrier)] * 2)
    assert outs == [str(tmp_path / "s")] * 2
    assert synthetic.is_complete(tmp_path / "s")
    assert len(scan_folder(tmp_path / "s" / "train")) == 6
    assert not list(tmp_path.glob(".s.tmp-*"))  # the loser's temporary set is gone


_GLASS = """
import hashlib, numpy as np
from imagecorruptions import corruptions
from augmix_gpu.data.make_c import corrupt_image
from conftest import natural_image
out = corrupt_image(natural_image(64, seed=3), "glass_blur", 3, seed=5)
stats = corruptions._shuffle_pixels_njit_glass_blur.stats
print(len(stats.cache_hits), len(stats.cache_misses), hashlib.sha1(out.tobytes()).hexdigest())
"""


def test_glass_blur_is_compiled_once_per_machine_then_loaded_from_disk(tmp_path):
    """Numba compiled glass blur's loop anew in every process that made a -C set (~5 s each,
    two per demo). The first process now writes it to the disk cache and the next one loads it,
    with the same output."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    runs = [subprocess.run([sys.executable, "-c", _GLASS], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]  # fmt: skip
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    (hits1, misses1, out1), (hits2, misses2, out2) = (r.stdout.split()[-3:] for r in runs)
    assert (hits1, misses1) == ("0", "1") and (hits2, misses2) == ("1", "0")
    assert out1 == out2 and list(tmp_path.rglob("*.nbi"))
