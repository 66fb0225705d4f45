"""Folder scan: ImageFolder label order, class maps from checkpoints, one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from augmix_gpu.data import DatasetError, build_loader, find_classes, scan_folder


def _img(path: Path, size=(40, 36), value: int = 128, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format=fmt)


def test_label_order_matches_torchvision_imagefolder(tmp_path):
    # Names chosen so that naive orders differ: case, digits, nested sub-folders, mixed extensions.
    for cls in ["n02", "N01", "b", "a10", "a9", "_x"]:
        for name in ["z.JPEG", "a.jpg", "B.png", "m.jpeg"]:
            _img(tmp_path / cls / name)
        _img(tmp_path / cls / "sub" / "k.JPEG")
    ours = scan_folder(tmp_path)
    ref = ImageFolder(str(tmp_path))
    assert [(p, lab) for p, lab in ours] == [(p, lab) for p, lab in ref.samples]
    assert find_classes(tmp_path) == (ref.classes, ref.class_to_idx)


def test_classes_from_a_checkpoint_map_a_subset(tmp_path):
    _img(tmp_path / "cat" / "1.JPEG")
    _img(tmp_path / "dog" / "1.JPEG")
    samples = scan_folder(tmp_path, classes=["ant", "cat", "dog"])
    assert [lab for _, lab in samples] == [1, 2]
    with pytest.raises(DatasetError, match=r"\['dog'\].*not among the 2 classes"):
        scan_folder(tmp_path, classes=["ant", "cat"])


def test_dotfiles_are_ignored(tmp_path):
    _img(tmp_path / "a" / "1.JPEG")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0")
    assert len(scan_folder(tmp_path)) == 1


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"does not exist.*one sub-folder per class"),
        ("a_file", r"is a file, expected a folder"),
        ("no_classes", r"no class folders.*root/<class>/<image>"),
        ("empty_class", r"empty_cls'.*holds no image files"),
        ("not_image_ext", r"notes.txt'.*is not an image.*move it out"),
        ("bad_header", r"fake.JPEG'.*not a .jpeg header"),
        ("empty_file", r"zero.png'.*is empty"),
    ],
)
def test_bad_inputs_get_their_message(tmp_path, case, match):
    root = tmp_path / "root"
    if case == "a_file":
        root.write_text("x")
    elif case != "missing":
        root.mkdir()
        if case != "no_classes":
            _img(root / "good" / "1.JPEG")
        (root / "loose.JPEG").write_bytes(b"")  # files at the top level are not classes
        if case == "empty_class":
            (root / "empty_cls").mkdir()
        elif case == "not_image_ext":
            (root / "good" / "notes.txt").write_text("hi")
        elif case == "bad_header":
            (root / "good" / "fake.JPEG").write_text("<html>404</html>")
        elif case == "empty_file":
            (root / "good" / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=match):
        scan_folder(root)
    with pytest.raises(DatasetError, match=match):  # build_loader validates before DALI starts
        build_loader(root, "val", batch_size=2, device="cpu")


def test_every_image_format_passes_the_header_check(tmp_path):
    for ext, fmt in [
        ("jpg", "JPEG"),
        ("png", "PNG"),
        ("bmp", "BMP"),
        ("ppm", "PPM"),
        ("tif", "TIFF"),
        ("webp", "WEBP"),
    ]:
        _img(tmp_path / "a" / f"x.{ext}", fmt=fmt)
    assert len(scan_folder(tmp_path)) == 6


def _truncated_jpeg(path: Path) -> None:
    _img(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # header intact, body cut


def test_corrupt_jpeg_in_a_run_names_the_file(tmp_path):
    for i in range(5):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    _truncated_jpeg(tmp_path / "a" / "3.JPEG")
    loader = build_loader(tmp_path, "val", batch_size=2, device="cpu", crop_size=32, resize_size=32)
    with pytest.raises(DatasetError, match=r"cannot decode .*3\.JPEG.*on_corrupt='skip'"):
        list(loader.epoch(0))


def test_corrupt_jpeg_skip_counts_and_masks_it(tmp_path):
    for i in range(5):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    _truncated_jpeg(tmp_path / "a" / "3.JPEG")
    loader = build_loader(
        tmp_path, "val", batch_size=2, device="cpu", crop_size=32, resize_size=32, on_corrupt="skip"
    )
    with pytest.warns(UserWarning, match=r"3\.JPEG"):
        batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert sum(int(v.sum()) for _, _, v in batches) == 4  # 5 images, the corrupt one masked out
    assert len(loader.skipped) == 1 and loader.skipped[0].endswith("3.JPEG")


@pytest.mark.parametrize("damage", ["truncated_body", "garbage_header"])
def test_corrupt_file_in_the_train_recipe_is_named_or_skipped(damage, tmp_path):
    """Train windows are sized from the header on the host: a header PIL cannot read is as
    corrupt as a body DALI cannot decode (torchvision's PIL loader would fail on either)."""
    for i in range(6):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    bad = tmp_path / "a" / "3.JPEG"
    if damage == "truncated_body":
        _truncated_jpeg(bad)
    else:
        bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)  # JPEG magic, then noise
    kw = dict(batch_size=2, device="cpu", crop_size=32, num_threads=1, prefetch=1)
    with pytest.raises(DatasetError, match=r"cannot decode .*3\.JPEG"):
        list(build_loader(tmp_path, "train", **kw).epoch(0))
    loader = build_loader(tmp_path, "train", on_corrupt="skip", **kw)
    with pytest.warns(UserWarning, match=r"3\.JPEG"):
        batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert loader.skipped == [str(bad)]
