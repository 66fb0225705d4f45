"""The official CIFAR recipe: its learning-rate curve, and the preset that resolves to it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from augmix_gpu.train.schedule import lr_factor


def official_get_lr(step: int, total_steps: int, lr_max: float, lr_min: float) -> float:
    """google-research/augmix cifar.py's `get_lr`, as its formula reads (the test's reference)."""
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(step / total_steps * math.pi))


def preset_lr(step: int, steps_per_epoch: int, epochs: int, lr: float = 0.1) -> float:
    """The project's cosine with the preset's keys: per step, floor 1e-5 x lr, no warm-up."""
    factor = lr_factor(
        step,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        schedule="cosine",
        warmup_epochs=0.0,
        min_factor=1e-5,
        per_epoch=False,
    )
    return lr * factor


def test_cosine_with_floor_is_the_official_per_step_get_lr():
    # cifar.py: LambdaLR(get_lr(step, epochs * len(loader), 1, 1e-6 / lr)), stepped per batch,
    # i.e. lr(step) = get_lr(step, total, lr, 1e-6). 390 steps: 50,000 images, batch 128.
    spe, epochs = 390, 100
    total = spe * epochs
    for step in (0, 1, 2, 389, 390, 12_345, total // 2, total - 1, total):
        assert preset_lr(step, spe, epochs) == pytest.approx(
            official_get_lr(step, total, 0.1, 1e-6), rel=1e-12, abs=1e-18
        ), step
    assert preset_lr(0, spe, epochs) == 0.1
    assert preset_lr(total // 2, spe, epochs) == pytest.approx((0.1 + 1e-6) / 2, rel=1e-12)
    assert preset_lr(total, spe, epochs) == pytest.approx(1e-6, rel=1e-9)
    assert preset_lr(total + 500, spe, epochs) == pytest.approx(1e-6, rel=1e-9)  # held
    # It moves every step (not per epoch), and never rises.
    curve = [preset_lr(s, spe, epochs) for s in range(0, total + 1, 97)]
    assert all(a > b for a, b in zip(curve, curve[1:]))
    # The floor is a ratio: lr 0.2 ends at 2e-6 (cifar.py would end at 1e-6 for any lr).
    assert preset_lr(total, spe, epochs, lr=0.2) == pytest.approx(2e-6, rel=1e-9)


# The official cifar.py defaults (its argparse and its optimizer call), in our keys: the
# hand-written expectation.
OFFICIAL = {
    "arch": "wrn40_2",  # --model wrn --layers 40 --widen-factor 2 --droprate 0
    "epochs": 100,
    "batch": 128,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "beta_net": 5e-4,  # --decay, on net.parameters(): every parameter
    "no_decay_norm_bias": False,
    "lr_scale_batch": 0,
    "schedule": "cosine",  # get_lr(step, epochs * len(loader), 1, 1e-6 / lr), per step
    "lr_min_factor": 1e-5,
    "lr_interval": "step",
    "warmup_epochs": 0,
    "precision": "32",
    "aug_type": "augmix_jsd",  # JSD on (--no-jsd off)
    "augmix_mixture_width": 3,
    "augmix_mixture_depth": -1,
    "initial_aug_severity": 3.0,  # --aug-severity 3
    "beta_jsd": 12.0,
    "all_ops": False,
    "normalization": "half",  # transforms.Normalize([0.5] * 3, [0.5] * 3)
    "last_batch": "keep",  # DataLoader(drop_last=False): 391 steps, the last of 80
}
PAPER_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
             "shear_x", "shear_y", "translate_x", "translate_y")  # fmt: skip


def _preset(*flags: str):
    from augmix_gpu.train.config import resolve_settings, validate_settings

    c = resolve_settings(["--config", "augmix_cifar.toml", "--data", "/data/cifar", *flags])
    validate_settings(c.replace(data=str(Path(__file__).parent)), world_size=1)  # a folder there
    return c


def _official_net_and_optimizer(c):
    from augmix_gpu.models import build_model
    from augmix_gpu.train.run import build_augmenter
    from augmix_gpu.train.schedule import build_optimizer
    from augmix_gpu.train.step import AugmentedClassifier

    model = build_model(c.model.arch, 100)
    augmenter = build_augmenter(c.augment, c.severity, c.data.normalization)
    net = AugmentedClassifier(model, c.augment.aug_type, augmenter)
    return net, build_optimizer(net, c.optim, c.run.batch, c.severity.severity_lr_mult)


def test_preset_resolves_to_the_official_recipe():
    c = _preset()
    flat = c.to_dict()
    assert {k: flat[k] for k in OFFICIAL} == OFFICIAL
    assert c.data.dataset == "cifar100" and c.data.cifar_loader == "resident"
    assert _preset("--dataset", "cifar10").data.dataset == "cifar10"
    assert _preset("--epochs", "3").run.epochs == 3  # flags still override the preset


def test_preset_builds_the_official_optimizer_and_augmenter():
    from augmix_gpu.models import WideResNet

    c = _preset()
    net, opt = _official_net_and_optimizer(c)
    assert isinstance(net.model, WideResNet) and len(net.model.groups[0]) == 6  # (40 - 4) / 6
    # torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=5e-4, nesterov=True):
    # one group, every parameter (BatchNorm weights and biases too); no severity parameters.
    assert type(opt) is torch.optim.SGD
    (group,) = opt.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in net.model.parameters()}
    assert (group["lr"], group["momentum"], group["nesterov"], group["dampening"]) == (
        0.1, 0.9, True, 0,
    )  # fmt: skip
    assert group["weight_decay"] == 5e-4
    aug = net.augmenter
    assert (aug.width, aug.depth, aug.severity, aug.alpha, aug.num_views) == (3, -1, 3.0, 1.0, 2)
    assert aug.op_names == PAPER_OPS
    assert (aug.mean, aug.std) == ((0.5,) * 3, (0.5,) * 3)  # cifar.py's preprocess


def test_preset_lr_curve_is_cifar_py_lambda_lr_step_by_step():
    """The trainer's own _set_lr with the resolved preset, against cifar.py's scheduler rebuilt
    from its parts: torch's LambdaLR around the hand-written get_lr, stepped after every batch."""
    from augmix_gpu.data.sharding import train_steps
    from augmix_gpu.train.step import _set_lr

    c = _preset()
    spe = train_steps(50_000, c.run.batch, 1, keep_last=c.data.last_batch == "keep")
    assert spe == 391  # cifar.py's len(train_loader): 390 batches of 128 and one of 80
    total = spe * c.run.epochs
    _, opt = _official_net_and_optimizer(c)
    ctx = SimpleNamespace(settings=c, steps_per_epoch=spe, optimizer=opt)
    param = torch.zeros(1, requires_grad=True)
    theirs = torch.optim.SGD([param], 0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        theirs, lr_lambda=lambda step: official_get_lr(step, total, 1, 1e-6 / 0.1)
    )
    for step in range(total):
        if step % 97 == 0 or step in (1, 389, 390, 391, total - 1):
            assert _set_lr(ctx, step) == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9), step
        theirs.step()
        sched.step()
    assert _set_lr(ctx, total - 1) == pytest.approx(1e-6, rel=1e-3)


def test_preset_normalisation_reaches_the_clean_batch_and_the_evaluation_loop():
    """--aug_type none feeds (x / 255 - 0.5) / 0.5 under the preset; evaluation normalises alike."""
    from augmix_gpu.eval.loop import normalize_uint8
    from augmix_gpu.eval.settings import NORMALIZATIONS
    from augmix_gpu.models import build_model
    from augmix_gpu.train.step import AugmentedClassifier

    c = _preset("--aug_type", "none")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = (x.double() / 255 - 0.5) / 0.5
    net = AugmentedClassifier(build_model("wrn10_1", 10), "none", None,
                              normalization=NORMALIZATIONS[c.data.normalization])  # fmt: skip
    torch.testing.assert_close(net.views(x).double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize_uint8(x, "half").double(), want, rtol=0, atol=1e-6)
    imagenet = normalize_uint8(x, "imagenet").double()
    assert (imagenet - want).abs().max() > 0.1  # the default is another affine map
