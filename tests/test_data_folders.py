"""Folder listing: ImageFolder label order, class maps from checkpoints, no file opened at
startup, one clear error per bad input, and damaged files named (or skipped) at batch time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from augmix_gpu.data import DatasetError, build_loader, find_classes, scan_folder
from augmix_gpu.data.folders import list_images


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
    with pytest.raises(DatasetError, match=match):
        scan_folder(root)
    with pytest.raises(DatasetError, match=match):  # build_loader validates before DALI starts
        build_loader(root, "val", batch_size=2, device="cpu")


def test_listing_opens_no_file(tmp_path, monkeypatch):
    """Startup is names only: whatever the bytes are, listing reads none of them (no open, no
    stat per file), so it does not grow with the dataset on every rank beyond the listing."""
    for ext, fmt in [("jpg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("JPEG", "PNG")]:
        _img(tmp_path / "a" / f"x.{ext}", fmt=fmt)
    (tmp_path / "a" / "html.JPEG").write_text("<html>404</html>")
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub" / "zero.png").write_bytes(b"")

    touched: list[str] = []
    real_open, real_stat = open, os.stat

    def spy(real):
        def wrapper(path, *args, **kwargs):
            touched.append(os.fspath(path) if isinstance(path, (str, os.PathLike)) else "")
            return real(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr("builtins.open", spy(real_open))
    monkeypatch.setattr("os.stat", spy(real_stat))
    paths, labels = list_images(tmp_path)
    monkeypatch.undo()
    assert not [t for t in touched if os.path.isfile(t)], touched  # the root's stat is fine
    assert [Path(p).name for p in paths] == [
        "html.JPEG", "x.JPEG", "x.bmp", "x.jpg", "x.png", "zero.png",
    ]  # fmt: skip
    assert labels.tolist() == [0, 0, 0, 0, 0, 1] and labels.dtype == np.int64
    assert scan_folder(tmp_path) == list(zip(paths, labels.tolist()))


def _truncated_jpeg(path: Path) -> None:
    _img(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # header intact, body cut


def test_corrupt_jpeg_in_a_run_names_the_file(tmp_path):
    for i in range(5):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    _truncated_jpeg(tmp_path / "a" / "3.JPEG")
    loader = build_loader(
        tmp_path,
        "val",
        batch_size=2,
        device="cpu",
        crop_size=32,
        resize_size=32,
        on_corrupt="error",
    )
    with pytest.raises(DatasetError, match=r"3\.JPEG' cannot be decoded.*on_corrupt='skip'"):
        list(loader.epoch(0))


def test_corrupt_jpeg_skip_counts_and_masks_it(tmp_path):
    for i in range(5):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    _truncated_jpeg(tmp_path / "a" / "3.JPEG")
    loader = build_loader(tmp_path, "val", batch_size=2, device="cpu", crop_size=32, resize_size=32)
    assert loader.on_corrupt == "skip"  # the default: a long run is not stopped by one file
    with pytest.warns(UserWarning, match=r"3\.JPEG"):
        batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert sum(int(v.sum()) for _, _, v in batches) == 4  # 5 images, the corrupt one masked out
    assert loader.num_samples == 4  # what evaluate_loader checks its count against
    assert len(loader.skipped) == 1 and loader.skipped[0].endswith("3.JPEG")


DAMAGE = {
    "truncated_body": ("cannot be decoded", lambda p: _truncated_jpeg(p)),
    "garbage_header": (
        "cannot be decoded|has no image header",
        lambda p: p.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8),  # JPEG magic, noise
    ),
    "html_page": (
        "cannot be decoded|has no image header",
        lambda p: p.write_text("<html>404</html>"),
    ),
    "empty": ("is empty", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("recipe", ["train", "val"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_file_is_named_at_batch_time_or_skipped(damage, recipe, tmp_path):
    """No header is read at startup, so every kind of damage must be caught when the batch is
    read: by name and reason (`error`), or skipped and listed (`skip`). Train windows are sized
    from the bytes on the host, so a header PIL cannot read is as corrupt as a bad body."""
    for i in range(6):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    bad = tmp_path / "a" / "3.JPEG"
    reason, damage_it = DAMAGE[damage]
    kw = dict(batch_size=2, device="cpu", crop_size=32, resize_size=32, num_threads=1, prefetch=1)
    with pytest.raises(DatasetError, match=rf"3\.JPEG' ({reason})"):
        damage_it(bad)
        list(build_loader(tmp_path, recipe, on_corrupt="error", **kw).epoch(0))
    loader = build_loader(tmp_path, recipe, on_corrupt="skip", **kw)
    with pytest.warns(UserWarning, match=r"3\.JPEG"):
        batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert loader.skipped == [str(bad)]
    assert loader.num_samples == (6 if recipe == "train" else 5)


def test_file_removed_after_listing_is_named(tmp_path):
    for i in range(4):
        _img(tmp_path / "a" / f"{i}.JPEG", value=40 * i)
    loader = build_loader(
        tmp_path,
        "val",
        batch_size=2,
        device="cpu",
        crop_size=32,
        resize_size=32,
        on_corrupt="error",
    )
    (tmp_path / "a" / "2.JPEG").unlink()
    with pytest.raises(DatasetError, match=r"2\.JPEG' cannot be read \(No such file"):
        list(loader.epoch(0))
