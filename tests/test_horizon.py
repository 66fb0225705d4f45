"""The paired estimator over a horizon (``--severity_horizon K``): the pair is two real training
runs at the pair's ends, checked against copies trained here by torch's own (unfused) AdamW; the
updater forks it K steps before each update, holds the first epochs, and resumes inside a window
from a ``weights_only`` checkpoint exactly."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import natural_batch
from torch import nn

from augmix_gpu.augment.augmix import AugMixBatch, normalize_images
from augmix_gpu.augment.losses import augmix_objective
from augmix_gpu.augment.severity import LearnableSeverity
from augmix_gpu.distributed import DistEnv
from augmix_gpu.train.heldout_severity import HeldoutSeverityUpdater
from augmix_gpu.train.horizon import HorizonPair
from augmix_gpu.train.hyper_passes import HeldoutBatch
from augmix_gpu.train.step import AugmentedClassifier

pytestmark = pytest.mark.usefixtures("one_thread")
SINGLE = DistEnv(0, 0, 1, torch.device("cpu"), None)
CLASSES, B, H, SIZE, BETA = 5, 6, 8, 24, 12.0


def _relu_net() -> nn.Module:
    """ReLU, max-pool and BatchNorm (no bias before it, as in a ResNet: a bias there has a gradient
    of pure rounding noise, which Adam scales to full steps that differ between its kernels)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, CLASSES),
    )  # fmt: skip


def _setup(seed: int = 0, start: float = 3.0, max_severity: float = 10.0):
    torch.manual_seed(seed)
    sev = LearnableSeverity(
        start, objective="heldout", initial_sigma=0.3, max_severity=max_severity
    )
    net = AugmentedClassifier(_relu_net(), "learnable_augmix_jsd", AugMixBatch(severity=sev))
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    return net, sev, opt


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return natural_batch(B, SIZE, seed=10 + k), (torch.arange(B) + k) % CLASSES


def _heldout(k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = natural_batch(H, SIZE, seed=100 + k)
    valid = torch.ones(H, dtype=torch.bool)
    valid[-1] = False  # a padding slot: must not count
    return images, (torch.arange(H) * 3 + k) % CLASSES, valid


def _main_step(net, opt, images, labels, generator) -> None:
    """The run's own step (what train_step does, without DDP): the draws stay on the augmenter."""
    views = net.views(images, generator=generator)
    opt.zero_grad(set_to_none=True)
    augmix_objective(net.classify(views), labels, jsd=True, beta_jsd=BETA).total.backward()
    opt.step()


def _snapshot(net, opt) -> dict:
    return copy.deepcopy({"model": net.model.state_dict(), "opt": opt.state_dict()})


def test_the_pair_is_two_real_runs_at_its_ends() -> None:
    """From a network 2 steps into training (Adam's moments matter): K = 3 steps of each copy at
    min(s e^0.5, max) and s e^-0.5 (the upper end clipped: max 4 from s ~ 3) on the run's
    batches and draws, at the run's learning rate (changed mid-window), clipped at 0.5, against
    copies trained here with the unfused AdamW; the slope is their held-out CE difference over
    the mean log-span; the run's network, buffers and optimiser are untouched."""
    net, sev, opt = _setup(max_severity=4.0)
    gen = torch.Generator().manual_seed(1)
    for k in range(2):
        _main_step(net, opt, *_batch(k), gen)
    before = _snapshot(net, opt)
    pair = HorizonPair(net, opt, log_step=0.5, beta_jsd=BETA, grad_clip=0.5)
    refs = []
    for _ in range(2):
        model = copy.deepcopy(net.model)
        ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        ref_opt.load_state_dict(copy.deepcopy(before["opt"]))  # it keeps the tensors it is given
        ref_opt.param_groups[0].update(fused=None, foreach=False)  # the for-loop reference
        refs.append((model, ref_opt))
    spans, spreads = [], []
    for k in range(2, 5):
        images, labels = _batch(k)
        if k == 3:
            opt.param_groups[0]["lr"] = 3e-3  # the schedule moved: the copies follow
        draws = net.augmenter.sample_params(B, generator=gen)
        s = sev.rsample(B, generator=gen).detach()
        pair.step(opt, images, labels, draws, s, SINGLE)
        ends = (torch.clamp(s * math.exp(0.5), max=4.0), s * math.exp(-0.5))
        spans.append(float((ends[0].log() - ends[1].log()).mean()))
        spreads.append(float((s.log() - sev.log_severity_mu.detach()).mean()))
        for (model, ref_opt), end in zip(refs, ends):
            ref_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
            views = torch.cat(net.augmenter.apply(images, draws, end))
            ref_opt.zero_grad()
            augmix_objective(model(views), labels, jsd=True, beta_jsd=BETA).total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            ref_opt.step()
    assert min(spans) < 1.0 - 1e-3, "degenerate check: the upper end was never clipped"
    held, h_labels, valid = _heldout()
    result = pair.result(HeldoutBatch(normalize_images(held), h_labels, valid), SINGLE)
    losses = []
    for model, _ in refs:
        model.eval()
        with torch.no_grad():
            ce = nn.functional.cross_entropy(
                model(normalize_images(held)), h_labels, reduction="none"
            )
        losses.append(float((ce * valid).sum() / valid.sum()))
    expected = (losses[0] - losses[1]) / (sum(spans) / 3)
    assert bool(result.finite)
    assert abs(expected) > 1e-4, "degenerate check: the pair's ends score alike"
    assert float(result.grad_mu) == pytest.approx(expected, rel=2e-3)
    assert float(result.grad_log_sigma) == pytest.approx(expected * sum(spreads) / 3, rel=2e-3)
    assert float(result.heldout_loss) == pytest.approx(sum(losses) / 2, rel=1e-4)
    after = _snapshot(net, opt)
    after["opt"]["param_groups"][0]["lr"] = before["opt"]["param_groups"][0]["lr"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_non_finite_copy_step_is_skipped_and_marks_the_result() -> None:
    """One copy's weights poisoned with a NaN: its gradient is NaN, so its step is skipped on the
    device (the parameters as they were; BatchNorm's statistics move in the forward, as the
    run's do), the other copy still trains, and the result is zeros,
    not finite (the updater then skips its update)."""
    net, sev, opt = _setup()
    pair = HorizonPair(net, opt, log_step=0.5, beta_jsd=BETA)
    with torch.no_grad():
        pair.models[1][-1].weight[0, 0] = float("nan")
    poisoned, healthy = (copy.deepcopy(dict(m.named_parameters())) for m in reversed(pair.models))
    images, labels = _batch(0)
    draws = net.augmenter.sample_params(B, generator=torch.Generator().manual_seed(0))
    pair.step(opt, images, labels, draws, sev.rsample(B).detach(), SINGLE)
    torch.testing.assert_close(dict(pair.models[1].named_parameters()), poisoned, equal_nan=True)
    assert not torch.equal(pair.models[0][0].weight, healthy["0.weight"])
    held, h_labels, valid = _heldout()
    result = pair.result(HeldoutBatch(normalize_images(held), h_labels, valid), SINGLE)
    assert not bool(result.finite) and float(result.grad_mu) == 0.0


class _HeldoutBatches:
    """A held-out loader: ``epoch(e, start_step)`` yields fixed batches; it records which."""

    def __init__(self, count: int = 4) -> None:
        self.count, self.taken = count, []

    def __len__(self) -> int:
        return self.count

    def epoch(self, epoch: int, start_step: int = 0):
        for k in range(start_step, self.count):
            self.taken.append(epoch * self.count + k)
            yield _heldout(epoch * self.count + k)


def _updater_run(resume_after: int | None = None) -> tuple[dict, dict, list]:
    """15 steps with every 5, horizon 3, a hold of 5 steps; ``resume_after``: the updater (and
    the run's net and optimiser) rebuilt from a weights_only checkpoint after that step."""
    net, sev, opt = _setup(seed=3)
    loader = _HeldoutBatches()
    kw = dict(every=5, lr=0.1, beta_jsd=BETA, estimator="paired", horizon=3, hold_steps=5)
    updater = HeldoutSeverityUpdater(net, loader, SINGLE, **kw)
    out, mus = {}, {}
    for step in range(15):
        images, labels = _batch(step)
        _main_step(net, opt, images, labels, torch.Generator().manual_seed(step))
        if updater.due(step):
            out[step] = updater.update(opt, None, labels, step, images=images)
        mus[step] = sev.log_severity_mu.item()
        if step == resume_after:
            buffer = io.BytesIO()
            state = {"model": net.state_dict(), "opt": opt.state_dict(),
                     "updater": updater.state_dict()}  # fmt: skip
            torch.save(state, buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
            net, sev, opt = _setup(seed=99)  # other weights: everything comes from the file
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            updater = HeldoutSeverityUpdater(net, loader, SINGLE, **kw)
            updater.load_state_dict(state["updater"])
    return out, mus, loader.taken


def test_updater_forks_k_steps_before_each_update_and_holds_the_first_cycles() -> None:
    """every 5, K = 3, hold 5: the cycle ending at step 4 would fork at step 1, inside the hold:
    nothing; the others fork after steps 6 and 11, step the pair at 7-9 and 12-14 (the run's
    batches of those steps), and update at 9 and 14 with held-out batches 1 and 2 (one per
    update, by its index)."""
    out, mus, taken = _updater_run()
    assert sorted(out) == [6, 7, 8, 9, 11, 12, 13, 14]
    assert all(out[s] == {} for s in out if s not in (9, 14))
    assert set(out[9]) == {"heldout_loss", "hypergrad_mu", "hypergrad_log_sigma"}
    assert taken[0] == 1 and 2 in taken
    assert len({mus[s] for s in range(9)}) == 1, "the severity moved inside the hold"
    assert mus[9] != mus[8] and mus[14] != mus[13]
    assert mus[10] == mus[9], "no update between cycles"


def test_updater_resumes_inside_a_window_exactly() -> None:
    """A checkpoint after step 12 (the pair forked after 11, one of its three steps taken) loaded
    with weights_only into fresh objects: the same update at 14 as the uninterrupted run."""
    straight, mus, _ = _updater_run()
    resumed, mus_resumed, _ = _updater_run(resume_after=12)
    assert float(resumed[14]["hypergrad_mu"]) == float(straight[14]["hypergrad_mu"])
    assert mus_resumed[14] == mus[14]


def test_updater_refuses_a_horizon_it_cannot_run() -> None:
    net, *_ = _setup()
    kw = dict(every=4, lr=0.1, beta_jsd=BETA)
    with pytest.raises(ValueError, match=r"horizon must be in 1..every \(4\), got 5"):
        HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, estimator="paired", horizon=5, **kw)
    with pytest.raises(ValueError, match="needs estimator='paired' and lookaheads=1"):
        HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, horizon=2, **kw)
    with pytest.raises(ValueError, match="hold_steps must be >= 0"):
        HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, hold_steps=-1, **kw)


def test_sign_rule_moves_mu_by_lr_against_each_reading_whatever_its_size() -> None:
    """--severity_update_rule sign on the horizon's updates (every 5, K 3, hold 5): at each update
    mu moves by exactly -lr sign(reading) and log sigma by -clamp(lr g_sigma / |g_mu|, +-lr),
    the readings being the ones the updater reports (which Adam's run shows to be the same: the
    rule changes the step, not the reading)."""
    adam, adam_mus, _ = _updater_run()
    net, sev, opt = _setup(seed=3)
    lr = 0.1
    updater = HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, every=5, lr=lr, beta_jsd=BETA,
                                     estimator="paired", horizon=3, hold_steps=5, rule="sign")  # fmt: skip
    before = (sev.log_severity_mu.item(), sev.log_severity_log_sigma.item())
    for step in range(10):
        images, labels = _batch(step)
        _main_step(net, opt, images, labels, torch.Generator().manual_seed(step))
        if updater.due(step):
            out = updater.update(opt, None, labels, step, images=images)
    g_mu, g_sigma = float(out["hypergrad_mu"]), float(out["hypergrad_log_sigma"])
    assert g_mu == float(adam[9]["hypergrad_mu"]) and g_mu != 0
    assert sev.log_severity_mu.item() == pytest.approx(before[0] - lr * math.copysign(1, g_mu))
    sigma_step = max(-lr, min(lr, lr * g_sigma / abs(g_mu)))
    assert sev.log_severity_log_sigma.item() == pytest.approx(before[1] - sigma_step, abs=1e-7)


@pytest.mark.parametrize("sums, moved", [([0.3, 0.9, 1.0, 0.0], True),  # |g_sigma| > |g_mu|
                                         ([-1e-6, 0.0, 1.0, 0.0], True),  # tiny: a full step
                                         ([0.0, 0.5, 1.0, 0.0], False),  # no reading: no step
                                         ([0.3, 0.1, 1.0, 1.0], False)])  # not finite: skipped  # fmt: skip
def test_sign_rule_step_sizes(sums, moved) -> None:
    net, sev, _ = _setup()
    updater = HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, every=4, lr=0.2, beta_jsd=BETA,
                                     rule="sign")  # fmt: skip
    mu, log_sigma = sev.log_severity_mu.item(), sev.log_severity_log_sigma.item()
    updater._sums.copy_(torch.tensor(sums))
    updater._step()
    g_mu, g_sigma = sums[0], sums[1]
    d_mu = -0.2 * math.copysign(1, g_mu) if moved else 0.0
    d_sigma = -max(-0.2, min(0.2, 0.2 * g_sigma / abs(g_mu))) if moved else 0.0
    assert sev.log_severity_mu.item() - mu == pytest.approx(d_mu, abs=1e-6)
    assert sev.log_severity_log_sigma.item() - log_sigma == pytest.approx(d_sigma, abs=1e-6)
    assert updater.skipped_nonfinite == int(sums[3] > 0)


def test_updater_refuses_an_unknown_rule() -> None:
    net, *_ = _setup()
    with pytest.raises(ValueError, match=r"rule must be one of \('adam', 'sign'\), got 'sgd'"):
        HeldoutSeverityUpdater(net, _HeldoutBatches(), SINGLE, every=4, lr=0.1, beta_jsd=BETA,
                               rule="sgd")  # fmt: skip
