"""The shifted synthetic task (--shift / --synthetic_shift): the training split lacks exactly the
nuisances the test split has, the test split and the held-out pool are the standard task, and the
held-out objective draws its split from the pool."""

from __future__ import annotations

import filecmp
import re

import numpy as np
import pytest

from augmix_gpu.data import synthetic
from augmix_gpu.data.synthetic import (
    _LUMA,
    SHAPES,
    SHIFTED_POOL,
    grid,
    make_synthetic_dataset,
    render,
    shape_mask,
)
from augmix_gpu.distributed import DistEnv


def _rng(label: int, i: int) -> np.random.Generator:
    return np.random.default_rng([0, 0, label, i])


def test_upright_removes_the_rotation_and_nothing_else(monkeypatch) -> None:
    """With no rotation to draw (MAX_ROTATION 0) an upright image equals the standard one pixel
    for pixel: the same random numbers went everywhere else."""
    label = list(SHAPES).index("square")
    rotated = [render(label, 32, _rng(label, i)) for i in range(6)]
    upright = [render(label, 32, _rng(label, i), upright=True) for i in range(6)]
    assert not all(np.array_equal(a, b) for a, b in zip(rotated, upright)), "no rotation drawn"
    monkeypatch.setattr(synthetic, "MAX_ROTATION", 0.0)
    for i, image in enumerate(upright):
        assert np.array_equal(render(label, 32, _rng(label, i)), image)


def _luma_gap(label: int, i: int, light_shape: bool) -> float:
    """Mean luma inside the shape minus outside it, measured on the rendered pixels."""
    image = render(label, 32, _rng(label, i), light_shape=light_shape).astype(float) / 255.0
    rng = _rng(label, i)  # the mask: the same stream, read up to the shape
    gy, gx = grid(32)
    synthetic._background(gy, gx, rng)
    cover = shape_mask(label, gy, gx, rng).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    luma = image @ _LUMA
    return float(luma[cover == 1].mean() - luma[cover == 0].mean())


def test_light_shapes_are_lighter_than_their_background() -> None:
    """Standard images: either polarity (about half each); ``light_shape``: the shape lighter in
    all but a few (the stripes of a second fill colour and the distractor can cut the margin)."""
    cases = [(label, i) for label in range(10) for i in range(12)]
    standard = [_luma_gap(label, i, False) > 0 for label, i in cases]
    light = [_luma_gap(label, i, True) > 0 for label, i in cases]
    assert 0.35 < np.mean(standard) < 0.65
    assert np.mean(light) > 0.95


def test_shifted_set_layout_twins_and_unchanged_standard_task(tmp_path) -> None:
    """val/ and the pool are the standard task's files byte for byte (val, and train drawn as
    the test draws it); train/ differs; the standard task keeps its parameters (its caches)."""
    kw = dict(num_classes=3, train_per_class=4, val_per_class=2, size=32, progress=False)
    plain = make_synthetic_dataset(tmp_path / "plain", **kw)
    shifted = make_synthetic_dataset(tmp_path / "shifted", shift="pose_polarity", **kw)
    assert not (plain / SHIFTED_POOL).exists()
    files = sorted(p.relative_to(plain / "train") for p in (plain / "train").rglob("*.JPEG"))
    assert len(files) == 12
    for rel in files:
        assert filecmp.cmp(plain / "train" / rel, shifted / SHIFTED_POOL / rel, shallow=False)
    assert (
        sum(
            not filecmp.cmp(plain / "train" / rel, shifted / "train" / rel, shallow=False)
            for rel in files
        )
        >= 9
    )  # a circle of the right polarity is its own twin
    for rel in (plain / "val").rglob("*.JPEG"):
        assert filecmp.cmp(rel, shifted / "val" / rel.relative_to(plain / "val"), shallow=False)
    assert "shift" not in (plain / ".complete").read_text()


def test_bad_shift_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match=re.escape("shift 'tilt': choose one of none, pose")):
        make_synthetic_dataset(tmp_path / "x", shift="tilt", progress=False)
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path / "y"), "--shift", "pose_polarity", "--format", "cifar10"])
    assert "--shift pose_polarity: only the folders format" in capsys.readouterr().err


def test_training_flag_draws_the_heldout_split_from_the_pool(tmp_path, monkeypatch) -> None:
    """--synthetic_shift: the trainer's data come from the shifted set, and the held-out images
    are twins from the pool, their originals excluded from training."""
    import torch

    from augmix_gpu.train.config import resolve_settings, validate_settings
    from augmix_gpu.train.data import prepare_data, prepare_heldout

    monkeypatch.setenv("AUGMIX_GPU_CACHE", str(tmp_path))
    settings = resolve_settings([
        "--synthetic_shift", "pose_polarity", "--synthetic_train_per_class", "4",
        "--synthetic_val_per_class", "1", "--no_c_eval", "--severity_objective", "heldout",
        "--heldout_images", "10", "--workers", "1", "--no_progress",
    ])  # fmt: skip
    validate_settings(settings, world_size=1)
    env = DistEnv(0, 0, 1, torch.device("cpu"), None)
    spec = prepare_data(settings, env)
    assert spec.train.parent.name.endswith("-shift-pose_polarity")
    assert spec.heldout_pool == spec.train.parent / SHIFTED_POOL
    held = prepare_heldout(settings, env, spec)
    assert len(held.source_files) == 10
    import json

    manifest = json.loads((held.root / "heldout.json").read_text())
    assert manifest["params"]["train_dir"] == str(spec.heldout_pool.resolve())
    for rel in held.source_files:  # a twin of a training file: the same name in both trees
        assert (spec.train / rel).is_file() and (spec.heldout_pool / rel).is_file()


def test_shift_flag_needs_the_synthetic_dataset(tmp_path) -> None:
    from augmix_gpu.train.config import resolve_settings, validate_settings

    settings = resolve_settings(["--data", str(tmp_path), "--synthetic_shift", "pose_polarity"])
    with pytest.raises(ValueError, match="--synthetic_shift 'pose_polarity': only the synthetic"):
        validate_settings(settings, world_size=1)
