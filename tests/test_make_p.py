"""The -P maker: layout and marker, determinism for a seed, the official generator's parameters
(noise levels per difficulty, fresh noise per frame, smooth motion, frame counts), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import natural_image
from PIL import Image

from augmix_gpu.data import DatasetError
from augmix_gpu.data.make_p import (
    GAUSSIAN_SIGMA,
    make_perturbed_dataset,
    sequence_frames,
    video_seed,
)
from augmix_gpu.data.video import read_video_cpu

pytest.importorskip("av")
pytest.importorskip("imagecorruptions")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """2 classes x 2 natural 48 px images."""
    root = tmp_path_factory.mktemp("src")
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir()
        for i in range(2):
            Image.fromarray(natural_image(48, 10 * k + i)).save(root / cls / f"im{i}.png")
    return root


def make(src, out, **kw):
    kw = {"perturbations": ["gaussian_noise", "rotate"], "preset": "ultrafast",
          "progress": False, **kw}  # fmt: skip
    return make_perturbed_dataset(src, out, **kw)


def test_layout_marker_and_reuse(src, tmp_path):
    out = make(src, tmp_path / "p", difficulties=[1, 3], per_class=1)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["gaussian_noise", "gaussian_noise_3", "rotate"]  # a folder per noise level
    for f in folders:
        assert sorted(str(p.relative_to(out / f)) for p in (out / f).rglob("*.mp4")) == [
            "a/im0.mp4", "b/im0.mp4",
        ]  # fmt: skip
    marker = json.loads((out / ".complete").read_text())
    assert marker["per_class"] == 1 and marker["difficulties"] == [1, 3]
    assert not list(tmp_path.glob(".p.tmp-*"))  # written atomically
    stamp = (out / "rotate" / "a" / "im0.mp4").stat().st_mtime_ns
    assert make(src, tmp_path / "p", difficulties=[1, 3], per_class=1) == out  # cached
    assert (out / "rotate" / "a" / "im0.mp4").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match=r"exists but is not a finished -P set"):
        make(src, tmp_path / "p", per_class=1)  # other parameters, no overwrite


def test_deterministic_for_a_seed_whatever_the_workers(src, tmp_path):
    a = make(src, tmp_path / "a", seed=3)
    b = make(src, tmp_path / "b", seed=3, workers=2, perturbations=["rotate", "gaussian_noise"])
    c = make(src, tmp_path / "c", seed=4)
    for rel in ("gaussian_noise/a/im1.mp4", "rotate/b/im0.mp4"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "gaussian_noise/a/im1.mp4").read_bytes() != (
        c / "gaussian_noise/a/im1.mp4"
    ).read_bytes()
    assert (a / "rotate/a/im1.mp4").read_bytes() == (
        c / "rotate/a/im1.mp4"
    ).read_bytes()  # no noise
    frames = read_video_cpu(a / "rotate/a/im1.mp4")
    assert frames.shape == (31, 48, 48, 3)


def test_noise_sequences_follow_the_official_levels(src):
    path = str(src / "a" / "im0.png")
    clean = np.asarray(Image.open(path).convert("RGB")).astype(float)
    for d, sigma in zip((1, 3), (GAUSSIAN_SIGMA[0], GAUSSIAN_SIGMA[2])):
        fr = np.stack(sequence_frames(path, "gaussian_noise", d, seed=0)).astype(float)
        assert len(fr) == 31
        np.testing.assert_array_equal(fr[0], clean)  # frame 0 is the clean image
        diff = fr[1:] - clean
        inside = (clean > 60) & (clean < 195)  # away from the clip at 0 and 255
        # truncation to uint8 moves the mean by -0.5 level; the spread is sigma * 255
        assert diff[:, inside].std() == pytest.approx(sigma * 255, rel=0.06)
        assert not np.array_equal(fr[1], fr[2])  # fresh noise for every frame
    assert video_seed(0, "gaussian_noise", 1, 0) != video_seed(0, "gaussian_noise", 1, 1)


def test_geometric_sequences_move_smoothly(tmp_path):
    path = tmp_path / "n.png"
    Image.fromarray(natural_image(256, 7)).save(path)
    tr = np.stack(sequence_frames(str(path), "translate", 1, seed=0, size=224)).astype(int)
    assert tr.shape == (41, 224, 224, 3)  # 41 frames, one pixel per frame at 224
    np.testing.assert_array_equal(tr[21][:, 1:-1], tr[20][:, :-2])
    for name in ("rotate", "scale", "tilt", "brightness", "zoom_blur", "motion_blur"):
        fr = np.stack(sequence_frames(str(path), name, 1, seed=0, size=224)).astype(float)
        assert fr.shape == (31, 224, 224, 3), name
        steps = np.abs(np.diff(fr, axis=0)).mean(axis=(1, 2, 3))
        far = np.abs(fr[-1] - fr[0]).mean()
        assert steps.max() < far / 3, (name, steps.max(), far)  # small steps, a long way overall


def test_bad_arguments(src, tmp_path):
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) \['gausian_noise'\]"):
        make(src, tmp_path / "x", perturbations=["gausian_noise"])
    with pytest.raises(ValueError, match="difficulties must be"):
        make(src, tmp_path / "x", difficulties=[4])
    with pytest.raises(DatasetError, match="does not exist"):
        make(tmp_path / "nowhere", tmp_path / "x")
