"""The CUDA paths, run by ``make gpu-check`` (``pytest -m cuda``) on a machine with a GPU.

Each test compares the GPU path with the CPU path this suite already checks against PIL and
torchvision: the mixed decoder against the CPU decoder on every recipe, AugMix on CUDA against the
CPU with the same draws, mixed precision and channels_last steps with the learnable severity, the
host reads of a step (``torch.cuda.set_sync_debug_mode``), and NCCL with two ranks. Without CUDA
every test is skipped with the reason.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import natural_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device: run `make gpu-check` there"
    ),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    from augmix_gpu.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("gpu") / "syn"
    return make_synthetic_dataset(
        root, num_classes=4, train_per_class=8, val_per_class=8, size=96, seed=0, progress=False
    )


@pytest.mark.parametrize("recipe", ["train", "val", "corrupted"])
def test_mixed_decoder_matches_the_cpu_decoder(jpegs: Path, recipe: str) -> None:
    """Same files, same host-drawn crop windows and flips: nvJPEG + GPU resize vs libjpeg-turbo."""
    from augmix_gpu.data import build_loader

    folder = jpegs / ("train" if recipe == "train" else "val")
    kw = dict(batch_size=8, seed=3, crop_size=64, resize_size=80, num_threads=2)
    gpu = next(iter(build_loader(folder, recipe, device="gpu", **kw).epoch(0)))
    cpu = next(iter(build_loader(folder, recipe, device="cpu", **kw).epoch(0)))
    assert gpu[0].device.type == "cuda" and gpu[0].dtype == torch.uint8
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[2].cpu(), cpu[2])
    diff = (gpu[0].cpu().float() - cpu[0].float()).abs()
    # jpeg_fancy_upsampling makes the chroma match; the resize kernels round apart by ~1 level.
    assert diff.mean() < 1.0, f"{recipe}: mean |GPU - CPU| = {diff.mean():.2f} levels"


@pytest.mark.parametrize("strategy", ["grouped", "static"])
def test_augmix_on_cuda_matches_the_cpu_with_the_same_draws(strategy) -> None:
    from augmix_gpu.augment.augmix import AugMixBatch

    aug = AugMixBatch(severity=3.0, strategy=strategy)
    x = natural_batch(16, 64)
    params = aug.sample_params(16, generator=torch.Generator().manual_seed(0))
    cpu = aug.apply(x, params, 3.0)
    gpu = aug.to(CUDA).apply(x.to(CUDA), params.to(CUDA), 3.0)
    for a, b in zip(cpu, gpu):
        # bilinear sampling rounds differently on the GPU; ImageNet-normalised units (1/255 ~ 0.017)
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0.02)


def _step_context(precision: str, channels_last: bool, objective: str = "minimize"):
    from augmix_gpu.augment.augmix import AugMixBatch
    from augmix_gpu.augment.severity import LearnableSeverity
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.models import build_model
    from augmix_gpu.runtime import amp_dtype
    from augmix_gpu.train.config import resolve_settings
    from augmix_gpu.train.schedule import build_optimizer
    from augmix_gpu.train.step import AugmentedClassifier, StepContext, StopFlag

    torch.manual_seed(0)
    config = resolve_settings(["--precision", precision]).replace(batch=16, epochs=1)
    aug = AugMixBatch(severity=LearnableSeverity(3.0, objective=objective))
    net = AugmentedClassifier(
        build_model("resnet18", 10), "learnable_augmix_jsd", aug,
        amp_dtype=amp_dtype(config.model.precision), channels_last=channels_last,
    ).to(CUDA)  # fmt: skip
    if channels_last:
        net.model.to(memory_format=torch.channels_last)
    opt = build_optimizer(net, config.optim, 16, config.severity.severity_lr_mult)
    scaler = torch.amp.GradScaler("cuda", enabled=config.model.precision == "16")
    env = DistEnv(0, 0, 1, CUDA, None)
    gen = torch.Generator(CUDA).manual_seed(0)
    return StepContext(net, net, opt, scaler, config, env, gen, 10, StopFlag())


@pytest.mark.parametrize(
    ("precision", "channels_last"), [("bf16", False), ("16", False), ("bf16", True), ("32", True)]
)
def test_learnable_severity_trains_under_amp_and_channels_last(precision, channels_last) -> None:
    from augmix_gpu.train.step import TrainState, train_step

    ctx = _step_context(precision, channels_last)
    state = TrainState()
    mu0 = ctx.net.severity.log_severity_mu.item()
    for step in range(4):
        out = train_step(
            ctx,
            state,
            natural_batch(16, 64, seed=step).to(CUDA),
            torch.arange(16, device=CUDA) % 10,
        )
        state.global_step += 1
    assert math.isfinite(float(out["loss"]))
    assert ctx.net.severity.log_severity_mu.item() != mu0, "no gradient reached the severity"


def test_a_step_waits_on_the_host_at_most_once() -> None:
    """set_sync_debug_mode counts every synchronising call; the static AugMix form reads nothing."""
    from augmix_gpu.train.step import TrainState, train_step

    ctx = _step_context("bf16", True)
    state = TrainState()
    batches = [
        (natural_batch(16, 64, seed=i).to(CUDA), torch.arange(16, device=CUDA) % 10)
        for i in range(4)
    ]
    train_step(ctx, state, *batches[0])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for images, labels in batches[1:]:
                state.global_step += 1
                train_step(ctx, state, images, labels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= len(batches[1:]), [str(w.message) for w in syncs]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with 2 ranks needs 2 GPUs")
def test_nccl_two_ranks(tmp_path) -> None:
    from cli_runner import ok, run_script
    from test_train import SMALL, results

    args = SMALL + [
        "--device",
        "cuda",
        "--max_steps_per_epoch",
        "4",
        "--ckpt_dir_base",
        str(tmp_path),
    ]
    ok(run_script("train.py", args, torchrun=2, env={"AUGMIX_GPU_CACHE": str(tmp_path / "cache")}))
    a, b = results(tmp_path / "learnable_augmix_jsd")["replica_checksums"]
    assert a == b
