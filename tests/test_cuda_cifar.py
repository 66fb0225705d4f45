"""The CIFAR path on a GPU, run by ``make gpu-check`` (``pytest -m cuda``); skipped without CUDA.

The resident loader on CUDA against the same loader on the CPU and against DALI's GPU pipeline
(the CPU versions are checked against a hand loop and each other in test_data_resident.py), and
its claim: a training epoch makes no host round trip per step.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device: run `make gpu-check` there"
    ),
]


def _arrays(n: int = 300):
    from augmix_gpu.data import CifarArrays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return CifarArrays(images, np.arange(n) % 10, [str(k) for k in range(10)])


def test_resident_on_cuda_equals_the_cpu_and_dali_gpu_batches() -> None:
    from augmix_gpu.data import ResidentLoader, build_loader

    arrays = _arrays()
    kw = dict(batch_size=32, rank=1, world_size=2, seed=4)
    cuda = ResidentLoader(arrays, "train", device="gpu", **kw)
    cpu = ResidentLoader(arrays, "train", device="cpu", **kw)
    dali = build_loader(arrays, "train", device="gpu", num_threads=2, **kw)
    for a, b, c in zip(cuda.epoch(2), cpu.epoch(2), dali.epoch(2), strict=True):
        assert a[0].device.type == "cuda" and a[0].dtype == torch.uint8
        assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[1].cpu(), b[1]) and torch.equal(a[1], c[1])


def test_a_resident_epoch_makes_no_host_sync_per_step() -> None:
    """Only the epoch's start uploads (order, offsets, flips): the steps themselves never sync."""
    from augmix_gpu.data import ResidentLoader

    loader = ResidentLoader(_arrays(), "train", batch_size=16, device="gpu")
    batches = loader.epoch(0)
    next(batches)  # the epoch's uploads happen here
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = sum(1 for _ in batches)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert steps == len(loader) - 1 and not syncs, [str(w.message) for w in syncs[:3]]


def test_cifar_preset_step_on_cuda(tmp_path) -> None:
    """One step of the preset (WRN-40-2, batch 128, JSD) from the resident loader: finite loss."""
    from augmix_gpu.data import ResidentLoader
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.models import build_model
    from augmix_gpu.train.config import resolve_settings
    from augmix_gpu.train.run import build_augmenter
    from augmix_gpu.train.schedule import build_optimizer
    from augmix_gpu.train.step import (
        AugmentedClassifier,
        StepContext,
        StopFlag,
        TrainState,
        train_step,
    )

    device = torch.device("cuda")
    c = resolve_settings(["--config", "augmix_cifar.toml", "--data", str(tmp_path)])
    loader = ResidentLoader(_arrays(256), "train", batch_size=c.run.batch, device=device)
    model = build_model(c.model.arch, 10).to(memory_format=torch.channels_last)
    aug = build_augmenter(c.augment, c.severity)
    net = AugmentedClassifier(model, c.augment.aug_type, aug, channels_last=True).to(device)
    opt = build_optimizer(net, c.optim, c.run.batch, c.severity.severity_lr_mult)
    ctx = StepContext(
        net, net, opt, torch.amp.GradScaler("cuda", enabled=False), c,
        DistEnv(0, 0, 1, device, None), torch.Generator(device).manual_seed(0), len(loader),
        StopFlag(),
    )  # fmt: skip
    images, labels, _ = next(loader.epoch(0))
    out = train_step(ctx, TrainState(), images, labels)
    assert math.isfinite(float(out["loss"]))
