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


# AugMix on two devices, same draws: ImageNet-normalised units (one grey level ~ 0.017). A 1-ulp
# difference in the sampler's coordinates moves a pixel across a posterize/solarize/equalize
# threshold now and then, a whole level or more; so the bound is on the share of elements beyond
# ATOL, not on every element. tests/test_cuda_bounds.py holds both sides on the CPU: a last-bit
# sampler stays far inside, one sample of 16 drawn differently is far outside.
ATOL = 0.02
MAX_OUTSIDE = 1e-3  # share of elements beyond ATOL


def share_outside(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> float:
    """The share of elements of ``a`` and ``b`` further apart than ``atol``."""
    return float(((a.float() - b.float()).abs() > atol).float().mean())


@pytest.mark.parametrize("strategy", ["grouped", "static"])
def test_augmix_on_cuda_matches_the_cpu_with_the_same_draws(strategy) -> None:
    from augmix_gpu.augment.augmix import AugMixBatch

    aug = AugMixBatch(severity=3.0, strategy=strategy)
    x = natural_batch(16, 64)
    params = aug.sample_params(16, generator=torch.Generator().manual_seed(0))
    cpu = aug.apply(x, params, 3.0)
    gpu = aug.to(CUDA).apply(x.to(CUDA), params.to(CUDA), 3.0)
    for view, (a, b) in enumerate(zip(cpu, gpu)):
        outside = share_outside(b.cpu(), a)
        assert outside <= MAX_OUTSIDE, f"view {view}: {outside:.2%} of elements beyond {ATOL}"


def test_fused_augmix_on_cuda_matches_static_on_the_cpu_with_the_same_draws() -> None:
    """The fused kernels compiled for the GPU against the reference form on the CPU: the chain
    images are float16 there, so a threshold op flips a pixel now and then; as on the CPU under
    Triton's interpreter (tests/test_augmix.py), at most 2 % of a view's elements are beyond
    ATOL, and the clean view agrees everywhere."""
    from augmix_gpu.augment.augmix import AugMixBatch

    static = AugMixBatch(severity=3.0, strategy="static")
    fused = AugMixBatch(severity=3.0, strategy="fused").to(CUDA)
    x = natural_batch(16, 64)
    params = static.sample_params(16, generator=torch.Generator().manual_seed(0))
    cpu = static.apply(x, params, 3.0)
    gpu = fused.apply(x.to(CUDA), params.to(CUDA), 3.0)
    assert share_outside(gpu[0].cpu(), cpu[0]) == 0.0
    for view, (a, b) in enumerate(zip(cpu[1:], gpu[1:]), start=1):
        outside = share_outside(b.cpu(), a)
        assert outside <= 0.02, f"view {view}: {outside:.2%} of elements beyond {ATOL}"


def _step_context(precision: str, channels_last: bool, objective: str = "minimize", *,
                  arch: str = "resnet18", batch: int = 16, crop: int = 64):  # fmt: skip
    from augmix_gpu.augment.augmix import AugMixBatch
    from augmix_gpu.augment.severity import LearnableSeverity
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.models import build_model
    from augmix_gpu.runtime import amp_dtype
    from augmix_gpu.train.config import resolve_settings
    from augmix_gpu.train.schedule import build_optimizer
    from augmix_gpu.train.step import AugmentedClassifier, StepContext, StopFlag

    torch.manual_seed(0)
    config = resolve_settings(["--precision", precision])
    config = config.replace(batch=batch, epochs=1, arch=arch, crop_size=crop)
    aug = AugMixBatch(severity=LearnableSeverity(3.0, objective=objective))
    net = AugmentedClassifier(
        build_model(arch, 10), "learnable_augmix_jsd", aug,
        amp_dtype=amp_dtype(config.model.precision), channels_last=channels_last,
    ).to(CUDA)  # fmt: skip
    if channels_last:
        net.model.to(memory_format=torch.channels_last)
    opt = build_optimizer(net, config.optim, batch, config.severity.severity_lr_mult)
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


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_the_memory_estimate_against_the_measured_peak(precision) -> None:
    """ResNet-50 at 224 px, 8 images x 3 views, learnable severity: the peak of a step (the
    optimizer's state made by the step before) within [0.7, 1.2] of the pre-flight estimate,
    less its allowances for DALI and workspaces (no DALI here, no cudnn.benchmark). A failure
    says the ratio: what the first GPU run learns about PEAK_OVER_SAVED."""
    from augmix_gpu.train.memory import LOADER_BYTES_PER_IMAGE, WORKSPACE_BYTES, estimate_memory
    from augmix_gpu.train.step import TrainState, train_step

    ctx = _step_context(precision, True, arch="resnet50", batch=8, crop=224)
    images, labels = natural_batch(8, 224).to(CUDA), torch.arange(8, device=CUDA) % 10
    state = TrainState()
    train_step(ctx, state, images, labels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    state.global_step += 1
    train_step(ctx, state, images, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    est = estimate_memory(ctx.settings, ctx.net, 10, CUDA)
    ratio = peak / (est.total(8) - 8 * LOADER_BYTES_PER_IMAGE - WORKSPACE_BYTES)
    assert 0.7 <= ratio <= 1.2, f"{precision}: measured peak / estimate = {ratio:.2f}"


def _h264_420(path: str, seed: int) -> None:
    """12 frames of a drifting natural image, H.264 4:2:0 (NVDEC reads it; not 4:4:4 before
    Blackwell, which is what the -P maker writes)."""
    import av

    img = natural_batch(1, (224, 240), seed=seed)[0].permute(1, 2, 0).numpy()
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(img[:, i : i + 224].copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_dali_video_frames_survive_the_next_decode(tmp_path) -> None:
    """video.py waits for its frame copies before DALI's next run reuses its output buffers: a
    batch decoded, the next one (the videos swapped) decoded at once, and the first batch still
    equals what a fresh decoder gives."""
    pytest.importorskip("av")
    from augmix_gpu.data.video import DaliVideoDecoder

    paths = [str(tmp_path / f"{seed}.mp4") for seed in range(2)]
    for seed, path in enumerate(paths):
        _h264_420(path, seed)

    def decoder() -> DaliVideoDecoder:
        return DaliVideoDecoder(batch_size=2, device="mixed", device_id=0, num_threads=2)

    reused = decoder()
    first = reused.decode(paths)
    reused.decode(paths[::-1])  # the next run, into the same output buffers
    fresh = decoder().decode(paths)
    assert not torch.equal(fresh[0], fresh[1])  # an overwrite would show
    for got, want in zip(first, fresh):
        assert got.is_cuda and torch.equal(got, want)


def test_the_collectives_on_a_one_rank_nccl_group(tmp_path) -> None:
    """NCCL on one GPU (train.py starts no group for a world of one): the group started as
    init_distributed starts it (device bound), the gloo side group for host flags, the
    collectives on counts, and a DDP step whose gradients equal the plain module's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from augmix_gpu.distributed import (
        DistEnv,
        all_gather_cat,
        all_gather_objects,
        all_reduce_sum,
        any_rank,
        broadcast_object,
        start_process_group,
    )

    device = torch.device("cuda", 0)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    start_process_group(backend="nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        env = DistEnv(0, 0, 1, device, "nccl", dist.new_group(backend="gloo"))
        counts = torch.arange(4.0, device=device)
        assert all_reduce_sum(counts, env).tolist() == [0.0, 1.0, 2.0, 3.0]
        assert all_gather_cat(torch.tensor([5, 6], device=device), env).tolist() == [5, 6]
        assert any_rank(True, env) and not any_rank(False, env)
        assert broadcast_object({"a": 1}, env) == {"a": 1} and all_gather_objects(2, env) == [2]
        torch.manual_seed(0)
        plain = torch.nn.Linear(8, 3).to(device)
        ddp = DDP(torch.nn.Linear(8, 3).to(device), device_ids=[0])
        ddp.module.load_state_dict(plain.state_dict())
        x = torch.randn(16, 8, device=device)
        plain(x).square().sum().backward()
        ddp(x).square().sum().backward()
        for a, b in zip(plain.parameters(), ddp.module.parameters()):
            torch.testing.assert_close(b.grad, a.grad)
    finally:
        dist.destroy_process_group()
