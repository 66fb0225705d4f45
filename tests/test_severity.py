"""LearnableSeverity: KL, sampling distribution, bound, gradient reversal, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import natural_batch
from scipy import stats
from torch.distributions import LogNormal, Normal, kl_divergence

from augmix_gpu.augment.ops import OPS
from augmix_gpu.augment.severity import LearnableSeverity

# Two-sided tail probability for the statistical tests: with fixed seeds they are deterministic,
# this only says how unlikely a false failure would be for an arbitrary seed.
ALPHA = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("initial", "std", "offset", "mu", "log_sigma"),
    [(3.0, 1.0, 0.0, None, None), (1.5, 0.3, -0.4, 0.2, -1.0), (8.0, 2.0, 0.7, 1.9, 0.3)],
)
def test_kl_matches_torch_distributions(initial, std, offset, mu, log_sigma) -> None:
    sev = LearnableSeverity(initial, prior_severity_std=std, prior_severity_mean_offset=offset)
    with torch.no_grad():
        if mu is not None:
            sev.log_severity_mu.fill_(mu)
            sev.log_severity_log_sigma.fill_(log_sigma)
    q = Normal(sev.log_severity_mu, sev.log_severity_log_sigma.exp())
    p = Normal(torch.tensor(math.log(initial) + offset), torch.tensor(std))
    assert sev.kl().item() == pytest.approx(kl_divergence(q, p).item(), rel=1e-5, abs=1e-6)


def test_kl_is_zero_at_the_prior_and_has_gradient() -> None:
    sev = LearnableSeverity(3.0, prior_severity_std=0.1, initial_sigma=0.1)
    assert sev.kl().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        sev.log_severity_mu.add_(0.5)
    sev.kl().backward()
    assert sev.log_severity_mu.grad.item() > 0  # descending the KL pulls mu back down


def _check_normal(x: torch.Tensor, mu: float, sigma: float) -> None:
    """Sample mean (z-test) and variance (chi-square test) of x against N(mu, sigma^2)."""
    n = x.numel()
    x = x.double()
    z = (x.mean().item() - mu) / (sigma / math.sqrt(n))
    assert abs(z) < stats.norm.ppf(1 - ALPHA / 2), f"mean of log s off by {z:.2f} standard errors"
    chi = (n - 1) * x.var(unbiased=True).item() / sigma**2
    lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n - 1)
    assert lo < chi < hi, f"variance of log s: chi2={chi:.1f} outside ({lo:.1f}, {hi:.1f})"


def _set(sev: LearnableSeverity, mu: float, sigma: float) -> None:
    with torch.no_grad():
        sev.log_severity_mu.fill_(mu)
        sev.log_severity_log_sigma.fill_(math.log(sigma))


def test_per_batch_samples_are_lognormal() -> None:
    # mu = log 2, sigma = 0.4: the bound 10 sits 4 sigma above mu, so the clamp is negligible
    # (P = 3e-5 per draw).
    sev = LearnableSeverity(2.0)
    _set(sev, math.log(2.0), 0.4)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sev.rsample(8, generator=g) for _ in range(4000)])
    assert draws.shape == (4000,)  # one scalar per batch
    _check_normal(draws.detach().log(), math.log(2.0), 0.4)


def test_per_sample_samples_are_lognormal() -> None:
    sev = LearnableSeverity(2.0, per_sample=True)
    _set(sev, math.log(1.5), 0.5)
    s = sev.rsample(20000, generator=torch.Generator().manual_seed(1))
    assert s.shape == (20000,)
    _check_normal(s.detach().log(), math.log(1.5), 0.5)
    # And a wrong sigma would be caught: the same draws fail the test for sigma = 0.52.
    with pytest.raises(AssertionError):
        _check_normal(s.detach().log(), math.log(1.5), 0.52)


def test_generator_reproducibility() -> None:
    sev = LearnableSeverity(per_sample=True, initial_sigma=0.3)
    a = sev.rsample(5, generator=torch.Generator().manual_seed(7))
    b = sev.rsample(5, generator=torch.Generator().manual_seed(7))
    c = sev.rsample(5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(sev.last_sample, c.detach())


def test_bound_holds_in_value_and_its_gradient_never_pushes_outwards() -> None:
    sev = LearnableSeverity(9.0, max_severity=10.0, initial_sigma=1.0, per_sample=True)
    s = sev.rsample(2000, generator=torch.Generator().manual_seed(2))
    assert (s > 0).all() and (s <= 10.0).all()
    clamped = s.detach() == 10.0
    assert clamped.sum() > 100  # about half the draws are at the bound
    s.sum().backward()
    # d min(s, 10) / d mu = s below the bound, 0 at it: the gradient counts the free draws only.
    assert sev.log_severity_mu.grad.item() == pytest.approx(
        s.detach()[~clamped].sum().item(), rel=1e-5
    )


@pytest.mark.parametrize("objective", ["minimize", "adversarial"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_batch", "per_sample"])
def test_views_give_no_gradient_beyond_the_bound(objective: str, per_sample: bool) -> None:
    """mu = log 20: every draw is 10, so no view-dependent loss may move mu (it used to: +-2.26)."""
    from augmix_gpu.augment.augmix import AugMixBatch

    sev = LearnableSeverity(3.0, objective=objective, per_sample=per_sample)
    _set(sev, math.log(20.0), 0.1)
    aug = AugMixBatch(severity=sev)
    x = natural_batch(4, 32)
    clean, v1, v2 = aug(x, generator=torch.Generator().manual_seed(0))
    assert (aug.last_severity == 10.0).all()
    # Any loss of the views: a weighted sum that depends on every pixel.
    w = torch.linspace(-1.0, 1.0, v1.numel()).view_as(v1)
    ((v1 * w).sum() + (v2 * w).square().sum()).backward()
    assert sev.log_severity_mu.grad.item() == 0.0
    assert sev.log_severity_log_sigma.grad.item() == 0.0
    # The same views as at s = 10 exactly: nothing beyond the bound reaches the ops.
    fixed = AugMixBatch(severity=10.0)
    g = torch.Generator().manual_seed(0)
    torch.randn((4,) if per_sample else (), generator=g)  # the severity draw comes first
    same = fixed.apply(x, fixed.sample_params(4, generator=g), 10.0)
    torch.testing.assert_close(same[1], v1.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(same[2], v2.detach(), rtol=0, atol=1e-6)


def test_statistics_never_exceed_the_bound() -> None:
    sev = LearnableSeverity(3.0, max_severity=10.0)
    for mu, sigma in [(math.log(20.0), 0.1), (math.log(9.0), 1.5), (math.log(100.0), 3.0)]:
        _set(sev, mu, sigma)
        sev.rsample(8, generator=torch.Generator().manual_seed(0))
        st = sev.stats()
        for key in ("severity_mean", "severity_median", "severity_last"):
            assert 0 < st[key] <= 10.0, (key, st)
    _set(sev, math.log(20.0), 0.1)
    assert sev.median_severity() == 10.0
    assert sev.mean_severity() == pytest.approx(10.0, abs=1e-9)


def test_rsample_gradient_is_reparameterised() -> None:
    sev = LearnableSeverity(3.0, initial_sigma=0.2)
    g = torch.Generator().manual_seed(3)
    s = sev.rsample(4, generator=g)
    eps = (s.detach().log() - sev.log_severity_mu.detach()) / 0.2
    s.backward()
    assert sev.log_severity_mu.grad.item() == pytest.approx(s.item(), rel=1e-5)
    assert sev.log_severity_log_sigma.grad.item() == pytest.approx(
        s.item() * 0.2 * eps.item(), rel=1e-4, abs=1e-6
    )


def test_adversarial_reverses_the_sample_gradient_not_the_kl() -> None:
    grads = {}
    for objective in ("minimize", "adversarial"):
        sev = LearnableSeverity(3.0, prior_severity_std=0.5, objective=objective)
        with torch.no_grad():
            sev.log_severity_mu.add_(0.3)
        s = sev.rsample(4, generator=torch.Generator().manual_seed(4))
        s.backward()
        grads[objective, "sample"] = sev.log_severity_mu.grad.item()
        sev.zero_grad()
        sev.kl().backward()
        grads[objective, "kl"] = sev.log_severity_mu.grad.item()
    assert grads["minimize", "sample"] > 0
    assert grads["adversarial", "sample"] == pytest.approx(-grads["minimize", "sample"])
    assert grads["minimize", "kl"] > 0
    assert grads["adversarial", "kl"] == pytest.approx(grads["minimize", "kl"])


def test_stats_and_mean() -> None:
    sev = LearnableSeverity(3.0, initial_sigma=0.4)
    st = sev.stats()
    assert set(st) >= {"severity_mu", "severity_sigma", "severity_mean", "severity_last"}
    assert math.isnan(st["severity_last"])
    assert sev.median_severity() == pytest.approx(3.0, rel=1e-6)
    assert st["severity_sigma"] == pytest.approx(0.4, rel=1e-6)
    s = sev.rsample(2, generator=torch.Generator().manual_seed(5))
    assert sev.stats()["severity_last"] == pytest.approx(s.item())


@pytest.mark.parametrize(("mu", "sigma"), [(math.log(3.0), 0.4), (math.log(8.0), 0.6), (2.6, 1.2)])
def test_mean_is_that_of_the_bounded_severity(mu: float, sigma: float) -> None:
    """E[min(S, 10)] against numerical integration of torch.distributions' log-normal density."""
    from scipy import integrate

    sev = LearnableSeverity(3.0, max_severity=10.0)
    _set(sev, mu, sigma)
    pdf = LogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))

    def density(x: float) -> float:
        return float(pdf.log_prob(torch.tensor(x, dtype=torch.float64)).exp())

    below = integrate.quad(lambda x: x * density(x), 0.0, 10.0, limit=200)[0]
    above = 10.0 * (1.0 - float(pdf.cdf(torch.tensor(10.0, dtype=torch.float64))))
    assert sev.mean_severity() == pytest.approx(below + above, rel=1e-5)
    if mu == math.log(3.0):  # far from the bound it is the log-normal mean
        assert sev.mean_severity() == pytest.approx(pdf.mean.item(), rel=2e-3)


def test_state_dict_round_trip() -> None:
    a = LearnableSeverity(3.0)
    _set(a, 0.7, 0.25)
    b = LearnableSeverity(3.0)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"log_severity_mu", "log_severity_log_sigma"}
    assert b.median_severity() == pytest.approx(math.exp(0.7), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"initial_aug_severity": 0.0},
            "initial_aug_severity must be a finite number > 0, got 0.0",
        ),
        ({"initial_aug_severity": -1.0}, "initial_aug_severity .* got -1.0"),
        (
            {"initial_aug_severity": 12.0},
            r"initial_aug_severity must be in \(0, max_severity=10.0\]",
        ),
        ({"prior_severity_std": 0.0}, "prior_severity_std must be a finite number > 0"),
        ({"prior_severity_std": -2.0}, "prior_severity_std .* got -2.0"),
        ({"initial_sigma": 0.0}, "initial_sigma must be a finite number > 0"),
        ({"max_severity": float("nan")}, "max_severity must be a finite number > 0"),
        (
            {"objective": "maximize"},
            r"objective must be one of \('minimize', 'adversarial', 'heldout'\)",
        ),
    ],
)
def test_bad_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnableSeverity(**kwargs)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        LearnableSeverity().rsample(0)


# ---------------------------------------------------------------------------------------------
# Gradients from the views to s, op by op: view = op(x, sign * op.parameter(0.1 + u * (s - 0.1)))
# ---------------------------------------------------------------------------------------------


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return natural_batch(n, size, seed).double() / 255.0


def _op_of_s(name: str, x: torch.Tensor, u: float, sign: float):
    op = OPS[name]

    def f(s: torch.Tensor) -> torch.Tensor:
        level = 0.1 + u * (s - 0.1)
        param = (sign if op.signed else 1.0) * op.parameter(level.expand(x.shape[0]))
        return op.apply(x, param)

    return f


def _ops_with(kind: str) -> list[str]:
    return [name for name, op in OPS.items() if op.gradient == kind]


def test_gradient_kinds_cover_the_table() -> None:
    assert set(_ops_with("exact")) == {
        "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
        "color", "contrast", "brightness", "sharpness",
    }  # fmt: skip
    assert set(_ops_with("straight_through")) == {"posterize", "solarize"}
    assert set(_ops_with("none")) == {"autocontrast", "equalize"}
    assert len(OPS) == 13


@pytest.mark.parametrize("name", _ops_with("exact"))
@pytest.mark.parametrize(("s0", "u", "sign"), [(3.0, 0.7, 1.0), (6.5, 0.35, -1.0)])
def test_exact_ops_gradcheck_in_s(name: str, s0: float, u: float, sign: float) -> None:
    x = _images(2, 12, seed=11)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    f = _op_of_s(name, x, u, sign)
    out = f(s)
    # The view must actually move with s, or gradcheck would pass trivially.
    (g,) = torch.autograd.grad(out.sum(), s)
    assert g.abs().item() > 1e-3
    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", _ops_with("none"))
def test_magnitude_free_ops_do_not_depend_on_s(name: str) -> None:
    x = _images(2, 12)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    out = _op_of_s(name, x, 0.5, 1.0)(s)
    assert not out.requires_grad


@pytest.mark.parametrize("name", _ops_with("straight_through"))
def test_straight_through_ops_follow_finite_differences_on_average(name: str) -> None:
    """Over many (image, level) pairs the surrogate gradient of a random linear read-out of the
    view is finite and has the sign of a central finite difference (step 0.5 in s) on average."""
    g = torch.Generator().manual_seed(0)
    x = _images(24, 16, seed=100)
    agree, total, corr_num = 0, 0, 0.0
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        w = torch.rand(xi.shape, generator=g, dtype=torch.float64) + 0.5  # positive read-out
        for s0 in (1.0, 2.5, 4.0, 5.5, 7.0, 8.5):
            u = 0.5 + 0.5 * torch.rand((), generator=g).item()
            f = _op_of_s(name, xi, u, 1.0)
            s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad((w * f(s)).sum(), s)
            assert torch.isfinite(grad)
            with torch.no_grad():
                fd = ((w * f(s + 0.5)).sum() - (w * f(s - 0.5)).sum()) / 1.0
            if fd.abs() < 1e-9:
                continue
            total += 1
            agree += int(torch.sign(grad) == torch.sign(fd))
            corr_num += (grad * fd).item()
    assert total > 72  # most pairs move (a threshold above every pixel does not)
    assert agree / total > 0.8, (
        f"{name}: gradient sign agrees with finite differences {agree}/{total}"
    )
    assert corr_num > 0
