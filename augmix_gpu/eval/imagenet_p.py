"""ImageNet-P: per-sequence flips and rank distances on the device, and the run over a -P tree.

Layout ``root/<perturbation>[_<difficulty>]/<class>/<name>.mp4`` (10 perturbations + 4 validation
ones; only the noise perturbations have ``_2`` / ``_3`` folders), checked once before any frame is
decoded; one ``SequenceLoader`` per (perturbation, difficulty) folder, a rank owning whole
sequences. ``metrics.summarize_perturbations`` turns the per-sequence counts into FP, T5D, FR, mFR.

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

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import protocols
from ..distributed import DistEnv, all_gather_objects, all_reduce_sum
from . import metrics as rb
from .benchmark import Benchmark, Outcome, compare_row, fmt, row
from .layouts import check_class_folders, check_names, check_root, dataset_error
from .loop import Context, max_over_ranks, model_outputs, progress_bar
from .settings import DataSettings


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
    counted: np.ndarray | None = None  # [N] bool: False for a sequence skipped as undecodable

    def counts(self) -> dict[str, np.ndarray]:
        """Per-sequence counts of the sequences counted (skipped ones weigh nothing)."""
        keep = slice(None) if self.counted is None else self.counted
        return {"flips": self.flips[keep], "comparisons": self.comparisons[keep],
                "top5": self.top5[keep], "zipf": self.zipf[keep]}  # fmt: skip


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
    normalization: str = "imagenet",
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
    run = model_outputs(model, loader, env, amp_dtype=amp_dtype, channels_last=channels_last,
                        bar=bar, normalization=normalization)  # fmt: skip
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
    slots: dict[str, Tensor],
    env: DistEnv,
    desc: str,
    seconds: float = 0.0,
    skipped: Sequence[int] = (),
) -> SequenceResult:
    """All-reduce the slots and check that each sequence was counted exactly once (``skipped``:
    this rank's sequences left out as undecodable, counted never; zero counts, so no flips)."""
    for t in slots.values():
        all_reduce_sum(t, env)
    left_out = [i for rank in all_gather_objects(list(skipped), env) for i in rank]
    seen = slots["seen"].cpu().numpy()
    want = np.ones_like(seen)
    want[left_out] = 0
    wrong = np.flatnonzero(seen != want)
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
        counted=want.astype(bool),
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
    normalization: str = "imagenet",
    skipped: Sequence[int] = (),
) -> SequenceResult:
    """Flips and rank distances of every sequence of ``loader`` (a ``SequenceLoader``);
    ``skipped``: the sequences this rank left out of it (undecodable)."""
    desc = desc or f"{perturbation}/{difficulty}"
    own_bar = pbar is None
    bar = progress_bar(len(loader), desc, env, progress) if own_bar else pbar
    start = time.perf_counter()
    try:
        slots = local_sequence_counts(
            model, loader, env, perturbation, difficulty,
            amp_dtype=amp_dtype, channels_last=channels_last, bar=bar, normalization=normalization,
        )  # fmt: skip
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
    finally:
        if own_bar:
            bar.close()
    seconds = max_over_ranks(time.perf_counter() - start, env)
    return reduce_sequence_counts(slots, env, desc, seconds, skipped)


# --- layout --------------------------------------------------------------------------------------


def default_perturbations(root: str | os.PathLike) -> list[str]:
    """The 10 perturbations, plus each of the 4 validation ones whose folder is present."""
    root = Path(root)
    return [
        *protocols.PERTURBATIONS,
        *[p for p in protocols.EXTRA_PERTURBATIONS if (root / p).is_dir()],
    ]


def present_perturbations(root: str | os.PathLike) -> list[str]:
    """The perturbations (of the 14) whose folder exists: what the trainer's end-of-run
    evaluation reads from a given tree (fewer than the 10 is reported as partial)."""
    root = Path(root)
    if not root.is_dir():
        raise dataset_error(f"ImageNet-P root {str(root)!r} is not a folder (--imagenet_p)")
    found = [
        p for p in (*protocols.PERTURBATIONS, *protocols.EXTRA_PERTURBATIONS) if (root / p).is_dir()
    ]
    if not found:
        present = sorted(x.name for x in root.iterdir() if x.is_dir())
        raise dataset_error(
            f"{str(root)!r} holds no perturbation folder (found {present[:20]}): expected some of "
            f"{list(protocols.PERTURBATIONS)}"
        )
    return found


def check_p_layout(
    root: str | os.PathLike,
    perturbations: Sequence[str],
    difficulties: Sequence[int],
    classes: Sequence[str] | None,
) -> dict[tuple[str, int], Path]:
    """Check ``root/<perturbation>[_<difficulty>]/<class>/<name>.mp4``; return each folder.

    The ``_<difficulty>`` suffix exists for the noise perturbations only (difficulty 1 has none);
    the others are read from the one folder at every difficulty, which sets the comparison step
    (hendrycks/robustness ImageNet-P/test.py).
    """
    from ..data.video import VIDEO_EXTENSIONS

    layout = "<perturbation>[_<difficulty>]/<class>/<name>.mp4 (e.g. .../ImageNet-P)"
    root = check_root(root, "ImageNet-P", layout)
    known = set(classes) if classes is not None else None
    folders: dict[tuple[str, int], Path] = {}
    for p in perturbations:
        for d in difficulties:
            folder = root / protocols.perturbation_folder(p, int(d))
            if not folder.is_dir():
                present = sorted(x.name for x in root.iterdir() if x.is_dir())
                raise dataset_error(
                    f"missing perturbation folder {str(folder)!r} (found {present[:20]}): "
                    "download/extract it, or evaluate a subset with --perturbations / "
                    "--p_difficulties (reported as partial, not as mFR)"
                )
            if folder not in folders.values():
                check_class_folders(
                    folder, known, VIDEO_EXTENSIONS, "<perturbation>/<class>/<name>.mp4"
                )
            folders[(p, int(d))] = folder
    return folders


def load_reference(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The normalising FP / T5D per perturbation from a results JSON (``--p_reference``)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--p_reference {str(path)!r}: cannot read it ({e})") from None
    try:
        return rb.reference_from_results(results)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--p_reference {str(path)!r}: {e}") from None


@dataclass(frozen=True)
class PPlan:
    """What a -P evaluation reads: the folder of each (perturbation, difficulty), and how."""

    root: Path
    folders: dict[tuple[str, int], Path]
    perturbations: list[str]
    difficulties: list[int]
    classes: list[str]
    sequences_per_batch: int | None  # None: ~batch frames (ImageNet-P sequences hold 31 or 41)
    decoder: str
    reference: dict | None  # FP / T5D per perturbation that FR divides by (None: AlexNet's)
    reference_name: str | None


def check_layout(root: Path, classes: list[str], options: DataSettings) -> PPlan:
    perts = list(options.perturbations) or default_perturbations(root)
    check_names(perts, [*protocols.PERTURBATIONS, *protocols.EXTRA_PERTURBATIONS], "perturbation")
    diffs = [int(d) for d in (options.p_difficulties or (protocols.HEADLINE_DIFFICULTY,))]
    check_names([str(d) for d in diffs], [str(d) for d in protocols.DIFFICULTIES], "difficulty")
    folders = check_p_layout(root, perts, diffs, classes)
    ref = options.p_reference
    return PPlan(
        Path(root), folders, perts, diffs, list(classes), options.p_batch, options.p_decoder,
        load_reference(ref) if ref else None, str(ref) if ref else None,
    )  # fmt: skip


def class_folder(root: Path, options: DataSettings) -> Path:
    return Path(root) / (options.perturbations or protocols.PERTURBATIONS)[0]


# --- the sequences through the one loop ------------------------------------------------------------


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


def evaluate_folder(
    model: nn.Module, context: Context, plan: PPlan, p: str, d: int, seqs: int
) -> tuple[SequenceResult, Any]:
    """One (perturbation, difficulty) folder; its bar counts batches of sequences. A video that
    cannot be decoded stops it (``--on_corrupt error``: the error names it), or is found, left
    out and named (``skip``), and this rank's share is evaluated again without it."""
    from ..data import DatasetError
    from ..data.sequences import SequenceLoader

    env = context.env
    loader = SequenceLoader(
        plan.folders[(p, d)], plan.classes, batch_size=seqs, rank=env.rank,
        world_size=env.world_size, device=env.device, crop_size=context.crop_size,
        decoder=plan.decoder, num_threads=context.num_threads,
    )  # fmt: skip
    skipped: list[int] = []
    while True:
        bar = progress_bar(len(loader), f"{p}/{d}", env, context.progress, leave=True)
        try:
            res = evaluate_sequences(
                model, loader, env, p, d, amp_dtype=context.amp_dtype,
                channels_last=context.channels_last, pbar=bar,
                normalization=context.normalization, skipped=skipped,
            )  # fmt: skip
            return res, loader
        except DatasetError:
            bad = [] if context.on_corrupt == "error" else undecodable(loader)
            if not bad:
                raise
            warnings.warn(f"skipping undecodable video(s): {loader.paths(bad)}", stacklevel=2)
            skipped += bad
            context.skipped.extend(loader.paths(bad))
            loader.own = np.array([i for i in loader.own if i not in set(bad)], dtype=np.int64)
        finally:
            bar.close()


def undecodable(loader: Any) -> list[int]:
    """The sequences of this rank's share that PyAV cannot decode, tried one by one."""
    from ..data import DatasetError
    from ..data.video import build_decoder

    decoder = build_decoder("cpu", device=torch.device("cpu"), batch_size=1, num_threads=1)
    bad = []
    try:
        for i in loader.own:
            try:
                decoder.decode(loader.paths([i]))
            except DatasetError:
                bad.append(int(i))
    finally:
        decoder.close()
    return bad


def evaluate(model: nn.Module, context: Context, plan: PPlan) -> Outcome:
    """The ``imagenet_p`` block: counts per (perturbation, difficulty), summarised."""
    seqs = plan.sequences_per_batch or max(1, context.batch_size // 31)
    counts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    examples: dict[str, dict[str, Any]] = {}
    frames, seconds, decoders = 0, 0.0, set()
    for p in plan.perturbations:
        counts[p] = {}
        for d in plan.difficulties:
            res, loader = evaluate_folder(model, context, plan, p, d, seqs)
            counts[p][d] = res.counts()
            frames, seconds = frames + res.frames, seconds + res.seconds
            decoders.add(loader.decoder_name)
            if d == min(plan.difficulties):
                examples[p] = _example(res, loader, plan.classes)
    block = rb.summarize_perturbations(counts, plan.reference, plan.reference_name)
    block.update(
        dataset="ImageNet-P", root=str(plan.root), difficulties=plan.difficulties,
        decoder=sorted(d for d in decoders if d), examples=examples,
        units="flip_probability, fr, t5d_rate: percent; top5_distance (0-15), zipf_distance: "
        "mean per comparison",
    )  # fmt: skip
    read = (
        f"frames as stored + centre crop {context.crop_size} (hendrycks/robustness "
        "ImageNet-P/test.py reads the 224 px frames as they are)"
    )
    return Outcome(
        block, frames, seconds, preprocessing={"perturbed": read},
        run={"p_sequences_per_batch": seqs},
    )  # fmt: skip


# --- reports (from the block alone) -------------------------------------------------------------


def headline(p: dict) -> dict[str, float | None]:
    """mFR / mT5D where normalised, the unnormalised means always."""
    return {
        "mFR": p.get("mfr"),
        "mFR (partial)": p.get("mfr_partial"),
        "mT5D": p.get("mt5d"),
        "mT5D (partial)": p.get("mt5d_partial"),
        "mean flip prob. (unnorm.)": p.get("mean_flip_probability"),
        "mean flip prob. (partial)": p.get("mean_flip_probability_partial"),
        "mean top-5 dist. (unnorm.)": p.get("mean_top5_distance"),
        "mean top-5 dist. (partial)": p.get("mean_top5_distance_partial"),
    }


def report_lines(p: dict) -> list[str]:
    """One row per (perturbation, difficulty); FR and T5D rate at the headline difficulty."""
    norm = p.get("normalisation") or {}
    ref = norm.get("reference") or "AlexNet"
    lines = [
        "",
        f"ImageNet-P: flip probability FP (%), top-5 distance T5D and Zipf distance per comparison; "
        f"FR and T5D rate = 100 x value / {ref}'s (difficulty {p.get('difficulty', 1)})",
        "",
        "| perturbation | difficulty | sequences | FP | FR | T5D | T5D rate | Zipf |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    head = str(p.get("difficulty", 1))
    for name in p["perturbations"]:
        label = name + ("" if name in protocols.PERTURBATIONS else " (validation)")
        for d, fp in p["flip_probability"][name].items():
            fr = p.get("fr", {}).get(name) if d == head else None
            t5r = p.get("t5d_rate", {}).get(name) if d == head else None
            lines.append(row([label, d, str(p["counts"][name][d]["sequences"]), fmt(fp), fmt(fr),
                              fmt(p["top5_distance"][name][d], 3), fmt(t5r),
                              fmt(p["zipf_distance"][name][d], 4)]))  # fmt: skip
    if not norm.get("available", False):
        lines += ["", f"FR / mFR / mT5D unavailable: {norm.get('reason')}."]
    if p.get("partial"):
        lines += [
            "",
            f"**Partial** ({p['partial_reason']}): not an mFR; means cover what was evaluated.",
        ]
    return lines


def compare_lines(pa: dict, pb: dict) -> list[str]:
    """FR per perturbation where both are normalised, else FP, at the headline difficulty."""
    d = str(protocols.HEADLINE_DIFFICULTY)
    both_fr = all(x.get("fr") for x in (pa, pb))
    lines = []
    for name in [p for p in pa["perturbations"] if p in pb["perturbations"]]:
        if both_fr and name in pa["fr"] and name in pb["fr"]:
            va, vb, label = pa["fr"][name], pb["fr"][name], "FR"
        else:
            va = pa["flip_probability"][name].get(d)
            vb = pb["flip_probability"][name].get(d)
            label = "FP"
        if va is not None and vb is not None:
            lines.append(compare_row(f"{label} {name}", va, vb))
    if pa.get("partial") or pb.get("partial"):
        lines.append("| (partial: not an mFR) | | | |")
    return lines


def pictures(results: dict, out: Path, stem: str) -> dict[str, Path]:
    """``<stem>_flips.png``: each perturbation's most-flipping sequence (re-read from its video)."""
    import warnings

    if not (results.get("imagenet_p") or {}).get("examples"):
        return {}
    try:
        from .plots import plot_sequence_flips

        crop = (results.get("preprocessing") or {}).get("crop_size") or 224
        return {"flips": plot_sequence_flips(results, out / f"{stem}_flips.png", crop)}
    except (ImportError, ValueError) as e:  # no matplotlib, or the videos moved away
        warnings.warn(f"flips picture not written: {e}", stacklevel=2)
        return {}


BENCHMARK = Benchmark(
    name="imagenet_p",
    title="ImageNet-P",
    help="ImageNet-P root: <perturbation>[_<difficulty>]/<class>/<name>.mp4",
    check_layout=check_layout,
    evaluate=evaluate,
    headline=headline,
    report_lines=report_lines,
    compare_lines=compare_lines,
    pictures=pictures,
    class_folder=class_folder,
)
