"""The val loader that decodes once and replays: later epochs are the first one, tensor for
tensor, without decoding again; a set over its memory budget is decoded every time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from augmix_gpu.data import build_loader
from augmix_gpu.data.replay import ReplayLoader


@pytest.fixture(scope="module")
def val_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(5):  # 15 images, batch 4: a padded last batch
            size = (40 + 3 * i, 36 + 2 * c)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                root / f"c{c}" / f"{i}.jpg", quality=95
            )
    return root


def _loader(root):
    return build_loader(root, "val", batch_size=4, device="cpu", crop_size=24, resize_size=28,
                        num_threads=1)  # fmt: skip


def _epoch(loader, epoch=0, start_step=0):
    return [tuple(t.clone() for t in b) for b in loader.epoch(epoch, start_step)]


def test_replayed_epochs_equal_a_fresh_loaders_without_decoding_again(val_tree, monkeypatch):
    reference = _epoch(_loader(val_tree))
    replay = ReplayLoader(_loader(val_tree))
    decoded = []
    inner = replay.loader.epoch
    monkeypatch.setattr(replay.loader, "epoch", lambda *a: decoded.append(a) or inner(*a))
    first, second, third = _epoch(replay, 0), _epoch(replay, 1), _epoch(replay, 2)
    assert len(decoded) == 1 and replay.replaying
    for got in (first, second, third):
        assert len(got) == len(reference) == len(replay) == 4
        for a, b in zip(got, reference):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert replay.num_samples == 15 and replay.skipped == []  # the wrapped loader's
    # a consumer writing into a yielded batch does not change the next epoch's
    next(iter(replay.epoch(3)))[0].zero_()
    assert torch.equal(_epoch(replay, 4)[0][0], reference[0][0])
    assert [len(b[0]) for b in _epoch(replay, 5, start_step=2)] == [4, 4]


def test_a_set_over_the_budget_or_an_unfinished_epoch_is_decoded_again(val_tree):
    small = ReplayLoader(_loader(val_tree), max_bytes=100)
    _epoch(small), _epoch(small)
    assert not small.replaying
    partial = ReplayLoader(_loader(val_tree))
    next(iter(partial.epoch(0)))  # stopped after one batch
    assert not partial.replaying
    _epoch(partial, 0, start_step=1)  # a resumed epoch is not a whole one
    assert not partial.replaying
    _epoch(partial)
    assert partial.replaying


def test_a_train_loader_is_refused(val_tree):
    train = build_loader(val_tree, "train", batch_size=4, device="cpu", crop_size=24,
                         num_threads=1)  # fmt: skip
    with pytest.raises(ValueError, match="train epoch is random"):
        ReplayLoader(train)
