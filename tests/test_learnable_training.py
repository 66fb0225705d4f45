"""The learnable severity inside AugMixBatch: gradients reach s, and short toy trainings move it.

The toy loops train a small CNN on generated gratings (class = orientation) with the AugMix+JSD
objective and Adam on the severity at 10x the network's learning rate (the trainer's
``severity_lr_mult``). With seeds fixed they are deterministic. Adam moves mu by at most about
its lr (0.01) per step, so 40 steps move log s by <= 0.4; seeds 0-2 gave moves of 0.36-0.42 in the
expected direction without the KL and <= 0.01 with it, against thresholds of 0.2 and 0.1.
One thread: ~2 s per loop on this CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import natural_batch
from torch import nn

from augmix_gpu.augment.augmix import AugMixBatch, AugMixParams
from augmix_gpu.augment.losses import augmix_objective
from augmix_gpu.augment.ops import OPS
from augmix_gpu.augment.severity import LearnableSeverity

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# d view / d s through AugMixBatch.apply with hand-made params
# ---------------------------------------------------------------------------------------------


def _single_op_params(op_index: int, batch: int, seed: int = 0, max_depth: int = 3) -> AugMixParams:
    """Params whose every chain step applies op ``op_index`` (V=2 views, width 3, depth 1..max)."""
    g = torch.Generator().manual_seed(seed)
    v, w, d = 2, 3, 3
    weights = torch.rand((v, batch, w), generator=g, dtype=torch.float64) + 0.1
    return AugMixParams(
        ops=torch.full((v, w, d, batch), op_index, dtype=torch.long),
        depth=torch.randint(1, max_depth + 1, (v, w, batch), generator=g),
        level_u=torch.rand((v, w, d, batch), generator=g, dtype=torch.float64),
        signs=torch.randint(0, 2, (v, w, d, batch), generator=g).double() * 2 - 1,
        weights=weights / weights.sum(dim=-1, keepdim=True),
        mix=torch.rand((v, batch), generator=g, dtype=torch.float64),
    )


# both forms of a call (AugMixBatch strategy): the gradient must be the same through each
_AUGS = {k: AugMixBatch(all_ops=True, normalize=False, strategy=k) for k in ("grouped", "static")}
_AUG = _AUGS["grouped"]


@pytest.mark.parametrize("strategy", list(_AUGS))
@pytest.mark.parametrize("name", [n for n in _AUG.op_names if OPS[n].gradient == "exact"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_batch", "per_sample"])
def test_augmix_views_gradcheck_in_s(name: str, per_sample: bool, strategy: str) -> None:
    x = natural_batch(2, 12, seed=21).double() / 255.0
    # contrast blends with the grey mean rounded to an 8-bit level (PIL), whose gradient is
    # straight-through: exact in s for one application, approximate when the input of contrast
    # already depends on s (a second contrast in the chain). So its chains have depth 1 here.
    max_depth = 1 if name == "contrast" else 3
    params = _single_op_params(_AUG.op_names.index(name), batch=2, max_depth=max_depth)
    s0 = [3.3, 5.2] if per_sample else 4.1
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)

    def views(s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _AUGS[strategy].apply(x, params, s)[1:]

    (g,) = torch.autograd.grad(sum(v.sum() for v in views(s)), s)
    assert (g.abs() > 1e-3).all()  # the views really move with s
    # fast_mode checks a random projection of the Jacobian (one backward instead of one per pixel).
    assert torch.autograd.gradcheck(views, (s,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("strategy", list(_AUGS))
@pytest.mark.parametrize("name", [n for n in _AUG.op_names if OPS[n].gradient == "none"])
def test_augmix_views_without_magnitude_have_no_gradient(name: str, strategy: str) -> None:
    x = natural_batch(2, 12, seed=22).double() / 255.0
    params = _single_op_params(_AUG.op_names.index(name), batch=2)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    views = _AUGS[strategy].apply(x, params, s)[1:]
    grads = torch.autograd.grad(sum(v.sum() for v in views), s, allow_unused=True)
    assert grads[0] is None or grads[0].item() == 0.0


# ---------------------------------------------------------------------------------------------
# A tiny model and generated data
# ---------------------------------------------------------------------------------------------

CLASSES, SIZE, BATCH = 4, 32, 32


def _gratings(g: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[n,3,SIZE,SIZE]`` tinted sine gratings whose orientation (k * 45 deg) is the label."""
    y = torch.randint(0, CLASSES, (n,), generator=g)
    theta = y.double() * math.pi / CLASSES + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    freq = 3.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)  # cycles per image
    phase = 2.0 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    axis = torch.linspace(0.0, 1.0, SIZE, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    proj = xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None]
    wave = 0.5 + 0.35 * torch.sin(2.0 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    tint = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    noise = 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    img = (wave[:, None] * tint + noise).clamp(0.0, 1.0)
    return (img * 255.0).round().to(torch.uint8), y


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )


def _step_loss(net, aug, sev, g, beta_reg: float):
    x, y = _gratings(g)
    logits = net(torch.cat(aug(x, generator=g)))
    return augmix_objective(
        logits, y, jsd=True, kl=sev.kl(), beta_augmenter_reg=beta_reg, kl_scale=1.0 / BATCH
    )


@pytest.mark.parametrize("strategy", ["grouped", "static"])
@pytest.mark.parametrize("objective", ["minimize", "adversarial"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_batch", "per_sample"])
def test_one_backward_reaches_log_severity_mu(
    objective: str, per_sample: bool, strategy: str
) -> None:
    torch.manual_seed(0)
    sev = LearnableSeverity(3.0, per_sample=per_sample, objective=objective)
    aug = AugMixBatch(severity=sev, strategy=strategy)
    # beta_augmenter_reg = 0 and mu at the prior: any gradient on mu comes through the views.
    parts = _step_loss(_small_cnn(), aug, sev, torch.Generator().manual_seed(1), beta_reg=0.0)
    parts.total.backward()
    grad = sev.log_severity_mu.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs().item() > 1e-6
    assert torch.isfinite(sev.log_severity_log_sigma.grad)


# ---------------------------------------------------------------------------------------------
# Toy training loops
# ---------------------------------------------------------------------------------------------

STEPS, LR, SEVERITY_LR_MULT = 40, 1e-3, 10.0


def _train(objective: str, beta_reg: float, per_sample: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = _small_cnn()
    sev = LearnableSeverity(3.0, per_sample=per_sample, objective=objective)
    aug = AugMixBatch(severity=sev)
    opt = torch.optim.Adam(
        [
            {"params": net.parameters(), "lr": LR},
            {"params": sev.parameters(), "lr": LR * SEVERITY_LR_MULT},
        ]
    )
    trajectory = [sev.stats()]
    for _ in range(STEPS):
        parts = _step_loss(net, aug, sev, g, beta_reg)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
        trajectory.append(sev.stats())
    return sev, trajectory


@pytest.mark.parametrize("per_sample", [False, True], ids=["per_batch", "per_sample"])
def test_minimize_lowers_severity_without_kl(per_sample: bool) -> None:
    # one form: the forms give the same gradient (test_augmix.py::test_the_forms_agree_...)
    sev, traj = _train("minimize", beta_reg=0.0, per_sample=per_sample)
    # Adam moves mu by at most ~lr = 0.01 per step: 40 steps -> <= 0.4; require half of it.
    drop = math.log(traj[0]["severity_mean"]) - math.log(traj[-1]["severity_mean"])
    assert drop > 0.2, f"log mean severity fell by only {drop:.3f}: {traj[-1]}"
    assert all(math.isfinite(v) for v in traj[-1].values())


def test_adversarial_raises_severity_without_kl() -> None:
    sev, traj = _train("adversarial", beta_reg=0.0)
    rise = math.log(traj[-1]["severity_mean"]) - math.log(traj[0]["severity_mean"])
    assert rise > 0.2, f"log mean severity rose by only {rise:.3f}: {traj[-1]}"


@pytest.mark.parametrize("objective", ["minimize", "adversarial"])
def test_large_kl_weight_holds_severity_at_the_prior(objective: str) -> None:
    # beta * kl_scale = 1000 / 32 ~ 31 per nat of KL; without it mu moves by > 0.2 (tests above).
    sev, traj = _train(objective, beta_reg=1000.0)
    prior_mu = math.log(3.0)
    worst = max(abs(t["severity_mu"] - prior_mu) for t in traj)
    assert worst < 0.1, f"mu strayed {worst:.3f} from the prior mean log 3 in log space"
