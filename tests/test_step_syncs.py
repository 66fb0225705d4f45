"""Host reads in a training step: on a GPU each one waits for the device's queue to drain.

Counted on CPU tensors: every ``.item()``/``float()``/``bool()`` of a tensor (``aten::
_local_scalar_dense``) and every ``.tolist()``/``.numpy()``. The only read in a step is AugMix's
group sizes under the ``grouped`` strategy, none under ``static``; the losses, the non-finite check, the severity
statistics and the held-out update stay on the device until a logging step reads them at once.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from conftest import natural_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from augmix_gpu.augment.augmix import AugMixBatch
from augmix_gpu.augment.severity import LearnableSeverity
from augmix_gpu.distributed import DistEnv
from augmix_gpu.train.config import resolve_settings
from augmix_gpu.train.heldout_severity import HeldoutSeverityUpdater
from augmix_gpu.train.schedule import build_optimizer
from augmix_gpu.train.step import (
    AugmentedClassifier,
    StepContext,
    StopFlag,
    TrainState,
    train_one_epoch,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = DistEnv(0, 0, 1, torch.device("cpu"), None)
B, CLASSES = 4, 3


class _Reads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads():
    mode = _Reads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name):
        def read(self, *args, **kwargs):
            mode.count += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        with mode:
            yield mode
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_the_counter_sees_every_kind_of_read() -> None:
    t = torch.ones(3)
    with host_reads() as reads:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
    assert reads.count == 4


class _HeldoutStub:
    """A held-out loader: two fixed batches of normalised-ready uint8 images."""

    def __len__(self) -> int:
        return 2

    def epoch(self, epoch: int, start_step: int = 0):
        for i in range(start_step, 2):
            yield (
                natural_batch(B, 24, seed=50 + i),
                torch.arange(B) % CLASSES,
                torch.ones(B, dtype=torch.bool),
            )


def _context(objective: str, strategy: str = "grouped", **overrides):
    torch.manual_seed(0)
    config = resolve_settings(["--severity_objective", objective]).replace(
        batch=B, epochs=1, max_steps_per_epoch=0, **overrides
    )
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, CLASSES),
    )  # fmt: skip
    aug = AugMixBatch(severity=LearnableSeverity(3.0, objective=objective), strategy=strategy)
    net = AugmentedClassifier(model, "learnable_augmix_jsd", aug)
    opt = build_optimizer(net, config.optim, B, config.severity.severity_lr_mult)
    updater = None
    if objective == "heldout":
        updater = HeldoutSeverityUpdater(net, _HeldoutStub(), ENV, every=2, lr=0.05, beta_jsd=12.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(net, net, opt, scaler, config, ENV, torch.Generator().manual_seed(0), 8,
                      StopFlag(), updater)  # fmt: skip
    return ctx


def _batch(step: int):
    return natural_batch(B, 24, seed=step), torch.arange(B) % CLASSES


@pytest.mark.parametrize(("strategy", "expected"), [("grouped", 1), ("static", 0), ("fused", 0)])
@pytest.mark.parametrize("objective", ["minimize", "heldout"])
def test_a_step_reads_the_host_once_at_most(objective: str, strategy: str, expected: int) -> None:
    """grouped AugMix reads its group sizes (once per step, update steps included); static and fused
    nothing."""
    ctx = _context(objective, strategy)
    state = TrainState()
    train_step(ctx, state, *_batch(0))  # warm-up (lazy optimiser state, first allocations)
    state.global_step = 1
    for step in (1, 2, 3):  # with every=2, step index 1 and 3 end with a severity update
        with host_reads() as reads:
            out = train_step(ctx, state, *_batch(step))
        state.global_step += 1
        assert reads.count == expected, f"step {step}: {reads.count} host reads"
        assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert ("hypergrad_mu" in out) == (objective == "heldout")


def test_an_epoch_reads_once_per_log_interval() -> None:
    ctx = _context("minimize", log_every=4)
    state = TrainState()
    batches = [(*_batch(i), torch.ones(B, dtype=torch.bool)) for i in range(8)]
    with host_reads() as reads:
        metrics = train_one_epoch(ctx, state, batches)
    # 8 AugMix group-size reads + 2 log flushes + the epoch's summary (5 values of one tensor)
    assert reads.count <= 8 + 2 + 6, reads.count
    assert len(state.severity_trajectory) == 8  # still every step, exactly
    assert [t["step"] for t in state.severity_trajectory] == list(range(1, 9))
    assert math.isfinite(metrics["loss"])


def test_a_nonfinite_step_is_skipped_on_the_device() -> None:
    """NaN loss: weights, optimiser state and severity unchanged, counted when the log is read."""
    ctx = _context("minimize", debug_nonfinite_steps=[1])
    state = TrainState()
    train_step(ctx, state, *_batch(0))
    state.global_step = 1
    before = {k: v.clone() for k, v in ctx.net.state_dict().items()}
    opt_before = {
        id(p): {k: v.clone() for k, v in st.items()} for p, st in ctx.optimizer.state.items()
    }
    out = train_step(ctx, state, *_batch(1))
    assert bool(out["skipped"]) and not math.isfinite(float(out["loss"]))
    for k, v in ctx.net.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm saw the batch, as before
            assert torch.equal(v, before[k]), k
    for p, st in ctx.optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, opt_before[id(p)][k]), k
