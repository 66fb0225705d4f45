"""The one evaluation loop: batches -> the model's normalisation -> model -> float32 logits.

The clean set and every benchmark read their batches through :func:`model_outputs`, so the
preprocessing after decoding (uint8 -> the mean/std the model was trained with, one of
:data:`NORMALIZATIONS`), autocast, ``channels_last`` and the
progress bar are written once. Each caller then counts what it needs: :func:`evaluate_loader`
top-1/top-5/NLL per image (this module), ``imagenet_p.evaluate_sequences`` flips and rank
distances per sequence. A :class:`Context` carries what every evaluation of a run shares (where,
how fast, at which sizes) and builds its loaders and counts with it.

Every image (or sequence) is counted exactly once whatever the world size: the loaders shard by
global rank and mark padding ``valid=False`` (DALI issue #4199: padded samples counted twice), the
callers mask it, ranks all-reduce *counts* (torchvision's references do the same) and the total is
checked against the dataset size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..distributed import DistEnv, all_gather_cat, all_gather_objects, all_reduce_sum
from . import metrics as rb
from .settings import NORMALIZATIONS, DataSettings, RunSettings


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


def normalize_uint8(images: Tensor, normalization: str = "imagenet") -> Tensor:
    """uint8 [B,3,H,W] -> float, ``NORMALIZATIONS[normalization]``: the trainer's own function."""
    from ..augment.augmix import normalize_images

    return normalize_images(images, *NORMALIZATIONS[normalization])


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
    normalization: str = "imagenet",
) -> Iterator[tuple[Tensor, ...]]:
    """Yield ``(logits, *rest)`` for each batch ``(images, *rest)`` of ``loader.epoch(0)``.

    ``images``: uint8 ``[..., 3, H, W]`` (any leading dims: ``[B]`` images, ``[F]`` frames),
    normalised with ``NORMALIZATIONS[normalization]``;
    ``logits``: float32 ``[..., classes]`` on ``env.device`` with the same leading dims. Tensors in
    ``rest`` are moved to the device. Runs under ``inference_mode``; ``bar`` advances per batch.
    """
    model.eval()
    device = env.device
    with torch.inference_mode():
        for images, *rest in loader.epoch(0):
            images = images.to(device)
            lead = images.shape[:-3]
            x = normalize_uint8(images.reshape(-1, *images.shape[-3:]), normalization)
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


@dataclass
class _LocalCounts:
    """This rank's counts, before the all-reduce: per batch, full-length tensors and the mask,
    filtered once at the end (boolean indexing such as ``conf[valid]`` would cost a host sync per
    batch: its output size is data-dependent)."""

    counts: Tensor  # [3] long: n, correct@1, correct@5
    nll_sum: Tensor  # [] float64
    confs: list[Tensor]
    corrs: list[Tensor]
    valids: list[Tensor]

    def add(self, logits: Tensor, labels: Tensor, valid: Tensor) -> None:
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(dim=1)
        nll = F.cross_entropy(logits, labels, reduction="none")
        self.counts += torch.stack([valid.sum(), (hit1 & valid).sum(), (hit5 & valid).sum()])
        self.nll_sum += torch.where(valid, nll.double(), 0.0).sum()
        self.confs.append(logits.softmax(dim=1).amax(dim=1))
        self.corrs.append(hit1)
        self.valids.append(valid)

    def real_samples(self) -> tuple[Tensor, Tensor]:
        """This rank's (confidence, correct as uint8) of its real samples, padding dropped."""
        device = self.counts.device
        if not self.valids:
            return torch.empty(0, device=device), torch.empty(0, dtype=torch.uint8, device=device)
        mask = torch.cat(self.valids)
        return torch.cat(self.confs).float()[mask], torch.cat(self.corrs)[mask].to(torch.uint8)


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
    normalization: str = "imagenet",
) -> EvalResult:
    """Run ``model`` over one epoch of an eval ``loader`` and count, padding masked out.

    ``loader.epoch(0)`` yields ``(uint8 [B,3,H,W], int64 [B], bool valid [B])`` on the device.
    ``pbar``: an outer tqdm bar to advance (one bar per corruption) instead of a new one.
    """
    device = env.device
    local = _LocalCounts(
        torch.zeros(3, dtype=torch.long, device=device),
        torch.zeros((), dtype=torch.float64, device=device), [], [], [],
    )  # fmt: skip
    own_bar = pbar is None
    bar = progress_bar(len(loader), desc, env, progress) if own_bar else pbar
    start = time.perf_counter()
    try:
        run = model_outputs(model, loader, env, amp_dtype=amp_dtype, channels_last=channels_last,
                            bar=bar, normalization=normalization)  # fmt: skip
        for logits, labels, valid in run:
            local.add(logits, labels, valid)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if own_bar:
            bar.close()
    seconds = max_over_ranks(time.perf_counter() - start, env)
    conf, corr = local.real_samples()
    expected = torch.tensor([int(loader.num_samples)], dtype=torch.long, device=device)
    for t in (local.counts, local.nll_sum, expected):
        all_reduce_sum(t, env)
    conf_all, corr_all = all_gather_cat(conf, env).cpu(), all_gather_cat(corr, env).cpu().bool()
    n = int(local.counts[0].item())
    if n != int(expected.item()):
        raise RuntimeError(
            f"{desc}: counted {n} images but the loader holds {int(expected.item())}: "
            "padding was not masked or a shard was read twice"
        )
    if n == 0:
        raise RuntimeError(f"{desc}: the loader yielded no images")
    return EvalResult(
        n=n, correct1=int(local.counts[1].item()), correct5=int(local.counts[2].item()),
        nll_sum=float(local.nll_sum.item()), confidences=conf_all, correct=corr_all,
        images_per_s=n / seconds if seconds > 0 else float("nan"), seconds=seconds,
    )  # fmt: skip


@dataclass(frozen=True)
class Context:
    """What every benchmark of a run reads and counts with (the same on every rank)."""

    env: DistEnv
    batch_size: int  # images per rank per step
    loader_device: str  # "cpu" | "gpu": where DALI decodes
    num_threads: int  # DALI threads per rank
    amp_dtype: torch.dtype | None  # autocast dtype (None: float32, no autocast)
    channels_last: bool
    progress: bool  # progress bars (rank 0 only)
    crop_size: int  # centre crop of every ImageNet-style image
    resize_size: int  # clean resize (shorter side) before the crop
    clean_error: float | None = None  # top-1 error (percent) of the clean set, once evaluated
    normalization: str = "imagenet"  # the model's input normalisation (NORMALIZATIONS)
    on_corrupt: str = "skip"  # a file that cannot be decoded: "skip" it (named) or "error"
    skipped: list[str] = field(default_factory=list)  # this rank's files skipped so far

    @classmethod
    def create(cls, env: DistEnv, run: RunSettings, data: DataSettings) -> Context:
        """The context of ``run`` on ``env``; crop 224 / resize 256 and ImageNet's
        normalisation unless ``data`` says."""
        from ..runtime import amp_dtype

        kind = run.device
        if kind == "auto":
            kind = "gpu" if env.device.type == "cuda" else "cpu"
        return cls(
            env=env, batch_size=run.batch, loader_device={"cuda": "gpu"}.get(kind, kind),
            num_threads=run.workers, amp_dtype=amp_dtype(run.precision),
            channels_last=run.channels_last, progress=not run.no_progress,
            crop_size=data.crop_size or 224, resize_size=data.resize_size or 256,
            normalization=data.normalization or "imagenet", on_corrupt=data.on_corrupt,
        )  # fmt: skip

    def loader(self, source: Any, recipe: str, **kw: Any) -> Any:
        """``data.build_loader`` over ``source`` sharded over this job's ranks, at its sizes."""
        from ..data import build_loader

        return build_loader(
            source, recipe, batch_size=self.batch_size, device=self.loader_device,
            rank=self.env.rank, world_size=self.env.world_size, crop_size=self.crop_size,
            resize_size=self.resize_size, num_threads=self.num_threads,
            on_corrupt=self.on_corrupt, **kw,
        )  # fmt: skip

    def skipped_files(self) -> list[str]:
        """Every file skipped as undecodable so far, on any rank, each named once (sorted).
        A collective: every rank calls it."""
        gathered = all_gather_objects(self.skipped, self.env)
        return sorted({p for rank in gathered for p in rank})

    def count(self, model: nn.Module, loader: Any, desc: str, pbar: Any = None) -> EvalResult:
        """Top-1/top-5/NLL counts and confidences of ``model`` over ``loader``, all ranks summed;
        the files the loader skipped as undecodable are noted (``skipped_files``)."""
        result = evaluate_loader(
            model, loader, self.env, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
            desc=desc, progress=self.progress, pbar=pbar, normalization=self.normalization,
        )  # fmt: skip
        self.skipped.extend(getattr(loader, "skipped", []))
        return result
