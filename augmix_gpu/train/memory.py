"""Will the run fit on the GPU? A pre-flight estimate, made once before the first step.

Why: ``configs/augmix_paper.toml`` (global batch 256, fp32) on one GPU puts 768 images (3 JSD
views) through ResNet-50 at once; it fails with a bare CUDA out-of-memory error after the data
is prepared. This estimate stops such a run with one line naming what would fit instead.

What is counted, per GPU:
- the network's activations kept for backward, per image: **counted** by running the
  architecture on the ``meta`` device (shapes only, no memory, ~0.5 s for ResNet-50) with a
  saved-tensors hook, each storage once, parameters left out; in the compute dtype (bf16/fp16
  under autocast). ResNet-50 at 224 px: 82 MiB per image in fp32, 42 MiB in bf16.
- AugMix's images kept for the learnable severity's gradient: **counted** the same way, on the
  CPU at 32 px with the run's AugMix form and scaled by the pixel count (0 for a fixed severity).
- weights, gradients and optimizer state: fp32, counted from the parameters; with
  ``--severity_horizon K > 1`` twice more (the horizon pair's two copies of the network and its
  optimiser), and the copies' steps run in fp32: their activations, where the run's are in
  bf16/fp16, are the larger ones (the copies step after the run's step has freed its own).
- allowances, judged rather than measured: the backward pass holds each layer's input gradient
  while the saved tensors are still alive and the caching allocator rounds its blocks
  (``PEAK_OVER_SAVED``); cuDNN/cuBLAS workspaces (``WORKSPACE_BYTES``); DALI's decoded
  full-size images (``LOADER_BYTES_PER_IMAGE``). ``tests/test_cuda.py`` holds the estimate to
  the measured peak on a GPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..distributed import DistEnv
from ..models import build_model
from ..runtime import amp_dtype
from .config import Settings
from .step import JSD_MODES, AugmentedClassifier

MiB, GiB = 2**20, 2**30
PEAK_OVER_SAVED = 1.2  # backward's live input gradients and allocator rounding over the saved
WORKSPACE_BYTES = 1 * GiB  # cuDNN/cuBLAS workspaces (cudnn.benchmark may try large ones)
LOADER_BYTES_PER_IMAGE = 1.5 * MiB  # DALI: ~3 buffers of a decoded ~0.5 MiB ImageNet JPEG
AUGMIX_PROBE_SIZE = 32  # px: AugMix's saved images are counted at this size, then scaled


def saved_bytes_per_image(
    run: Callable[[torch.Tensor], object], x: torch.Tensor, weights: Iterable[torch.Tensor] = ()
) -> float:
    """Bytes autograd keeps for backward when ``run`` runs on the batch ``x``, per image.

    Each storage counts once (a ReLU's output is often the next convolution's saved input);
    ``weights`` (the parameters and buffers) do not count. ``x`` on the ``meta`` device gives the
    count from shapes alone.
    """
    skip = {t.untyped_storage()._cdata for t in weights}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            kept[storage._cdata] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x)
    return sum(kept.values()) / len(x)


def horizon_copies(settings: Settings) -> int:
    """Copies of the network and its optimiser the held-out objective keeps: the horizon pair's
    two (``--severity_horizon K > 1``), else none."""
    sev = settings.severity
    return 2 if sev.severity_objective == "heldout" and sev.severity_horizon > 1 else 0


def activation_bytes_per_view(settings: Settings, num_classes: int, dtype: torch.dtype) -> float:
    """The network's saved activations per image in ``dtype``, or in fp32 where the horizon
    pair's fp32 copy steps keep more."""
    arch, crop = settings.model.arch, settings.data.crop_size
    count = network_bytes_per_image(arch, num_classes, crop, dtype)
    if horizon_copies(settings) and dtype != torch.float32:
        count = max(count, network_bytes_per_image(arch, num_classes, crop, torch.float32))
    return count


def network_bytes_per_image(arch: str, num_classes: int, size: int, dtype: torch.dtype) -> float:
    """The network's saved activations per image, counted on the ``meta`` device."""
    with torch.device("meta"):
        model = build_model(arch, num_classes).to(dtype).train()
        x = torch.empty(2, 3, size, size, dtype=dtype)  # 2: BatchNorm's training mode needs > 1
    return saved_bytes_per_image(model, x, (*model.parameters(), *model.buffers()))


def augmix_bytes_per_image(net: AugmentedClassifier, device: torch.device, size: int) -> float:
    """AugMix's saved images per input image at ``size`` px: counted on the CPU at
    ``AUGMIX_PROBE_SIZE`` px with the form ``device`` runs, scaled by the pixels."""
    if net.augmenter is None:
        return 0.0
    augmenter = copy.deepcopy(net.augmenter).cpu()
    augmenter.strategy = net.augmenter.strategy_for(device)
    probe = AugmentedClassifier(nn.Identity(), net.aug_type, augmenter)
    images = torch.randint(0, 256, (4, 3, AUGMIX_PROBE_SIZE, AUGMIX_PROBE_SIZE),
                           generator=torch.Generator().manual_seed(0), dtype=torch.uint8)  # fmt: skip
    saved = saved_bytes_per_image(
        lambda x: probe.views(x, torch.Generator().manual_seed(0)), images, augmenter.parameters()
    )
    return saved * (size / AUGMIX_PROBE_SIZE) ** 2


def state_bytes(net: nn.Module, optimizer: str, momentum: float) -> int:
    """fp32 weights, their gradients and the optimizer's state (AdamW: 2 moments; SGD: 1 with
    momentum, 0 without)."""
    params = sum(p.numel() for p in net.parameters())
    moments = 2 if optimizer == "adamw" else int(momentum > 0)
    return 4 * params * (2 + moments)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs for a training step: ``fixed`` + ``per_image`` x images per GPU."""

    fixed: float  # weights, gradients, optimizer state, workspaces
    network_per_view: float  # the network's saved activations per image it sees
    augmix_per_image: float  # AugMix's saved images per input image
    views: int  # images the network sees per input image (3 with the JSD)

    @property
    def per_image(self) -> float:
        net = self.views * self.network_per_view
        return PEAK_OVER_SAVED * (net + self.augmix_per_image) + LOADER_BYTES_PER_IMAGE

    def total(self, batch: int) -> float:
        return self.fixed + batch * self.per_image

    def max_batch(self, available: float) -> int:
        """The largest per-GPU batch that fits in ``available`` bytes (0: not even one)."""
        return max(0, math.floor((available - self.fixed) / self.per_image))


def estimate_memory(settings: Settings, net: AugmentedClassifier, num_classes: int,
                    device: torch.device) -> MemoryEstimate:  # fmt: skip
    """The estimate for ``settings`` (its arch, crop, precision, mode and optimizer)."""
    dtype = amp_dtype(settings.model.precision) or torch.float32
    state = state_bytes(net, settings.optim.optimizer, settings.optim.momentum)
    return MemoryEstimate(
        fixed=(1 + horizon_copies(settings)) * state + WORKSPACE_BYTES,
        network_per_view=activation_bytes_per_view(settings, num_classes, dtype),
        augmix_per_image=augmix_bytes_per_image(net, device, settings.data.crop_size),
        views=3 if settings.augment.aug_type in JSD_MODES else 1,
    )


def check_memory(settings: Settings, net: AugmentedClassifier, num_classes: int, env: DistEnv,
                 *, available: float | None = None) -> str | None:  # fmt: skip
    """Stop a CUDA run that will not fit, with one line naming what would (a ValueError).

    Returns a line for the log when it fits; None on the CPU or with ``--no_memory_check``.
    ``available``: bytes this process can use (default: the GPU's free memory plus what torch
    holds already, the weights among it).
    """
    if env.device.type != "cuda" or settings.run.no_memory_check:
        return None
    if available is None:
        free, _ = torch.cuda.mem_get_info(env.device)
        available = free + torch.cuda.memory_reserved(env.device)
    est = estimate_memory(settings, net, num_classes, env.device)
    batch = settings.per_rank_batch(env.world_size)
    m = settings.model
    where = (f"{m.arch} at {settings.data.crop_size} px, {batch} images x {est.views} views per "
             f"GPU in {'fp32' if m.precision == '32' else m.precision}")  # fmt: skip
    need = est.total(batch)
    if need <= available:
        return f"memory: ~{need / GiB:.1f} GiB of {available / GiB:.1f} GiB per GPU ({where})"
    options = " or ".join(what_would_fit(settings, est, env.world_size, available, num_classes))
    raise ValueError(
        f"not enough GPU memory on {env.device}: ~{need / GiB:.1f} GiB needed, "
        f"{available / GiB:.1f} GiB free ({where}: ~{(need - est.fixed) / GiB:.1f} GiB of "
        f"activations and loader buffers, {est.fixed / GiB:.1f} GiB of weights, gradients, "
        f"optimizer state and workspaces); it would fit with {options}; --no_memory_check runs "
        "it anyway"
    )


def what_would_fit(settings: Settings, est: MemoryEstimate, world_size: int, available: float,
                   num_classes: int) -> list[str]:  # fmt: skip
    """The changes that make the run fit: bf16 activations, more GPUs, a smaller batch."""
    options = []
    batch, global_batch = settings.per_rank_batch(world_size), settings.run.batch
    if settings.model.precision == "32":
        half = activation_bytes_per_view(settings, num_classes, torch.bfloat16)
        bf16 = replace(est, network_per_view=half)
        if bf16.total(batch) <= available:
            options.append(f"--precision bf16 (~{bf16.total(batch) / GiB:.1f} GiB)")
    fits = est.max_batch(available)
    if fits == 0:
        return [*options, "a smaller --crop_size or --arch (not even one image fits)"]
    gpus = next(n for n in range(world_size + 1, global_batch + 1)
                if global_batch % n == 0 and global_batch // n <= fits)  # fmt: skip
    options.append(f"{gpus} GPUs (torchrun, {global_batch // gpus} images per GPU: the same "
                   f"global --batch {global_batch})")  # fmt: skip
    options.append(f"--batch {fits * world_size} ({fits} images per GPU)")
    return options
