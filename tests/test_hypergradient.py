"""The held-out objective's hypergradient: the update Jacobian of each optimiser, the DARTS finite
difference against a finite difference of the whole lookahead, side effects, and ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import natural_batch
from torch import nn

from augmix_gpu.augment.augmix import AugMixBatch
from augmix_gpu.augment.losses import augmix_objective
from augmix_gpu.augment.severity import LearnableSeverity
from augmix_gpu.distributed import DistEnv, start_process_group
from augmix_gpu.models import TinyResNet
from augmix_gpu.train.hyper_passes import HeldoutBatch
from augmix_gpu.train.lookahead import (
    mixed_derivative,
    paired_hypergradient,
    severity_hypergradient,
    update_jacobian,
)
from augmix_gpu.train.step import AugmentedClassifier

pytestmark = pytest.mark.usefixtures("one_thread")
SINGLE = DistEnv(0, 0, 1, torch.device("cpu"), None)
CLASSES, B, H, SIZE = 5, 6, 8, 24


# --------------------------------------------------------------------------------------------
# update_jacobian: d(update)/d(gradient) against the optimiser's own step
# --------------------------------------------------------------------------------------------


def _measured_jacobian(make_opt, warmup: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(formula, finite difference of two real steps) for every element of one parameter."""
    torch.manual_seed(seed)
    start = torch.randn(7, dtype=torch.float64)
    history = [torch.randn(7, dtype=torch.float64) for _ in range(warmup)]
    g = torch.randn(7, dtype=torch.float64)

    def run(grad_last: torch.Tensor):
        p = nn.Parameter(start.clone())
        opt = make_opt([p])
        for h in [*history, grad_last]:
            p.grad = h.clone()
            opt.step()
        return p.detach(), opt, p

    base, opt, p = run(g)
    delta = 1e-6
    fd = torch.empty(7, dtype=torch.float64)
    for i in range(7):
        gp, gm = g.clone(), g.clone()
        gp[i] += delta
        gm[i] -= delta
        fd[i] = (run(gp)[0][i] - run(gm)[0][i]) / (2 * delta)
    j = update_jacobian(opt)[p]
    return torch.as_tensor(j, dtype=torch.float64).expand(7), fd


@pytest.mark.parametrize(
    ("name", "make_opt", "rtol"),
    [
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1), 1e-6),
        ("sgd_momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1e-6),
        (
            "sgd_nesterov",
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
            1e-6,
        ),
        # Adam's second moment also moves with the gradient (relative effect ~ (1 - beta2) /
        # (1 - beta2^t) * g^2 / v ~ 0.3 % after 500 steps); the Jacobian holds it fixed.
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.05), 0.03),
        ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2), 0.03),
    ],
)
def test_update_jacobian_matches_the_optimiser_step(name, make_opt, rtol) -> None:
    j, fd = _measured_jacobian(make_opt, warmup=500)
    torch.testing.assert_close(j, fd, rtol=rtol, atol=1e-12)


def test_update_jacobian_refuses_other_optimisers() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="needs SGD, Adam or AdamW.*RMSprop"):
        update_jacobian(torch.optim.RMSprop([p]))


# --------------------------------------------------------------------------------------------
# The hypergradient against a finite difference of L_val(w - lr grad L_train(w, s(mu)))
# --------------------------------------------------------------------------------------------


def _tiny_net(batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, 2, 1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.Tanh(), nn.Conv2d(6, 6, 3, 2, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1)]
    layers += [nn.Flatten(), nn.Linear(6, CLASSES)]
    return nn.Sequential(*layers)


def _setup(batchnorm: bool = False, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    sev = LearnableSeverity(3.0, objective="heldout", initial_sigma=0.2)
    aug = AugMixBatch(severity=sev)
    net = AugmentedClassifier(_tiny_net(batchnorm), "learnable_augmix_jsd", aug).to(dtype)
    x = natural_batch(B, SIZE, seed=seed).to(dtype) / 255.0
    y = torch.arange(B) % CLASSES
    xh = natural_batch(H, SIZE, seed=seed + 100).to(dtype) / 255.0
    xh = (xh - 0.45) / 0.25
    yh = (torch.arange(H) * 3) % CLASSES
    valid = torch.ones(H, dtype=torch.bool)
    valid[-1] = False  # a padding slot: must not count
    return net, sev, x, y, xh, yh, valid


def _train_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return augmix_objective(logits, y, jsd=True, beta_jsd=12.0).total


def _smooth_views(net, sev, x, mu: float, grad: bool) -> torch.Tensor:
    """AugMix views whose dependence on s is smooth and exactly differentiated: the same draws as
    always, except that the ops whose backward is a surrogate (posterize, solarize: piecewise
    constant in s; autocontrast, equalize: their stretch and lookup table held constant) are
    replaced by rotate, so that a finite difference in mu measures what autograd computes."""
    aug = net.augmenter
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sev.log_severity_mu.fill_(mu)
    with torch.set_grad_enabled(grad):
        s = sev.rsample(B, generator=g)
        params = aug.sample_params(B, generator=g)
        names = aug.op_names
        for name in ("posterize", "solarize", "autocontrast", "equalize"):
            params.ops[params.ops == names.index(name)] = names.index("rotate")
        return torch.cat(aug.apply(x, params, s))


def _lookahead_difference(model, views_of, y, xh, yh, valid, mu0, d, *, fixed_length, lr):
    """(L_val(w + a(mu0 + d)) - L_val(w + a(mu0 - d))) / 2d by brute force, a(mu) = -lr grad_w
    L_train(w, views_of(mu)) the SGD step (rescaled to |a(mu0)| with ``fixed_length``); the
    model's weights are left at w."""
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def step(mu: float) -> list[torch.Tensor]:
        views = views_of(mu)
        model.load_state_dict(w0)
        grads = torch.autograd.grad(_train_loss(model(views), y), list(model.parameters()))
        return [-lr * g for g in grads]  # the SGD step a(mu) = J g(w, mu)

    length = math.sqrt(sum(float((t**2).sum()) for t in step(mu0)))

    def lookahead_loss(mu: float) -> float:
        """The step's direction follows mu, its length is held at the actual one (module doc)."""
        a = step(mu)
        scale = length / math.sqrt(sum(float((t**2).sum()) for t in a)) if fixed_length else 1.0
        state = {n: p.detach() + scale * t for (n, p), t in zip(model.named_parameters(), a)}
        logits = torch.func.functional_call(model, state, (xh,))
        ce = nn.functional.cross_entropy(logits, yh, reduction="none")
        return float((ce * valid).sum() / valid.sum())

    out = (lookahead_loss(mu0 + d) - lookahead_loss(mu0 - d)) / (2 * d)
    model.load_state_dict(w0)
    return out


@pytest.mark.parametrize("fixed_length", [True, False])
def test_hypergradient_matches_a_finite_difference_of_the_lookahead(fixed_length: bool) -> None:
    """d/dmu of L_val(w + |a| a(mu)/|a(mu)|), a(mu) = -lr grad_w L_train(w, views(mu)), float64;
    with the length free, of L_val(w + a(mu))."""
    net, sev, x, y, xh, yh, valid = _setup()
    model = net.model
    lr = 1e-2
    mu0 = sev.log_severity_mu.item()
    expected = _lookahead_difference(
        model, lambda mu: _smooth_views(net, sev, x, mu, grad=False), y, xh, yh, valid, mu0,
        1e-4, fixed_length=fixed_length, lr=lr,
    )  # fmt: skip

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    views = _smooth_views(net, sev, x, mu0, grad=True)
    opt.zero_grad()
    _train_loss(net.classify(views.detach()), y).backward()
    opt.step()
    result = severity_hypergradient(
        net,
        opt,
        views,
        y,
        HeldoutBatch(xh, yh, valid),
        SINGLE,
        beta_jsd=12.0,
        fixed_length=fixed_length,
    )
    assert result.finite
    assert abs(expected) > 1e-7, "degenerate check: the lookahead does not depend on mu"
    # Evaluated around w' instead of w (an O(lr) difference, ~0.2 % here); and pixels that cross
    # a warp's fill boundary jump, which the finite difference sees and autograd does not (~1 %).
    assert result.grad_mu == pytest.approx(expected, rel=0.03)
    assert math.isfinite(result.grad_log_sigma)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(model(xh), yh, reduction="none")
    assert result.heldout_loss == pytest.approx(float((ce * valid).sum() / valid.sum()), rel=1e-6)


@pytest.mark.parametrize("fixed_length", [True, False])
def test_paired_estimator_is_the_wide_difference_of_the_lookahead(fixed_length: bool) -> None:
    """(L_val(w'(mu + d)) - L_val(w'(mu - d))) / 2d with d = 0.5, brute force: every op as
    drawn (posterize, solarize, autocontrast, equalize too: no derivative is taken), the
    severity s = exp(mu + sigma eps) for one eps; the estimator renders the step's draws again."""
    net, sev, x, y, xh, yh, valid = _setup()
    model, aug = net.model, net.augmenter
    lr, d = 1e-2, 0.5
    mu0, sigma = sev.log_severity_mu.item(), float(sev.log_severity_log_sigma.detach().exp())
    g = torch.Generator().manual_seed(4)
    draws = aug.sample_params(B, generator=g)
    eps = torch.randn((), generator=g, dtype=torch.float64)
    names = aug.op_names
    assert all((draws.ops == names.index(n)).any() for n in ("posterize", "solarize"))

    def severity(mu: float) -> torch.Tensor:
        return torch.exp(mu + sigma * eps)

    expected = _lookahead_difference(
        model, lambda mu: torch.cat(aug.apply(x, draws, severity(mu))), y, xh, yh, valid, mu0, d,
        fixed_length=fixed_length, lr=lr,
    )  # fmt: skip

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    _train_loss(model(torch.cat(aug.apply(x, draws, severity(mu0)))), y).backward()
    opt.step()
    result = paired_hypergradient(
        net, opt, x, draws, severity(mu0), y, HeldoutBatch(xh, yh, valid), SINGLE, beta_jsd=12.0,
        fixed_length=fixed_length, log_step=d,
    )  # fmt: skip
    assert result.finite
    assert abs(expected) > 1e-6, "degenerate check: the lookahead does not depend on mu"
    # Gradients taken around w' instead of w: an O(lr) difference, as for the pathwise estimator.
    assert result.grad_mu == pytest.approx(expected, rel=0.03)
    assert result.grad_log_sigma == pytest.approx(expected * sigma * float(eps), rel=0.03)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(model(xh), yh, reduction="none")
    assert result.heldout_loss == pytest.approx(float((ce * valid).sum() / valid.sum()), rel=1e-6)


def test_paired_and_pathwise_agree_for_a_small_step_on_smooth_views() -> None:
    """Where the ops are smooth in s (the pathwise test's views), the pair's slope over a small
    log-step is the pathwise derivative: two computations, one quantity."""
    net, sev, x, y, xh, yh, valid = _setup()
    model, aug = net.model, net.augmenter
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    views = _smooth_views(net, sev, x, sev.log_severity_mu.item(), grad=True)
    opt.zero_grad()
    _train_loss(net.classify(views.detach()), y).backward()
    opt.step()
    pathwise = severity_hypergradient(
        net, opt, views, y, HeldoutBatch(xh, yh, valid), SINGLE, beta_jsd=12.0
    )
    # the same draws as _smooth_views (same generator), the surrogate ops replaced the same way
    g = torch.Generator().manual_seed(0)
    s = sev.rsample(B, generator=g).detach()
    draws = aug.sample_params(B, generator=g)
    names = aug.op_names
    for name in ("posterize", "solarize", "autocontrast", "equalize"):
        draws.ops[draws.ops == names.index(name)] = names.index("rotate")
    paired = paired_hypergradient(
        net, opt, x, draws, s, y, HeldoutBatch(xh, yh, valid), SINGLE, beta_jsd=12.0, log_step=1e-4
    )
    assert abs(float(pathwise.grad_mu)) > 1e-7
    assert paired.grad_mu == pytest.approx(float(pathwise.grad_mu), rel=0.03)
    assert paired.grad_log_sigma == pytest.approx(float(pathwise.grad_log_sigma), rel=0.03)


def test_hypergradient_changes_nothing() -> None:
    """Weights, BatchNorm statistics, the network's and the severity's .grad are left as they were
    (the updater writes the severity's gradient, from the mean of its cycle's lookaheads)."""
    net, sev, x, y, xh, yh, valid = _setup(batchnorm=True, dtype=torch.float32)
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-3)
    views = net.views(x, torch.Generator().manual_seed(1), severity_grad=True)
    opt.zero_grad()
    _train_loss(net.classify(views.detach()), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    grads = [p.grad.clone() for p in net.model.parameters()]
    net.model.train()
    result = severity_hypergradient(
        net, opt, views, y, HeldoutBatch(xh, yh, valid), SINGLE, beta_jsd=12.0
    )
    assert result.finite and net.model.training
    after = net.model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for g, p in zip(grads, net.model.parameters()):
        assert torch.equal(g, p.grad)
    assert sev.log_severity_mu.grad is None and result.grad_mu.item() != 0.0


# --------------------------------------------------------------------------------------------
# Two ranks (gloo): the sharded computation equals the single-process one on the whole batch
# --------------------------------------------------------------------------------------------


def _hyper_on(rank: int, world: int):
    """Each rank takes its slice of one batch (and of the held-out batch); world 1 takes all."""
    net, sev, x, y, xh, yh, valid = _setup()
    opt = torch.optim.SGD(net.model.parameters(), lr=0.01, momentum=0.9)
    full = net.views(x, torch.Generator().manual_seed(2), severity_grad=True)  # [3B]
    b, h = B // world, H // world
    rows = torch.cat([torch.arange(i * B + rank * b, i * B + (rank + 1) * b) for i in range(3)])
    views = full.index_select(0, rows)
    sl, slh = slice(rank * b, (rank + 1) * b), slice(rank * h, (rank + 1) * h)
    env = DistEnv(rank, rank, world, torch.device("cpu"), "gloo" if world > 1 else None)
    _train_loss(net.classify(views.detach()), y[sl]).backward()  # the step's gradient, as DDP
    for p in net.model.parameters():  # would leave it: averaged over ranks
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world
    result = severity_hypergradient(
        net, opt, views, y[sl], HeldoutBatch(xh[slh], yh[slh], valid[slh]), env, beta_jsd=12.0
    )
    return result, sev.log_severity_mu.item()


def _worker(rank: int, world: int, init: str, queue) -> None:
    torch.set_num_threads(1)
    start_process_group(backend="gloo", init_method=init, rank=rank, world_size=world)
    try:
        result, mu = _hyper_on(rank, world)
        values = (result.grad_mu, result.grad_log_sigma, result.heldout_loss)
        queue.put((rank, *(float(v) for v in values), mu))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_with_one_process(tmp_path) -> None:
    single, _ = _hyper_on(0, 1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, queue), nprocs=2, join=True)
    got = sorted(queue.get(timeout=60) for _ in range(2))
    for _rank, grad_mu, grad_log_sigma, loss, _mu in got:
        assert grad_mu == pytest.approx(float(single.grad_mu), rel=1e-6)
        assert grad_log_sigma == pytest.approx(float(single.grad_log_sigma), rel=1e-6, abs=1e-12)
        assert loss == pytest.approx(float(single.heldout_loss), rel=1e-6)
    assert got[0][1:] == got[1][1:], "ranks must end with the same severity gradient"


# --------------------------------------------------------------------------------------------
# The exact mixed derivative on a ReLU + max-pool network, against an independent float64
# reference; the same under bf16 autocast
# --------------------------------------------------------------------------------------------


def _relu_setup(dtype=torch.float64, seed: int = 0):
    """A small tiny_resnet (ReLU, max-pools, BatchNorm) after a few AdamW steps, its step taken."""
    torch.manual_seed(seed)
    sev = LearnableSeverity(3.0, objective="heldout", initial_sigma=0.2)
    model = TinyResNet(CLASSES, widths=(4, 8, 8, 8))
    net = AugmentedClassifier(model, "learnable_augmix_jsd", AugMixBatch(severity=sev)).to(dtype)
    x = natural_batch(4, 32, seed=seed).to(dtype) / 255.0
    y = torch.arange(4) % CLASSES
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):  # move off the initialisation: kinks where the trained network has them
        views = net.views(x, g, severity_grad=True)
        opt.zero_grad()
        _train_loss(net.classify(views.detach()), y).backward()
        opt.step()
    return net, opt, views, x, y


def _double_backward_reference(model: nn.Module, c: list, x: torch.Tensor, y) -> torch.Tensor:
    """d/dx [c^T grad_w L(w, x)] by plain autograd twice in reverse mode: the weight gradient with
    its graph kept, its dot product with c, a second backward to x (BatchNorm in train mode on
    copies of its buffers). The code under test differentiates the input gradient by forward mode
    along c (torch.func.jvp): other rules for every op; they agree where the mixed partials
    commute, i.e. away from the kinks."""
    x = x.detach().requires_grad_(True)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = list(model.parameters())
    loss = _train_loss(torch.func.functional_call(model, buffers, (x,)), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, c)), x)[0]


def _weight_gradient_along(model: nn.Module, c: list, x: torch.Tensor, y) -> float:
    """c^T grad_w L(w, x), first-order autograd only (for a finite difference in x)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = _train_loss(torch.func.functional_call(model, buffers, (x,)), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(sum((g * t).sum() for g, t in zip(grads, c)))


def test_mixed_derivative_equals_independent_references_on_a_relu_maxpool_net() -> None:
    """float64, tiny_resnet's ReLU + max-pool + BatchNorm: forward over reverse (the code) equals
    reverse over reverse to 1e-9, and a central difference in the input along a random direction
    (first-order gradients only, steps of 1e-6: too small to cross a kink in float64) to 1e-6.
    BatchNorm's running statistics are left as they were."""
    net, _, views, _, y = _relu_setup()
    net.model.train()
    named = list(net.model.named_parameters())
    torch.manual_seed(1)
    c = [torch.randn_like(p) for _, p in named]
    buffers = {k: b.clone() for k, b in net.model.named_buffers()}
    got = mixed_derivative(net, named, c, views, y, 12.0)
    for k, b in net.model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    expected = _double_backward_reference(net.model, c, views, y)
    assert expected.abs().max() > 1e-6, "degenerate check: the reference is zero"
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max())
    r, h, x = torch.randn_like(views), 1e-6, views.detach()
    fd = (_weight_gradient_along(net.model, c, x + h * r, y)
          - _weight_gradient_along(net.model, c, x - h * r, y)) / (2 * h)  # fmt: skip
    assert float((got * r).sum()) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_hypergradient_under_bf16_autocast_equals_fp32(seed: int) -> None:
    """A bf16 run's hypergradient. (1) The same step, the network under bf16 autocast: the fp32
    value to float32 rounding (autocast is off inside; left on, the double backward runs in bf16
    and moves it by ~20 %). (2) The step's own gradient also taken under bf16 autocast, as a bf16
    run takes it: that gradient differs from fp32's by 11-15 % (relative norm, this small
    network), and the lookahead it sets moves the hypergradient by 0-40 % (ratio 0.60-1.36 over
    seeds 0-7, the median 1.0): the same sign and size, within 50 %. A bf16 run's severity follows
    a noisier hypergradient, not a biased one."""
    net, opt, _, x, y = _relu_setup(dtype=torch.float32, seed=seed)
    xh = (natural_batch(H, 32, seed=seed + 100).float() / 255.0 - 0.45) / 0.25
    yh, valid = (torch.arange(H) * 3) % CLASSES, torch.ones(H, dtype=torch.bool)
    buffers = {k: b.clone() for k, b in net.model.named_buffers()}

    def views() -> torch.Tensor:
        return net.views(x, torch.Generator().manual_seed(7), severity_grad=True)

    def step_gradient(amp_dtype) -> None:
        """The step's gradient on views(), BatchNorm's statistics left as they were."""
        net.amp_dtype = amp_dtype
        opt.zero_grad()
        _train_loss(net.classify(views().detach()).float(), y).backward()
        net.model.load_state_dict(buffers, strict=False)

    def hyper(amp_dtype) -> tuple[float, float, float]:
        net.amp_dtype = amp_dtype
        r = severity_hypergradient(
            net, opt, views(), y, HeldoutBatch(xh, yh, valid), SINGLE, beta_jsd=12.0
        )
        return float(r.grad_mu), float(r.grad_log_sigma), float(r.heldout_loss)

    step_gradient(None)
    fp32 = hyper(None)
    assert abs(fp32[0]) > 1e-6, "degenerate check"
    assert hyper(torch.bfloat16) == pytest.approx(fp32, rel=1e-6, abs=1e-9)
    step_gradient(torch.bfloat16)
    assert hyper(torch.bfloat16)[0] == pytest.approx(fp32[0], rel=0.5)  # same sign, same size


# --------------------------------------------------------------------------------------------
# The updater: lookaheads averaged per update, their held-out batches, a resume mid-cycle; the
# per-epoch signal-to-noise
# --------------------------------------------------------------------------------------------


class _HeldoutBatches:
    """A held-out loader stand-in: batch k is fixed images of its own; records which were taken."""

    def __init__(self, count: int) -> None:
        self.count, self.taken = count, []

    def __len__(self) -> int:
        return self.count

    def images(self, k: int):
        return natural_batch(H, SIZE, seed=200 + k), (torch.arange(H) + k) % CLASSES

    def epoch(self, epoch: int, start_step: int = 0):
        for k in range(start_step, self.count):
            self.taken.append(epoch * self.count + k)
            images, labels = self.images(epoch * self.count + k)
            yield images, labels, torch.ones(H, dtype=torch.bool)


def test_updater_averages_its_lookaheads_and_resumes_mid_cycle() -> None:
    """every 4, 3 lookaheads: steps 1, 2, 3 (and 5, 6, 7) each take the next held-out batch; the
    update at 3 (and 7) moves mu along the mean of the three hypergradients, each computed here
    on its own; an updater rebuilt from the state after step 5 ends as the first would have."""
    from augmix_gpu.augment.augmix import normalize_images
    from augmix_gpu.train.heldout_severity import HeldoutSeverityUpdater

    net, sev, x, y, *_ = _setup(dtype=torch.float32)
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05)
    loader = _HeldoutBatches(count=5)  # 5 batches: the cycle wraps into the loader's epoch 1
    updater = HeldoutSeverityUpdater(net, loader, SINGLE, every=4, lr=0.05, beta_jsd=12.0,
                                     lookaheads=3)  # fmt: skip
    views = lambda step: net.views(x, torch.Generator().manual_seed(step), severity_grad=True)  # noqa: E731
    expected, got, mus = [], {}, {}
    for step in range(8):
        opt.zero_grad()
        _train_loss(net.classify(views(step).detach()), y).backward()
        opt.step()
        if not updater.due(step):
            continue
        xh, yh = loader.images(len(expected))
        held = HeldoutBatch(normalize_images(xh), yh, torch.ones(H, dtype=torch.bool))
        r = severity_hypergradient(net, opt, views(step), y, held, SINGLE, beta_jsd=12.0)
        expected.append(float(r.grad_mu))
        if step == 6:  # a resume between two lookaheads of one cycle
            state = updater.state_dict()
            updater = HeldoutSeverityUpdater(net, loader, SINGLE, every=4, lr=0.05,
                                             beta_jsd=12.0, lookaheads=3)  # fmt: skip
            updater.load_state_dict(state)
        got[step] = updater.update(opt, views(step), y, step)
        mus[step] = sev.log_severity_mu.item()
    assert sorted(got) == [1, 2, 3, 5, 6, 7]
    assert loader.taken == [0, 1, 2, 3, 4, 5]
    assert [got[s] for s in (1, 2, 5, 6)] == [{}] * 4
    for last, first in ((3, 0), (7, 3)):
        mean = sum(expected[first : first + 3]) / 3
        assert float(got[last]["hypergrad_mu"]) == pytest.approx(mean, rel=1e-5)
    # Adam's first step is lr g / (|g| + eps) (about lr * sign(g)): mu moved against the mean
    g = sum(expected[:3]) / 3
    assert mus[3] - mus[2] == pytest.approx(-0.05 * g / (abs(g) + 1e-8), rel=1e-3)
    assert mus[7] != mus[6]


def test_updater_refuses_more_lookaheads_than_steps() -> None:
    from augmix_gpu.train.heldout_severity import HeldoutSeverityUpdater

    net, *_ = _setup(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lookaheads must be in 1..every \(4\), got 5"):
        HeldoutSeverityUpdater(net, _HeldoutBatches(1), SINGLE, every=4, lr=0.1, beta_jsd=12.0,
                               lookaheads=5)  # fmt: skip


def test_hypergradient_snr_is_mean_over_standard_error() -> None:
    """One epoch's updates only (after its first step), against scipy's standard error."""
    from scipy import stats

    from augmix_gpu.train.heldout_severity import hypergradient_snr

    values = [0.3, -0.1, 0.5, 0.2, 0.4]
    traj = [{"step": 3, "hypergrad_mu": 9.0}]  # the previous epoch's: left out
    traj += [{"step": 10 + i, "severity_mu": 0.0} for i in range(3)]  # steps without an update
    traj += [{"step": 20 + i, "hypergrad_mu": v} for i, v in enumerate(values)]
    out = hypergradient_snr(traj, after_step=5)
    assert out["hypergrad_updates"] == 5
    assert out["hypergrad_mu_mean"] == pytest.approx(0.26)
    assert out["hypergrad_mu_se"] == pytest.approx(stats.sem(values))
    assert out["hypergrad_snr"] == pytest.approx(0.26 / stats.sem(values))
    assert hypergradient_snr(traj[:2], after_step=0)["hypergrad_snr"] is None
