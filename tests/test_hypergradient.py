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
from augmix_gpu.distributed import DistEnv
from augmix_gpu.train.heldout_severity import severity_hypergradient, update_jacobian
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


def test_hypergradient_matches_a_finite_difference_of_the_lookahead() -> None:
    """d/dmu of L_val(w + |a| a(mu)/|a(mu)|), a(mu) = -lr grad_w L_train(w, views(mu)), float64."""
    net, sev, x, y, xh, yh, valid = _setup()
    model = net.model
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 1e-2
    mu0 = sev.log_severity_mu.item()

    def step(mu: float) -> list[torch.Tensor]:
        views = _smooth_views(net, sev, x, mu, grad=False)
        model.load_state_dict(w0)
        grads = torch.autograd.grad(_train_loss(model(views), y), list(model.parameters()))
        return [-lr * g for g in grads]  # the SGD step a(mu) = J g(w, mu)

    length = math.sqrt(sum(float((t**2).sum()) for t in step(mu0)))

    def lookahead_loss(mu: float) -> float:
        """The step's direction follows mu, its length is held at the actual one (module doc)."""
        a = step(mu)
        scale = length / math.sqrt(sum(float((t**2).sum()) for t in a))
        state = {n: p.detach() + scale * t for (n, p), t in zip(model.named_parameters(), a)}
        logits = torch.func.functional_call(model, state, (xh,))
        ce = nn.functional.cross_entropy(logits, yh, reduction="none")
        return float((ce * valid).sum() / valid.sum())

    delta = 1e-4
    expected = (lookahead_loss(mu0 + delta) - lookahead_loss(mu0 - delta)) / (2 * delta)

    model.load_state_dict(w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    views = _smooth_views(net, sev, x, mu0, grad=True)
    opt.zero_grad()
    _train_loss(net.classify(views.detach()), y).backward()
    opt.step()
    result = severity_hypergradient(net, opt, views, y, xh, yh, valid, SINGLE, beta_jsd=12.0)
    assert result.finite
    assert abs(expected) > 1e-7, "degenerate check: the lookahead does not depend on mu"
    # Evaluated around w' instead of w (an O(lr) difference, ~0.2 % here); and pixels that cross
    # a warp's fill boundary jump, which the finite difference sees and autograd does not (~1 %).
    assert result.grad_mu == pytest.approx(expected, rel=0.03)
    assert sev.log_severity_mu.grad.item() == pytest.approx(result.grad_mu)
    assert math.isfinite(result.grad_log_sigma)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(model(xh), yh, reduction="none")
    assert result.heldout_loss == pytest.approx(float((ce * valid).sum() / valid.sum()), rel=1e-6)


def test_hypergradient_changes_nothing_but_the_severity_gradient() -> None:
    """Weights, BatchNorm statistics and the network's .grad are left exactly as they were."""
    net, sev, x, y, xh, yh, valid = _setup(batchnorm=True, dtype=torch.float32)
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-3)
    views = net.views(x, torch.Generator().manual_seed(1), severity_grad=True)
    opt.zero_grad()
    _train_loss(net.classify(views.detach()), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    grads = [p.grad.clone() for p in net.model.parameters()]
    net.model.train()
    result = severity_hypergradient(net, opt, views, y, xh, yh, valid, SINGLE, beta_jsd=12.0)
    assert result.finite and net.model.training
    after = net.model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for g, p in zip(grads, net.model.parameters()):
        assert torch.equal(g, p.grad)
    assert sev.log_severity_mu.grad is not None and sev.log_severity_mu.grad.item() != 0.0


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
        net, opt, views, y[sl], xh[slh], yh[slh], valid[slh], env, beta_jsd=12.0
    )
    return result, sev.log_severity_mu.item()


def _worker(rank: int, world: int, init: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
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
