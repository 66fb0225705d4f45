"""The bounds of the CUDA tests, held on the CPU: what they let through and what they catch.

AugMix on CUDA against the CPU (test_cuda.py) may differ in the last bit of the sampler's
coordinates; that must stay inside its bound, and a real difference (one sample of 16 drawn
otherwise) must fall far outside it. The sampler is made to round differently here by moving
every coordinate 1 ulp down: such a flip is rare (on these 32 draws one pixel moves by 0.028, in
one draw), so the draws are many.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import natural_batch
from test_cuda import ATOL, MAX_OUTSIDE, share_outside

from augmix_gpu.augment.augmix import AugMixBatch

SEEDS = range(32)


def _ulp_sampler(monkeypatch) -> None:
    real = F.grid_sample

    def one_ulp_lower(x, grid, **kw):
        return real(x, torch.nextafter(grid, torch.full_like(grid, -2.0)), **kw)

    monkeypatch.setattr(F, "grid_sample", one_ulp_lower)


@pytest.mark.parametrize("strategy", ["grouped", "static"])
def test_a_last_bit_sampler_difference_stays_inside_the_bound(strategy, monkeypatch):
    """Over 32 draws some pixels do flip by more than ATOL (an every-element test would fail),
    but far fewer than MAX_OUTSIDE of them."""
    aug = AugMixBatch(severity=3.0, strategy=strategy)
    worst_share, worst_diff = 0.0, 0.0
    for seed in SEEDS:
        x = natural_batch(16, 64, seed=seed)
        params = aug.sample_params(16, generator=torch.Generator().manual_seed(seed))
        exact = aug.apply(x, params, 3.0)
        with monkeypatch.context() as m:
            _ulp_sampler(m)
            rounded = aug.apply(x, params, 3.0)
        for a, b in zip(exact, rounded):
            worst_share = max(worst_share, share_outside(a, b))
            worst_diff = max(worst_diff, float((a - b).abs().max()))
    assert worst_diff > ATOL, "no flip: the proxy no longer shows what the bound is for"
    assert worst_share < MAX_OUTSIDE / 20, worst_share


def test_one_sample_drawn_otherwise_falls_far_outside_the_bound():
    aug = AugMixBatch(severity=3.0, strategy="static")
    x = natural_batch(16, 64)
    params = aug.sample_params(16, generator=torch.Generator().manual_seed(0))
    other = aug.sample_params(16, generator=torch.Generator().manual_seed(1))
    ops = params.ops.clone()
    ops[..., 0] = other.ops[..., 0]  # sample 0's chains use other ops
    wrong = aug.apply(x, dataclasses.replace(params, ops=ops), 3.0)
    views = list(zip(aug.apply(x, params, 3.0), wrong))[1:]  # the clean view is unchanged
    assert min(share_outside(a, b) for a, b in views) > 10 * MAX_OUTSIDE
