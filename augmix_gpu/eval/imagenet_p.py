"""ImageNet-P: per-sequence flips and rank distances on the device, and the run over a -P tree.

For each sequence, from the model's logits on its frames and test.py's comparison pairs
(``robustness.comparison_pairs``): the number of top-1 flips, the summed top-5 distance and the
summed Zipf distance. Definitions (hendrycks/robustness ImageNet-P/test.py; Hendrycks & Dietterich
2019, section 3), with frames ``a`` (earlier) and ``b`` (later), ``rank_b(c)`` the 0-based position
of class ``c`` in ``b``'s descending order (ties by class index: scipy's ``rankdata(-x,
'ordinal')``) and ``c_k`` the class at position ``k`` in ``a``:

- flip: ``argmax a != argmax b``;
- top-5 distance: ``sum_{k<5} |k - min(rank_b(c_k), 5)|`` (a's top 5 displaced in b, a class
  that leaves b's top 5 counting as position 5; 0 to 15);
- Zipf distance: ``sum_k |1/(k+1) - 1/(rank_b(c_k)+1)| / (k+1)`` over all classes.

Counts land in per-sequence slots (the sequence's index in its folder), are all-reduced, and every
slot must have been filled by exactly one rank: exact and identical for any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import protocols
from ..distributed import DistEnv, all_reduce_sum
from . import metrics as rb
from .loop import max_over_ranks, model_outputs, progress_bar


def rank_positions(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, position)`` per frame: classes by descending logit (ties: lower index first) and
    each class's 0-based position in that order. ``logits``: ``[T, C]``."""
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    position = torch.empty_like(order)
    arange = torch.arange(logits.shape[1], device=logits.device).expand_as(order)
    position.scatter_(1, order, arange)
    return order, position


def sequence_statistics(logits: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(flips, top5_sum, zipf_sum, top1 [T])`` of one sequence, as tensors (no host sync).

    ``logits``: float ``[T, C]``; ``pairs``: long ``[P, 2]`` (earlier, later) frame indices.
    """
    order, position = rank_positions(logits)
    top1 = order[:, 0]
    a, b = pairs[:, 0], pairs[:, 1]
    flips = (top1[a] != top1[b]).sum()
    moved = position[b].gather(1, order[a])  # [P, C]: where a's k-th class sits in b
    k5 = min(5, logits.shape[1])
    ks = torch.arange(logits.shape[1], device=logits.device)
    top5 = (ks[:k5] - moved[:, :k5].clamp(max=5)).abs().sum()
    recip = 1.0 / (ks.double() + 1.0)
    zipf = ((recip - 1.0 / (moved.double() + 1.0)).abs() * recip).sum()
    return flips, top5, zipf, top1


@dataclass
class SequenceResult:
    """Per-sequence counts of one (perturbation, difficulty) folder, identical on every rank."""

    flips: np.ndarray  # [N] int64
    comparisons: np.ndarray  # [N] int64
    top5: np.ndarray  # [N] int64: summed top-5 distances
    zipf: np.ndarray  # [N] float64: summed Zipf distances
    predictions: np.ndarray  # [N, T_max] int64 top-1 per frame, -1 past a sequence's end
    labels: np.ndarray  # [N] int64
    seconds: float
    frames: int

    def counts(self) -> dict[str, np.ndarray]:
        return {"flips": self.flips, "comparisons": self.comparisons, "top5": self.top5,
                "zipf": self.zipf}  # fmt: skip


def local_sequence_counts(
    model: nn.Module,
    loader: Any,
    env: DistEnv,
    perturbation: str,
    difficulty: int,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    bar: Any = None,
    max_frames: int = 64,
) -> dict[str, Tensor]:
    """This rank's slot tensors (zeros for sequences it does not own), before the all-reduce."""
    n, dev = loader.num_sequences, env.device
    slots = {
        "seen": torch.zeros(n, dtype=torch.long, device=dev),
        "flips": torch.zeros(n, dtype=torch.long, device=dev),
        "comparisons": torch.zeros(n, dtype=torch.long, device=dev),
        "top5": torch.zeros(n, dtype=torch.long, device=dev),
        "zipf": torch.zeros(n, dtype=torch.float64, device=dev),
        "labels": torch.zeros(n, dtype=torch.long, device=dev),
        # top-1 + 1 per frame (0: no frame), so that summing over ranks keeps the owner's value
        "predictions": torch.zeros(n, max_frames, dtype=torch.long, device=dev),
    }
    pair_cache: dict[int, Tensor] = {}
    run = model_outputs(
        model, loader, env, amp_dtype=amp_dtype, channels_last=channels_last, bar=bar
    )
    for logits, labels, index, lengths in run:
        starts = torch.cumsum(lengths, 0) - lengths
        for j, (i, start, length) in enumerate(
            zip(index.tolist(), starts.tolist(), lengths.tolist())
        ):
            if length > max_frames:
                raise ValueError(
                    f"{loader.paths([i])[0]!r} has {length} frames, more than max_frames={max_frames}"
                )
            if length not in pair_cache:
                pairs = protocols.comparison_pairs(length, perturbation, difficulty)
                pair_cache[length] = torch.tensor(pairs, dtype=torch.long, device=dev)
            pairs = pair_cache[length]
            flips, top5, zipf, top1 = sequence_statistics(logits[start : start + length], pairs)
            slots["seen"][i] += 1
            slots["flips"][i] += flips
            slots["comparisons"][i] += len(pairs)
            slots["top5"][i] += top5
            slots["zipf"][i] += zipf
            slots["labels"][i] += labels[j]
            slots["predictions"][i, :length] += top1 + 1
    return slots


def reduce_sequence_counts(
    slots: dict[str, Tensor], env: DistEnv, desc: str, seconds: float = 0.0
) -> SequenceResult:
    """All-reduce the slots and check that each sequence was counted exactly once."""
    for t in slots.values():
        all_reduce_sum(t, env)
    seen = slots["seen"].cpu().numpy()
    wrong = np.flatnonzero(seen != 1)
    if wrong.size:
        raise RuntimeError(
            f"{desc}: sequence(s) {wrong[:5].tolist()} counted {seen[wrong[:5]].tolist()} times "
            "instead of once: the shards overlap or miss sequences"
        )
    pred = slots["predictions"].cpu().numpy() - 1
    return SequenceResult(
        flips=slots["flips"].cpu().numpy(),
        comparisons=slots["comparisons"].cpu().numpy(),
        top5=slots["top5"].cpu().numpy(),
        zipf=slots["zipf"].cpu().numpy(),
        predictions=pred[:, : max(1, int((pred >= 0).sum(1).max()))],
        labels=slots["labels"].cpu().numpy(),
        seconds=seconds,
        frames=int((pred >= 0).sum()),
    )


def evaluate_sequences(
    model: nn.Module,
    loader: Any,
    env: DistEnv,
    perturbation: str,
    difficulty: int,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    desc: str | None = None,
    progress: bool = True,
    pbar: Any = None,
) -> SequenceResult:
    """Flips and rank distances of every sequence of ``loader`` (a ``SequenceLoader``)."""
    desc = desc or f"{perturbation}/{difficulty}"
    own_bar = pbar is None
    bar = progress_bar(len(loader), desc, env, progress) if own_bar else pbar
    start = time.perf_counter()
    try:
        slots = local_sequence_counts(
            model, loader, env, perturbation, difficulty,
            amp_dtype=amp_dtype, channels_last=channels_last, bar=bar,
        )  # fmt: skip
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
    finally:
        if own_bar:
            bar.close()
    seconds = max_over_ranks(time.perf_counter() - start, env)
    return reduce_sequence_counts(slots, env, desc, seconds)


def _example(res: SequenceResult, loader: Any, classes: list[str]) -> dict[str, Any]:
    """The sequence with the most flips (lowest index on ties): what the flips picture shows."""
    i = int(np.argmax(res.flips))
    preds = [int(p) for p in res.predictions[i] if p >= 0]
    shown = sorted({*preds, int(res.labels[i])})
    return {
        "index": i,
        "path": loader.paths([i])[0],
        "label": int(res.labels[i]),
        "flips": int(res.flips[i]),
        "comparisons": int(res.comparisons[i]),
        "predictions": preds,
        "classes": {str(c): classes[c] for c in shown},
    }


def evaluate_perturbations(
    model: nn.Module,
    env: DistEnv,
    *,
    root: Any,
    classes: list[str],
    perturbations: list[str],
    difficulties: list[int],
    batch_size: int,
    crop_size: int,
    decoder: str = "auto",
    num_threads: int = 2,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    reference: dict | None = None,
    reference_name: str | None = None,
) -> tuple[dict[str, Any], int, float]:
    """The ``imagenet_p`` block of the results, plus (frames evaluated, seconds).

    Layout first (``layouts.check_p_layout``, on every rank), then one ``SequenceLoader`` per
    (perturbation, difficulty) folder; each folder's bar counts batches of sequences.
    """
    from ..data.sequences import SequenceLoader
    from .layouts import check_p_layout

    folders = check_p_layout(root, perturbations, difficulties, classes)
    counts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    examples: dict[str, dict[str, Any]] = {}
    frames, seconds, decoders = 0, 0.0, set()
    for p in perturbations:
        counts[p] = {}
        for d in difficulties:
            loader = SequenceLoader(
                folders[(p, d)], classes, batch_size=batch_size, rank=env.rank,
                world_size=env.world_size, device=env.device, crop_size=crop_size,
                decoder=decoder, num_threads=num_threads,
            )  # fmt: skip
            bar = progress_bar(len(loader), f"{p}/{d}", env, progress, leave=True)
            try:
                res = evaluate_sequences(
                    model, loader, env, p, d, amp_dtype=amp_dtype,
                    channels_last=channels_last, pbar=bar,
                )  # fmt: skip
            finally:
                bar.close()
            counts[p][d] = res.counts()
            frames, seconds = frames + res.frames, seconds + res.seconds
            decoders.add(loader.decoder_name)
            if d == min(difficulties):
                examples[p] = _example(res, loader, classes)
    block = rb.summarize_perturbations(counts, reference, reference_name)
    block.update(
        dataset="ImageNet-P",
        root=str(root),
        difficulties=[int(d) for d in difficulties],
        decoder=sorted(d for d in decoders if d),
        examples=examples,
        units="flip_probability, fr, t5d_rate: percent; top5_distance (0-15), zipf_distance: "
        "mean per comparison",
    )
    return block, frames, seconds
