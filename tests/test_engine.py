"""The training step's plumbing: what the network is fed per mode, the lr schedule, the optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from augmix_gpu.augment.augmix import IMAGENET_MEAN, IMAGENET_STD, AugMixBatch
from augmix_gpu.augment.severity import LearnableSeverity
from augmix_gpu.train.config import resolve_settings
from augmix_gpu.train.schedule import build_optimizer, lr_factor
from augmix_gpu.train.step import AugmentedClassifier


class Recorder(nn.Module):
    """A linear classifier that records every batch it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return self.fc(x.mean((2, 3)))


def images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def expected_clean(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_none_feeds_the_normalised_clean_batch_only():
    model, x = Recorder(), images()
    AugmentedClassifier(model, "none", None)(x)
    assert len(model.calls) == 1
    torch.testing.assert_close(model.calls[0], expected_clean(x))


@pytest.mark.parametrize("mode", ["augmix_jsd", "learnable_augmix_jsd"])
def test_jsd_modes_feed_one_concatenated_batch(mode):
    severity = LearnableSeverity(3.0) if mode == "learnable_augmix_jsd" else 3.0
    model, x = Recorder(), images()
    net = AugmentedClassifier(model, mode, AugMixBatch(severity=severity))
    logits = net(x, generator=torch.Generator().manual_seed(1))
    assert len(model.calls) == 1, "the network must run once on [clean; view1; view2]"
    fed = model.calls[0]
    assert fed.shape == (12, 3, 16, 16) and logits.shape == (12, 5)
    torch.testing.assert_close(fed[:4], expected_clean(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fed[4:8], fed[8:]), "the two AugMix views must differ"


def test_augmix_without_jsd_feeds_one_augmented_view():
    model, x = Recorder(), images()
    AugmentedClassifier(model, "augmix", AugMixBatch(num_views=1))(
        x, generator=torch.Generator().manual_seed(2)
    )
    assert len(model.calls) == 1 and model.calls[0].shape == (4, 3, 16, 16)
    assert not torch.allclose(model.calls[0], expected_clean(x))


def test_mode_and_augmenter_must_agree():
    with pytest.raises(ValueError, match="disagree"):
        AugmentedClassifier(Recorder(), "none", AugMixBatch())


def test_lr_schedules_are_pure_functions_of_the_step():
    kw = {"steps_per_epoch": 10, "epochs": 4, "warmup_epochs": 1.0}
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)  # warm-up: (step+1)/10
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(
        1.0
    )  # cosine starts after warm-up
    assert lr_factor(25, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 1.5 / 3))
    )
    assert lr_factor(40, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    kw0 = {"steps_per_epoch": 10, "epochs": 90, "warmup_epochs": 0.0}
    assert lr_factor(299, schedule="step", **kw0) == 1.0 and lr_factor(
        300, schedule="step", **kw0
    ) == pytest.approx(0.1)
    assert lr_factor(100, schedule="cosine_restarts", **kw0) == pytest.approx(
        1.0
    )  # restart every 10 epochs
    assert lr_factor(50, schedule="cosine_restarts", **kw0) == pytest.approx(0.5)


def test_optimizer_groups_severity_at_lr_multiplier_without_decay():
    config = resolve_settings(
        ["--dataset", "imagenet", "--lr", "0.01", "--beta_net", "0.05", "--no_decay_norm_bias"]
    )
    net = AugmentedClassifier(
        Recorder(), "learnable_augmix_jsd", AugMixBatch(severity=LearnableSeverity())
    )
    opt = build_optimizer(net, config.optim, 128, config.severity.severity_lr_mult)
    groups = {g["name"]: g for g in opt.param_groups}
    assert (
        groups["severity"]["lr"] == pytest.approx(0.1) and groups["severity"]["weight_decay"] == 0.0
    )
    assert groups["net"]["weight_decay"] == 0.05 and groups["net_no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["severity"]["params"]} == {
        id(p) for p in net.severity.parameters()
    }
