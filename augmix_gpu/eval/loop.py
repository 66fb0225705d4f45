"""The one evaluation loop: batches -> ImageNet normalisation -> model -> float32 logits.

Clean, ImageNet-C, CIFAR-C and ImageNet-P evaluation all read their batches through
:func:`model_outputs`, so the preprocessing after decoding (uint8 -> ImageNet mean/std), autocast,
``channels_last`` and the progress bar are written once. Each caller then counts what it needs:
:func:`evaluate_loader` top-1/top-5/NLL per image (this module), ``stability.evaluate_sequences``
flips and rank distances per sequence.

Every image (or sequence) is counted exactly once whatever the world size: the loaders shard by
global rank and mark padding ``valid=False`` (DALI issue #4199: padded samples counted twice), the
callers mask it, ranks all-reduce *counts* (torchvision's references do the same) and the total is
checked against the dataset size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..distributed import DistEnv, all_gather_cat, all_reduce_sum
from . import metrics as rb


@dataclass
class EvalResult:
    """Counts over one dataset, summed over ranks; per-sample confidence/correctness gathered."""

    n: int
    correct1: int
    correct5: int
    nll_sum: float
    confidences: Tensor  # [n] float32, CPU: max softmax probability
    correct: Tensor  # [n] bool, CPU: top-1 correct
    images_per_s: float
    seconds: float = 0.0

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * self.correct1 / self.n

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.n

    @property
    def error(self) -> float:
        """Top-1 error in percent, from counts."""
        return rb.error_rate(self.n - self.correct1, self.n)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood (nats)."""
        return self.nll_sum / self.n

    def calibration(self) -> dict[str, float]:
        """RMS calibration error (adaptive bins of 100) and ECE (15 bins), percent."""
        conf, corr = self.confidences.numpy(), self.correct.numpy()
        return {
            "rms_calibration_error": rb.rms_calibration_error(conf, corr),
            "ece": rb.expected_calibration_error(conf, corr),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "error": self.error,
            "top5_error": 100.0 - self.top5,
            "nll": self.nll,
            **self.calibration(),
            "images_per_s": self.images_per_s,
        }


def normalize_uint8(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] -> float, ImageNet mean/std: the trainer's own function (one definition)."""
    from ..augment.augmix import normalize_images

    return normalize_images(images)


def max_over_ranks(value: float, env: DistEnv) -> float:
    """The slowest rank's figure (wall time of a collective job)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def progress_bar(total: int, desc: str, env: DistEnv, progress: bool, leave: bool = False):
    """A tqdm bar on rank 0 only (disabled elsewhere, so every rank can call ``update``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, disable=not (progress and env.is_main))


def model_outputs(
    model: nn.Module,
    loader: Any,
    env: DistEnv,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    bar: Any = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Yield ``(logits, *rest)`` for each batch ``(images, *rest)`` of ``loader.epoch(0)``.

    ``images``: uint8 ``[..., 3, H, W]`` (any leading dims: ``[B]`` images, ``[F]`` frames);
    ``logits``: float32 ``[..., classes]`` on ``env.device`` with the same leading dims. Tensors in
    ``rest`` are moved to the device. Runs under ``inference_mode``; ``bar`` advances per batch.
    """
    model.eval()
    device = env.device
    with torch.inference_mode():
        for images, *rest in loader.epoch(0):
            images = images.to(device)
            lead = images.shape[:-3]
            x = normalize_uint8(images.reshape(-1, *images.shape[-3:]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits = model(x)
            logits = logits.float().reshape(*lead, -1)
            rest = [r.to(device) if isinstance(r, Tensor) else r for r in rest]
            if bar is not None:
                bar.update(1)
            yield (logits, *rest)


def evaluate_loader(
    model: nn.Module,
    loader: Any,
    env: DistEnv,
    *,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
    progress: bool = True,
    channels_last: bool = False,
    pbar: Any = None,
) -> EvalResult:
    """Run ``model`` over one epoch of an eval ``loader`` and count, padding masked out.

    ``loader.epoch(0)`` yields ``(uint8 [B,3,H,W], int64 [B], bool valid [B])`` on the device.
    ``pbar``: an outer tqdm bar to advance (one bar per corruption) instead of a new one.
    """
    device = env.device
    counts = torch.zeros(3, dtype=torch.long, device=device)  # n, correct@1, correct@5
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    confs: list[Tensor] = []
    corrs: list[Tensor] = []
    # Per batch: full-length tensors and the mask, filtered once at the end. Boolean indexing
    # (`conf[valid]`) would cost a host sync per batch (its output size is data-dependent).
    valids: list[Tensor] = []
    own_bar = pbar is None
    bar = progress_bar(len(loader), desc, env, progress) if own_bar else pbar
    start = time.perf_counter()
    try:
        run = model_outputs(
            model, loader, env, amp_dtype=amp_dtype, channels_last=channels_last, bar=bar
        )
        for logits, labels, valid in run:
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0] == labels
            hit5 = (top == labels[:, None]).any(dim=1)
            nll = F.cross_entropy(logits, labels, reduction="none")
            conf = logits.softmax(dim=1).amax(dim=1)
            counts += torch.stack([valid.sum(), (hit1 & valid).sum(), (hit5 & valid).sum()])
            nll_sum += torch.where(valid, nll.double(), 0.0).sum()
            confs.append(conf)
            corrs.append(hit1)
            valids.append(valid)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if own_bar:
            bar.close()
    seconds = max_over_ranks(time.perf_counter() - start, env)
    expected = torch.tensor([int(loader.num_samples)], dtype=torch.long, device=device)
    all_reduce_sum(counts, env)
    all_reduce_sum(nll_sum, env)
    all_reduce_sum(expected, env)
    n = int(counts[0].item())
    if n != int(expected.item()):
        raise RuntimeError(
            f"{desc}: counted {n} images but the loader holds {int(expected.item())}: "
            "padding was not masked or a shard was read twice"
        )
    if n == 0:
        raise RuntimeError(f"{desc}: the loader yielded no images")
    mask = torch.cat(valids) if valids else torch.empty(0, dtype=torch.bool, device=device)
    conf_local = torch.cat(confs).float()[mask] if confs else torch.empty(0, device=device)
    corr_local = (
        torch.cat(corrs)[mask].to(torch.uint8)
        if corrs
        else torch.empty(0, dtype=torch.uint8, device=device)
    )
    conf_all = all_gather_cat(conf_local, env).cpu()
    corr_all = all_gather_cat(corr_local, env).cpu().bool()
    return EvalResult(
        n=n,
        correct1=int(counts[1].item()),
        correct5=int(counts[2].item()),
        nll_sum=float(nll_sum.item()),
        confidences=conf_all,
        correct=corr_all,
        images_per_s=n / seconds if seconds > 0 else float("nan"),
        seconds=seconds,
    )
