"""JSD consistency loss and the AugMix objective against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from augmix_gpu.augment.losses import augmix_objective, jsd_loss


def _textbook_js(z0: np.ndarray, z1: np.ndarray, z2: np.ndarray) -> float:
    """JS(p0; p1; p2) = H(M) - mean_i H(p_i), averaged over the batch (float64 numpy)."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def entropy(p: np.ndarray) -> np.ndarray:
        return -(p * np.log(p)).sum(axis=1)

    ps = [softmax(z.astype(np.float64)) for z in (z0, z1, z2)]
    m = sum(ps) / 3.0
    return float(np.mean(entropy(m) - sum(entropy(p) for p in ps) / 3.0))


def _official_js(z0: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The official google-research/augmix formulation (probability space, clamp 1e-7)."""
    p = [F.softmax(z, dim=1) for z in (z0, z1, z2)]
    log_m = torch.clamp((p[0] + p[1] + p[2]) / 3.0, 1e-7, 1).log()
    return sum(F.kl_div(log_m, pi, reduction="batchmean") for pi in p) / 3.0


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(16, 10, generator=g, dtype=torch.float64) * 3 for _ in range(3))


def test_zero_for_identical_inputs() -> None:
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(1)) * 5
    assert jsd_loss(z, z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_matches_textbook_and_official(logits) -> None:
    z0, z1, z2 = logits
    got = jsd_loss(z0, z1, z2).item()
    assert got == pytest.approx(_textbook_js(z0.numpy(), z1.numpy(), z2.numpy()), rel=1e-5)
    assert got == pytest.approx(_official_js(z0, z1, z2).item(), rel=1e-5)


def test_not_the_reversed_kl(logits) -> None:
    # The reference learnable script computed KL(M || p_i); it must differ from ours.
    z0, z1, z2 = logits
    p = [F.softmax(z, dim=1) for z in (z0, z1, z2)]
    m = sum(p) / 3
    reversed_kl = sum((m * (m.log() - pi.log())).sum(1).mean() for pi in p) / 3
    assert abs(jsd_loss(z0, z1, z2).item() - reversed_kl.item()) > 1e-3


def test_bounded_by_log3() -> None:
    # One-hot-like, pairwise-disjoint predictions reach the bound log 3.
    z = torch.full((3, 4, 3), -1e4)
    for i in range(3):
        z[i, :, i] = 1e4
    value = jsd_loss(z[0], z[1], z[2]).item()
    assert value == pytest.approx(math.log(3), rel=1e-6)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        zs = [torch.randn(32, 5, generator=g) * 20 for _ in range(3)]
        assert 0.0 <= jsd_loss(*zs).item() <= math.log(3) + 1e-6


def test_symmetric_in_augmented_views(logits) -> None:
    z0, z1, z2 = logits
    assert jsd_loss(z0, z1, z2).item() == pytest.approx(jsd_loss(z0, z2, z1).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saturated_low_precision_logits_are_finite(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    zs = [
        (torch.randint(0, 2, (8, 10), generator=g).float() * 2e4 - 1e4).to(dtype).requires_grad_()
        for _ in range(3)
    ]
    value = jsd_loss(*zs)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    value.backward()
    for z in zs:
        assert z.grad is not None and torch.isfinite(z.grad.float()).all()


def test_fp32_under_autocast() -> None:
    zs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ref = jsd_loss(*zs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = jsd_loss(*[z.to(torch.bfloat16) for z in zs])
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs (rel 2^-8) separates the two.
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


def test_gradcheck() -> None:
    zs = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(jsd_loss, zs)


def test_objective_jsd_parts(logits) -> None:
    z0, z1, z2 = logits
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    parts = augmix_objective(torch.cat([z0, z1, z2]), y, jsd=True, beta_jsd=12.0)
    ce = F.cross_entropy(z0, y)
    assert parts.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts.jsd.item() == pytest.approx(
        _textbook_js(z0.numpy(), z1.numpy(), z2.numpy()), rel=1e-5
    )
    assert parts.total.item() == pytest.approx(ce.item() + 12 * parts.jsd.item(), rel=1e-5)
    assert parts.kl.item() == 0.0


def test_objective_without_jsd_and_with_kl() -> None:
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    kl = torch.tensor(2.5)
    parts = augmix_objective(z, y, jsd=False, kl=kl, beta_augmenter_reg=0.5, kl_scale=1 / 6)
    ce = F.cross_entropy(z, y).item()
    assert parts.jsd.item() == 0.0
    assert parts.kl.item() == pytest.approx(2.5)
    assert parts.total.item() == pytest.approx(ce + 0.5 * 2.5 / 6, rel=1e-6)


@pytest.mark.parametrize(
    ("shapes", "jsd", "match"),
    [
        (((9, 5), (4,)), True, "12 rows for 4 targets"),
        (((4, 5), (3,)), False, "one row of logits per target"),
        (((4, 5, 1), (4,)), False, r"\[N, classes\]"),
    ],
)
def test_objective_bad_shapes(shapes, jsd: bool, match: str) -> None:
    z = torch.zeros(shapes[0])
    y = torch.zeros(shapes[1], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        augmix_objective(z, y, jsd=jsd)


def test_jsd_bad_shapes() -> None:
    with pytest.raises(ValueError, match="share one shape"):
        jsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, classes\]"):
        jsd_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3))
