"""The presets are the recipes they name: each resolved optimizer and learning-rate curve against a
hand-written expectation (and, where torch has one, torch's own scheduler); the options that depart
from the recipes (Nesterov, no decay on norms/biases) are opt-in; friendly --resume forms."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from torchvision.models import resnet18

from augmix_gpu.augment.augmix import AugMixBatch
from augmix_gpu.augment.severity import LearnableSeverity
from augmix_gpu.train.config import Settings, resolve_settings, validate_settings
from augmix_gpu.train.schedule import build_optimizer
from augmix_gpu.train.step import AugmentedClassifier, _set_lr


def _net(config: Settings) -> AugmentedClassifier:
    """A small torchvision ResNet (BatchNorm weights and biases, an fc bias) in the preset's mode.

    The parameter groups do not depend on the depth; resnet18 builds in a fraction of resnet50's
    time."""
    model = resnet18(num_classes=10)
    aug_type = config.augment.aug_type
    if aug_type == "learnable_augmix_jsd":
        return AugmentedClassifier(model, aug_type, AugMixBatch(severity=LearnableSeverity()))
    return AugmentedClassifier(model, aug_type, AugMixBatch())


def _optimizer(net: AugmentedClassifier, c: Settings, global_batch: int):
    return build_optimizer(net, c.optim, global_batch, c.severity.severity_lr_mult)


def _curve(config: Settings, optimizer, steps_per_epoch: int, epochs: list[int], at: float = 0.0):
    """{group name: [lr at epoch e (+ `at` of an epoch)]} through the trainer's own `_set_lr`."""
    ctx = SimpleNamespace(settings=config, steps_per_epoch=steps_per_epoch, optimizer=optimizer)
    out = {g["name"]: [] for g in optimizer.param_groups}
    for e in epochs:
        _set_lr(ctx, int((e + at) * steps_per_epoch))
        for g in optimizer.param_groups:
            out[g["name"]].append(g["lr"])
    return out


def test_augmix_paper_preset_is_the_official_imagenet_recipe():
    c = resolve_settings(["--config", "augmix_paper.toml"])
    validate_settings(c, world_size=8)
    a = c.augment
    assert (c.model.arch, a.aug_type, c.run.epochs, c.model.precision) == (
        "resnet50", "augmix_jsd", 180, "32",
    )  # fmt: skip
    assert (a.initial_aug_severity, a.augmix_mixture_width, a.augmix_mixture_depth) == (1.0, 3, -1)
    assert (a.all_ops, a.beta_jsd, c.optim.warmup_epochs) == (False, 12.0, 0)
    net = _net(c)
    for batch in (256, 1024):
        opt = _optimizer(net, c, batch)
        # torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=1e-4): one group,
        # every parameter decayed (BatchNorm weights and biases too), plain momentum.
        assert type(opt) is torch.optim.SGD
        (group,) = opt.param_groups
        assert group["name"] == "net"
        assert {id(p) for p in group["params"]} == {id(p) for p in net.model.parameters()}
        assert (group["momentum"], group["nesterov"], group["dampening"]) == (0.9, False, 0)
        assert group["weight_decay"] == 1e-4
        base = 0.1 * batch / 256
        assert group["base_lr"] == pytest.approx(base)
        # x0.1 at epochs 60 and 120 (k = 180 // 3), changed at epoch boundaries only.
        lrs = _curve(c, opt, 7, [0, 59, 60, 119, 120, 179])["net"]
        expected = [base, base, base / 10, base / 10, base / 100, base / 100]
        assert lrs == pytest.approx(expected, rel=1e-12)
        late = _curve(c, opt, 7, [59], at=6 / 7)["net"]  # the last step of epoch 59
        assert late == pytest.approx([base], rel=1e-12)


@pytest.mark.parametrize("epochs", [180, 90, 101, 7, 2])
def test_step_thirds_is_imagenet_py_adjust_learning_rate(epochs):
    """Against the official function written out: k = epochs // 3; x1 below k, x0.1 below 2k,
    x0.01 after (so 2k, not 2*epochs//3, and below 3 epochs the run starts at x0.01)."""

    def official(epoch: int) -> float:
        k = epochs // 3
        return 1.0 if epoch < k else 0.1 if epoch < 2 * k else 0.01

    c = resolve_settings(["--config", "augmix_paper.toml", "--epochs", str(epochs)])
    opt = _optimizer(_net(c), c, 256)
    ours = _curve(c, opt, 3, list(range(epochs)), at=2 / 3)["net"]
    assert ours == pytest.approx([0.1 * official(e) for e in range(epochs)], rel=1e-12)


def test_reference_preset_is_the_reference_scripts_recipe():
    c = resolve_settings(["--config", "reference.toml"])
    assert (c.model.arch, c.model.pretrained, c.augment.aug_type, c.augment.all_ops) == (
        "resnet50", "IMAGENET1K_V2", "learnable_augmix_jsd", True,
    )  # fmt: skip
    assert (c.model.precision, c.run.matmul_precision, c.optim.grad_clip_val, c.run.batch) == (
        "16", "medium", 1.0, 1024,
    )  # fmt: skip
    sev = c.severity
    assert (c.augment.initial_aug_severity, sev.initial_severity_sigma, sev.beta_augmenter_reg) == (
        3.0, 0.1, 1.0,
    )  # fmt: skip
    net = _net(c)
    opt = _optimizer(net, c, c.run.batch)
    # AdamW([{net params, lr, weight_decay=beta_net}, {severity params, lr x 10, wd 0}]).
    assert type(opt) is torch.optim.AdamW
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["net", "severity"]
    assert {id(p) for p in groups["net"]["params"]} == {id(p) for p in net.model.parameters()}
    assert (groups["net"]["base_lr"], groups["net"]["weight_decay"]) == (1e-4, 0.01)
    assert groups["severity"]["base_lr"] == pytest.approx(1e-3)
    assert groups["severity"]["weight_decay"] == 0.0
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.999), 1e-8)
    # CosineAnnealingWarmRestarts(T_0=10, T_mult=2, eta_min=1e-6) once per epoch: restarts at
    # 10, 30, 70; halfway through each period (5, 20, 50) the lr is (1e-4 + 1e-6) / 2.
    epochs = [0, 5, 10, 20, 30, 50, 70]
    lrs = _curve(c, opt, 11, epochs)["net"]
    assert lrs == pytest.approx([1e-4, 5.05e-5, 1e-4, 5.05e-5, 1e-4, 5.05e-5, 1e-4], rel=1e-9)
    assert _curve(c, opt, 11, [5], at=10 / 11)["net"] == pytest.approx([5.05e-5])  # per epoch
    # ...and every epoch of the 90 against torch's scheduler, stepped as Lightning steps it.
    ref_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, 10, 2, eta_min=1e-6)
    ref = []
    for _ in range(90):
        ref.append(ref_opt.param_groups[0]["lr"])
        sched.step()
    assert _curve(c, opt, 11, list(range(90)), at=0.5)["net"] == pytest.approx(ref, rel=1e-9)


def test_departures_from_the_recipes_are_opt_in():
    c = resolve_settings(["--config", "augmix_paper.toml", "--nesterov", "--no_decay_norm_bias"])
    validate_settings(c, world_size=1)
    net = _net(c)
    opt = _optimizer(net, c, 256)
    groups = {g["name"]: g for g in opt.param_groups}
    assert opt.defaults["nesterov"] is True
    assert all(p.ndim > 1 for p in groups["net"]["params"])
    assert all(p.ndim <= 1 for p in groups["net_no_decay"]["params"])
    assert groups["net_no_decay"]["weight_decay"] == 0.0 and groups["net"]["weight_decay"] == 1e-4
    n = len(groups["net"]["params"]) + len(groups["net_no_decay"]["params"])
    assert n == len(list(net.model.parameters()))
    with pytest.raises(ValueError, match=re.escape("--nesterov True: needs --optimizer sgd")):
        validate_settings(resolve_settings(["--nesterov", "--optimizer", "adamw"]), world_size=1)


def test_cosine_ends_at_the_floor_over_the_steps_actually_taken():
    """With --max_steps_per_epoch the trainer passes the capped count: the cosine reaches its
    end at the run's last step (it stopped at 0.976 of the lr when fed the uncapped count)."""
    c = resolve_settings(
        ["--schedule", "cosine", "--epochs", "3", "--lr_min_factor", "0.01", "--warmup_epochs", "0"]
    )
    opt = _optimizer(_net(c), c, 64)
    capped = 4  # steps per epoch actually taken
    last = _curve(c, opt, capped, [3], at=-1 / capped)["net"][0] / c.optim.lr
    expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 11 / 12))
    assert last == pytest.approx(expected) and last < 0.03


@pytest.mark.parametrize(
    ("argv", "resume"),
    [
        (["--resume"], "auto"),  # alone: <run dir>/last.ckpt
        (["--resume", "--ckpt_path", "x.ckpt"], "x.ckpt"),  # the reference script's form
        (["--ckpt_path", "x.ckpt", "--resume"], "x.ckpt"),
        (["--resume", "run/last.ckpt"], "run/last.ckpt"),
        (["--resume", "auto"], "auto"),
        ([], None),
        (["--eval_only", "--ckpt_path", "x.ckpt"], None),
    ],
)
def test_resume_flag_forms(argv, resume):
    assert resolve_settings(argv).run.resume == resume


def test_a_presets_true_switches_off_on_the_command_line(tmp_path):
    """The demo preset turns channels-last on; --no-channels_last must turn it off again (the
    studies pin the layout they were recorded with), and the flag typed last wins."""
    preset = tmp_path / "p.toml"
    preset.write_text('dataset = "synthetic"\nchannels_last = true\n')
    assert resolve_settings(["--config", str(preset)]).model.channels_last is True
    off = resolve_settings(["--config", str(preset), "--no-channels_last"])
    assert off.model.channels_last is False
    again = resolve_settings(["--config", str(preset), "--no-channels_last", "--channels_last"])
    assert again.model.channels_last is True


def test_aug_ops_names_the_ops_the_augmenter_draws():
    """--aug_ops: a subset of the table (its order kept), refused with --all_ops, twice-named or
    unknown ops; a run cannot resume under another set."""
    from augmix_gpu.train.config import resume_conflicts
    from augmix_gpu.train.run import build_augmenter

    s = resolve_settings(["--aug_ops", "solarize", "rotate", "autocontrast"])
    validate_settings(s, 1)
    aug = build_augmenter(s.augment, s.severity, s.data.normalization)
    assert aug.op_names == ("autocontrast", "rotate", "solarize")
    default = resolve_settings([])
    assert build_augmenter(default.augment, default.severity, "imagenet").op_names == tuple(
        n for n in ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x",
                    "shear_y", "translate_x", "translate_y")
    )  # fmt: skip
    assert resume_conflicts(default, s) == [("aug_ops", [], ["solarize", "rotate", "autocontrast"])]
    with pytest.raises(
        ValueError, match=r"--aug_ops 'rotate': names the whole set: drop --all_ops"
    ):
        validate_settings(resolve_settings(["--aug_ops", "rotate", "--all_ops"]), 1)
    with pytest.raises(ValueError, match="names an op more than once"):
        resolve_settings(["--aug_ops", "rotate", "rotate"])
    with pytest.raises(SystemExit):  # argparse: invalid choice, listing the names
        resolve_settings(["--aug_ops", "blur"])
