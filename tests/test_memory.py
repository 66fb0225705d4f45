"""The pre-flight memory estimate (augmix_gpu/train/memory.py): its counts against hand
computation and real tensors, and the refusal of a run that will not fit (a stated free-memory
figure stands in for the GPU's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from augmix_gpu.distributed import DistEnv
from augmix_gpu.models import build_model
from augmix_gpu.train.config import resolve_settings
from augmix_gpu.train.memory import (
    LOADER_BYTES_PER_IMAGE,
    PEAK_OVER_SAVED,
    WORKSPACE_BYTES,
    GiB,
    MemoryEstimate,
    augmix_bytes_per_image,
    check_memory,
    network_bytes_per_image,
    saved_bytes_per_image,
    state_bytes,
)
from augmix_gpu.train.run import build_augmenter
from augmix_gpu.train.step import AugmentedClassifier

CUDA = DistEnv(0, 0, 1, torch.device("cuda", 0), None)  # the check's device; nothing runs there


def test_saved_bytes_by_hand():
    """conv(3->8) then ReLU at 16 px: the conv keeps its input (3x16x16 fp32), the ReLU its
    output (8x16x16); the conv's weight is a parameter, not an activation."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    x = torch.zeros(4, 3, 16, 16)
    assert saved_bytes_per_image(net, x, net.parameters()) == 4 * (3 + 8) * 16 * 16
    half = saved_bytes_per_image(net.to(torch.bfloat16), x.to(torch.bfloat16), net.parameters())
    assert half == 2 * (3 + 8) * 16 * 16


def test_meta_device_counts_what_real_tensors_keep():
    """The meta count (shapes only) equals the same count on real CPU tensors."""
    net = build_model("resnet18", 10).train()
    x = torch.randn(2, 3, 32, 32)
    real = saved_bytes_per_image(net, x, (*net.parameters(), *net.buffers()))
    assert network_bytes_per_image("resnet18", 10, 32, torch.float32) == real
    assert real > 3 * 32 * 32 * 4  # more than the input image


def test_resnet50_at_224_px():
    """Counted on the meta device: ~82 MiB per image in fp32, about half in bf16."""
    fp32 = network_bytes_per_image("resnet50", 1000, 224, torch.float32)
    bf16 = network_bytes_per_image("resnet50", 1000, 224, torch.bfloat16)
    assert 70 * 2**20 < fp32 < 95 * 2**20
    assert bf16 == pytest.approx(fp32 / 2, rel=0.05)


def test_state_bytes_of_resnet50_from_its_published_parameter_count():
    """25,557,032 parameters (torchvision's table), fp32: weights + grads (+1 or 2 moments)."""
    net = torchvision.models.resnet50()
    assert state_bytes(net, "sgd", 0.9) == 25_557_032 * 4 * 3
    assert state_bytes(net, "adamw", 0.9) == 25_557_032 * 4 * 4
    assert state_bytes(net, "sgd", 0.0) == 25_557_032 * 4 * 2


def test_estimate_arithmetic():
    est = MemoryEstimate(fixed=2 * GiB, network_per_view=80e6, augmix_per_image=10e6, views=3)
    per_image = PEAK_OVER_SAVED * (3 * 80e6 + 10e6) + LOADER_BYTES_PER_IMAGE
    assert est.per_image == per_image
    assert est.total(100) == 2 * GiB + 100 * per_image
    assert est.max_batch(2 * GiB + 100 * per_image) == 100
    assert est.max_batch(2 * GiB + 99.9 * per_image) == 99
    assert est.max_batch(GiB) == 0


def _net(settings) -> AugmentedClassifier:
    aug = build_augmenter(settings.augment, settings.severity)
    model = build_model(settings.model.arch, 10)
    return AugmentedClassifier(model, settings.augment.aug_type, aug)


def test_augmix_saves_images_only_for_a_learnable_severity():
    fixed = resolve_settings(["--aug_type", "augmix_jsd"])
    learnable = resolve_settings(["--aug_type", "learnable_augmix_jsd"])
    assert augmix_bytes_per_image(_net(fixed), CUDA.device, 224) == 0
    small = augmix_bytes_per_image(_net(learnable), CUDA.device, 32)
    assert small > 2 * 3 * 32 * 32 * 4  # at least the two views' images
    assert augmix_bytes_per_image(_net(learnable), CUDA.device, 64) == pytest.approx(4 * small)


def test_the_paper_preset_on_one_48_gib_gpu_is_refused_with_what_would_fit(tmp_path):
    """ResNet-50, global batch 256 x 3 views, fp32, one GPU: ~75 GiB (82 MiB x 768 x 1.2)."""
    s = resolve_settings(["--config", "augmix_paper.toml", "--data", str(tmp_path)])
    net = _net(s)
    with pytest.raises(ValueError) as err:
        check_memory(s, net, 10, CUDA, available=48 * GiB)
    line = str(err.value)
    assert "\n" not in line and line.startswith("not enough GPU memory on cuda:0: ~")
    assert "256 images x 3 views per GPU in fp32" in line
    assert "--precision bf16" in line and "2 GPUs (torchrun, 128 images per GPU" in line
    fits = int(line.split("--batch ")[-1].split(" ")[0])
    assert 0 < fits < 256 and "--no_memory_check" in line
    est = MemoryEstimate(
        fixed=state_bytes(net, "sgd", 0.9) + WORKSPACE_BYTES,
        network_per_view=network_bytes_per_image("resnet50", 10, 224, torch.float32),
        augmix_per_image=0.0,
        views=3,
    )
    assert est.total(fits) <= 48 * GiB < est.total(fits + 1)  # the largest batch that fits


def test_what_fits_passes_with_a_line_and_the_cpu_is_not_checked(tmp_path):
    s = resolve_settings(["--config", "augmix_paper.toml", "--data", str(tmp_path)])
    s = s.replace(precision="bf16", batch=64)
    line = check_memory(s, _net(s), 10, CUDA, available=80 * GiB)
    assert line.startswith("memory: ~") and "of 80.0 GiB per GPU" in line
    cpu = DistEnv(0, 0, 1, torch.device("cpu"), None)
    assert check_memory(s, _net(s), 10, cpu, available=1) is None
    assert check_memory(s.replace(no_memory_check=True), _net(s), 10, CUDA, available=1) is None


def test_not_even_one_image_names_the_crop_and_arch(tmp_path):
    s = resolve_settings(["--config", "augmix_paper.toml", "--data", str(tmp_path)])
    with pytest.raises(ValueError, match="smaller --crop_size or --arch"):
        check_memory(s, _net(s), 10, CUDA, available=1.2 * GiB)


def test_the_horizon_pair_counts_two_more_states_and_its_fp32_activations(tmp_path):
    """--severity_horizon 10: the fixed part holds the run's state three times (the run's and
    the pair's two copies), and in bf16 the activations are the fp32 copies' (larger), where a
    one-step held-out run keeps bf16's; --precision bf16 is then no way to fit."""
    from augmix_gpu.train.memory import estimate_memory

    base = ["--config", "augmix_paper.toml", "--data", str(tmp_path), "--aug_type",
            "learnable_augmix_jsd", "--severity_objective", "heldout", "--precision", "bf16",
            "--severity_estimator", "paired", "--severity_update_every", "50"]  # fmt: skip
    one, pair = resolve_settings(base), resolve_settings(base + ["--severity_horizon", "10"])
    net = _net(one)
    state = state_bytes(net, one.optim.optimizer, one.optim.momentum)
    est_one, est_pair = (estimate_memory(s, net, 10, CUDA.device) for s in (one, pair))
    assert est_one.fixed == state + WORKSPACE_BYTES
    assert est_pair.fixed == 3 * state + WORKSPACE_BYTES
    fp32 = network_bytes_per_image("resnet50", 10, 224, torch.float32)
    bf16 = network_bytes_per_image("resnet50", 10, 224, torch.bfloat16)
    assert bf16 < fp32 and est_one.network_per_view == bf16 and est_pair.network_per_view == fp32
    line = str(pytest.raises(ValueError, check_memory, pair.replace(precision="32"), net, 10,
                             CUDA, available=48 * GiB).value)  # fmt: skip
    assert "--precision bf16" not in line and "GPUs (torchrun" in line
