"""The held-out set of the severity's held-out objective: corruptions disjoint from the evaluated
ones, the split, the prepared images, the cache, and the training loader that leaves them out."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augmix_gpu.data import build_loader, make_synthetic_dataset, scan_folder
from augmix_gpu.data.heldout import (
    MANIFEST,
    HeldoutSet,
    check_heldout_corruptions,
    choose_heldout,
    heldout_count,
    make_heldout_set,
)
from augmix_gpu.data.make_c import corrupt_image, image_seed
from augmix_gpu.protocols import CORRUPTIONS, EXTRA_CORRUPTIONS


def test_heldout_corruptions_are_disjoint_from_the_evaluation_ones() -> None:
    assert set(EXTRA_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert not set(EXTRA_CORRUPTIONS) & set(CORRUPTIONS)
    assert len(CORRUPTIONS) == 15
    assert check_heldout_corruptions(EXTRA_CORRUPTIONS) == list(EXTRA_CORRUPTIONS)
    for evaluated in CORRUPTIONS:
        with pytest.raises(ValueError, match=f"{evaluated}.*evaluation corruption"):
            check_heldout_corruptions(["spatter", evaluated])
    with pytest.raises(ValueError, match="choose one or more of"):
        check_heldout_corruptions(["sepia"])


@pytest.mark.parametrize(
    ("n", "images", "count"),
    [(3000, 0, 300), (1_281_167, 0, 10_000), (3000, 0.2, 600), (3000, 150, 150), (10, 5, 5)],
)
def test_heldout_count(n: int, images: float, count: int) -> None:
    assert heldout_count(n, images) == count


@pytest.mark.parametrize(("n", "images"), [(3000, 0.6), (3000, 1501), (3000, -1), (5, 0.01)])
def test_heldout_count_refuses_a_fraction_outside_the_range(n: int, images: float) -> None:
    with pytest.raises(ValueError, match=re.escape("must be in (0, 0.5]") + "|count >= 1"):
        heldout_count(n, images)


def test_split_is_a_pure_function_of_the_seed() -> None:
    paths = [f"f{i}" for i in range(100)]
    a, b, c = (
        choose_heldout(paths, 10, 0),
        choose_heldout(paths, 10, 0),
        choose_heldout(paths, 10, 1),
    )
    assert a == b != c
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a) and a == sorted(a)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("syn") / "s", num_classes=4, train_per_class=10, val_per_class=1,
        size=64, seed=0, progress=False,
    )  # fmt: skip
    return root / "train"


def test_make_heldout_set(train_dir: Path, tmp_path: Path) -> None:
    held = make_heldout_set(
        train_dir, tmp_path / "h", images=8, seed=3, crop_size=48, resize_size=56, progress=False
    )
    manifest = json.loads((held.root / MANIFEST).read_text())
    assert manifest["params"]["count"] == 8 and manifest["params"]["seed"] == 3
    files = manifest["files"]
    samples = scan_folder(train_dir)
    chosen = choose_heldout([p for p, _ in samples], 8, 3)
    assert [f["source"] for f in files] == [
        str(Path(samples[i][0]).relative_to(train_dir)) for i in chosen
    ]
    assert held.source_files == tuple(f["source"] for f in files)
    # Round-robin: each corruption twice, severities spread, never an evaluation corruption.
    assert Counter(f["corruption"] for f in files) == {c: 2 for c in EXTRA_CORRUPTIONS}
    assert {f["severity"] for f in files} == {1, 2}
    # The ImageFolder layout the loader reads: <class>/<file>, 48 px, RGB JPEG.
    out = sorted(held.root.rglob("*.JPEG"))
    assert len(out) == 8
    first = files[1]  # gaussian_blur: smooth, so JPEG's error stays small (noise would not)
    assert first["corruption"] == "gaussian_blur"
    img = Image.open(held.root / Path(first["source"]).with_suffix(".JPEG"))
    assert img.size == (48, 48) and img.mode == "RGB"
    # The image is the clean resized centre crop corrupted as the -C maker would (same seed).
    with Image.open(train_dir / first["source"]) as im:
        clean = np.asarray(im.convert("RGB").resize((56, 56), Image.BILINEAR).crop((4, 4, 52, 52)))
    index = chosen[1]
    want = corrupt_image(clean, first["corruption"], first["severity"],
                         image_seed(3, first["corruption"], first["severity"], index))  # fmt: skip
    got = np.asarray(img).astype(int)
    assert np.abs(got - want.astype(int)).mean() < 3.0  # JPEG quality 85
    assert np.abs(got - clean.astype(int)).mean() > np.abs(got - want.astype(int)).mean()


def test_heldout_set_is_cached_and_keyed_by_its_parameters(train_dir: Path, tmp_path: Path):
    kw = dict(images=4, seed=0, crop_size=48, resize_size=56, progress=False)
    held = make_heldout_set(train_dir, tmp_path / "h", **kw)
    stamp = (held.root / MANIFEST).stat().st_mtime_ns
    assert make_heldout_set(train_dir, tmp_path / "h", **kw).source_files == held.source_files
    assert (held.root / MANIFEST).stat().st_mtime_ns == stamp  # reused, not rewritten
    other = make_heldout_set(train_dir, tmp_path / "h", **{**kw, "seed": 1})
    assert other.source_files != held.source_files  # new parameters: made again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="exists but is not a finished held-out set"):
        make_heldout_set(train_dir, tmp_path / "mine", **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="evaluation corruption"):
        make_heldout_set(train_dir, tmp_path / "x", corruptions=["fog"], **kw)


def test_training_loader_leaves_the_heldout_files_out(train_dir: Path, tmp_path: Path) -> None:
    held = make_heldout_set(
        train_dir, tmp_path / "h", images=8, seed=0, crop_size=48, resize_size=56, progress=False
    )
    full = build_loader(train_dir, "train", batch_size=4, device="cpu")
    rest = build_loader(train_dir, "train", batch_size=4, device="cpu", exclude=held.source_files)
    kept = {str(Path(p).relative_to(train_dir)) for p in rest._paths}
    assert len(kept) == len(full._paths) - 8
    assert not kept & set(held.source_files)
    assert kept | set(held.source_files) == {
        str(Path(p).relative_to(train_dir)) for p in full._paths
    }
    assert HeldoutSet.read(held.root) == held
