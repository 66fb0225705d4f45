"""Evaluation of a trained model: clean, ImageNet-C, CIFAR-C and ImageNet-P, into one results dict.

:func:`evaluate_robustness` composes the rooms that do the work, each with one job:

- ``eval_loop``: the one loop (normalise, autocast, model) and the per-image counts;
- ``layouts``: the -C / CIFAR-C / -P tree checks, run before the first image is read;
- ``robustness``: the metrics on counts (mCE, calibration; FP, T5D, mFR, mT5D);
- ``stability``: the per-sequence flips and rank distances of ImageNet-P;
- ``reports``: the headline, markdown tables, --compare and the files on disk.

The names other code imports from here (``evaluate_loader``, ``normalize_uint8``,
``markdown_table``, ``write_reports``, the layout checks, ...) are re-exported, so
``from augmix_gpu.evaluation import ...`` keeps working.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import protocols
from ..distributed import DistEnv
from . import metrics as rb
from .layouts import (
    check_c_layout,
    check_cifar_c_layout,
    check_names,
    check_p_layout,
    dataset_error,
    default_corruptions,
    default_perturbations,
)
from .loop import EvalResult, evaluate_loader, model_outputs, normalize_uint8
from .reports import compare_table, headline, markdown_table, write_reports

__all__ = [
    "EvalResult", "check_c_layout", "check_cifar_c_layout", "check_p_layout", "compare_table",
    "default_corruptions", "default_perturbations", "describe_model", "evaluate_loader",
    "evaluate_robustness", "headline", "markdown_table", "model_outputs", "normalize_uint8",
    "write_reports",
]  # fmt: skip

RESULTS_FORMAT = 1

# Where each item of the reference learnable-severity script's results JSON lives in ours.
REFERENCE_KEYS = {
    "args": "args",
    "clean accuracy": "clean.top1",
    "clean loss": "clean.nll",
    "error per corruption and severity": "imagenet_c.error",
    "mean error per corruption": "imagenet_c.corruption_error",
    "its 'mCE' (unnormalised mean error)": "imagenet_c.mean_corruption_error",
    "mCE (AlexNet-normalised, Hendrycks & Dietterich 2019)": "imagenet_c.mce",
}

OPS_DESCRIPTION = {
    False: "paper's 9 ops (no overlap with ImageNet-C)",
    True: "all 13 ops: adds color, contrast, brightness, sharpness, which overlap ImageNet-C",
}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_model(
    config: dict[str, Any] | None, weights_path: str | os.PathLike | None, **extra: Any
) -> dict:
    """What was evaluated: arch, weights file + SHA-256, and the op set it was trained with."""
    config = config or {}
    all_ops = config.get("all_ops")
    info = {
        "arch": config.get("arch"),
        "weights": str(weights_path) if weights_path else None,
        "sha256": file_sha256(weights_path) if weights_path else None,
        "aug_type": config.get("aug_type"),
        "all_ops": all_ops,
        "ops": OPS_DESCRIPTION.get(all_ops, "unknown (not recorded in the checkpoint)"),
    }
    info.update(extra)
    return info


def _loader_device(env: DistEnv, device_kind: str) -> str:
    if device_kind == "auto":
        return "gpu" if env.device.type == "cuda" else "cpu"
    return {"cuda": "gpu"}.get(device_kind, device_kind)


def evaluate_robustness(
    model: nn.Module,
    env: DistEnv,
    *,
    classes: Sequence[str],
    val_dir: str | os.PathLike | None = None,
    imagenet_c_dir: str | os.PathLike | None = None,
    cifar_c: str | os.PathLike | None = None,
    cifar_dir: str | os.PathLike | None = None,
    cifar_name: str = "cifar10",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    c_resize: int | None = None,
    batch_size: int = 128,
    device_kind: str = "auto",
    num_threads: int = 2,
    crop_size: int = 224,
    resize_size: int = 256,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    extra_info: dict[str, Any] | None = None,
    imagenet_p_dir: str | os.PathLike | None = None,
    perturbations: Sequence[str] | None = None,
    p_difficulties: Sequence[int] | None = None,
    p_batch_size: int | None = None,
    p_decoder: str = "auto",
    p_reference: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Clean + corrupted + perturbed evaluation; the results JSON content (identical on every rank).

    ``val_dir``: clean ImageNet-layout folder (resize ``resize_size`` + centre crop ``crop_size``).
    ``imagenet_c_dir``: ``corruption/severity/class/file`` (JPEGs as is + centre crop, or
    ``c_resize`` first, as the official augmix imagenet.py does). ``cifar_c``: CIFAR-10-C/100-C
    ``.npy`` folder; ``cifar_dir``: the CIFAR root for the clean test split. ``imagenet_p_dir``:
    ``perturbation[_difficulty]/class/name.mp4`` (frames as stored + centre crop), read
    ``p_batch_size`` sequences at a time (default: enough for ~``batch_size`` frames) with
    ``p_decoder`` (``data.video``); ``p_reference``: a results JSON whose -P figures normalise FR.
    """
    from tqdm.auto import tqdm

    from ..data import build_loader, load_cifar, load_cifar_c

    if not (val_dir or imagenet_c_dir or cifar_c or cifar_dir or imagenet_p_dir):
        raise ValueError(
            "nothing to evaluate: pass val_dir, imagenet_c_dir, cifar_c, cifar_dir or imagenet_p_dir"
        )
    if imagenet_c_dir and cifar_c:
        raise ValueError("evaluate ImageNet-C and CIFAR-C in separate runs (different models)")
    classes = list(classes)
    sevs = [int(s) for s in (severities or protocols.SEVERITIES)]
    check_names([str(s) for s in sevs], [str(s) for s in protocols.SEVERITIES], "severity")
    c_root = imagenet_c_dir or cifar_c
    corrs: list[str] = []
    if c_root:
        corrs = list(corruptions) if corruptions else default_corruptions(c_root)
        check_names(corrs, [*protocols.CORRUPTIONS, *protocols.EXTRA_CORRUPTIONS], "corruption")
        # Layout first, on every rank (cheap), so all ranks fail alike and before any compute.
        if imagenet_c_dir:
            check_c_layout(imagenet_c_dir, corrs, sevs, classes)
        else:
            check_cifar_c_layout(cifar_c, corrs)
    perts: list[str] = []
    diffs = [int(d) for d in (p_difficulties or (protocols.HEADLINE_DIFFICULTY,))]
    reference = None
    if imagenet_p_dir:
        perts = list(perturbations) if perturbations else default_perturbations(imagenet_p_dir)
        check_names(
            perts, [*protocols.PERTURBATIONS, *protocols.EXTRA_PERTURBATIONS], "perturbation"
        )
        check_names([str(d) for d in diffs], [str(d) for d in protocols.DIFFICULTIES], "difficulty")
        check_p_layout(imagenet_p_dir, perts, diffs, classes)
        if p_reference:
            reference = _load_p_reference(p_reference)

    dev = _loader_device(env, device_kind)
    loader_kw = dict(
        batch_size=batch_size, device=dev, rank=env.rank, world_size=env.world_size,
        crop_size=crop_size, resize_size=resize_size, num_threads=num_threads,
    )  # fmt: skip
    run = dict(amp_dtype=amp_dtype, channels_last=channels_last)
    results: dict[str, Any] = {"format_version": RESULTS_FORMAT}
    results.update(extra_info or {})
    results["units"] = (
        "errors, accuracies, CE, mCE, calibration errors, flip probabilities, FR, mFR, mT5D: "
        "percent; nll: nats; top-5 / Zipf distances: per comparison"
    )
    results["preprocessing"] = {
        "clean": f"resize shorter side {resize_size} + centre crop {crop_size}"
        if val_dir
        else ("as stored (32x32 arrays)" if cifar_dir else None),
        "corrupted": (
            f"resize shorter side {c_resize} + centre crop {crop_size} (official augmix imagenet.py)"
            if c_resize
            else f"as stored + centre crop {crop_size} (hendrycks/robustness)"
        )
        if imagenet_c_dir
        else ("as stored (32x32 arrays)" if cifar_c else None),
        # CIFAR arrays are read as stored: no crop or resize to report for them
        **(
            {"crop_size": crop_size, "resize_size": resize_size, "c_resize": c_resize}
            if (val_dir or imagenet_c_dir or imagenet_p_dir)
            else {}
        ),
        "normalization": "ImageNet mean/std on [0,1] RGB",
    }
    if imagenet_p_dir:
        results["preprocessing"]["perturbed"] = (
            f"frames as stored + centre crop {crop_size} (hendrycks/robustness ImageNet-P/test.py "
            "reads the 224 px frames as they are)"
        )
    results["run"] = {
        "world_size": env.world_size,
        "device": str(env.device.type),
        "loader_device": dev,
        "precision": {None: "32", torch.float16: "16", torch.bfloat16: "bf16"}[amp_dtype],
        "batch_size_per_rank": batch_size,
        "torch": torch.__version__,
    }
    total_images, total_seconds = 0, 0.0
    clean_error = None

    if val_dir or cifar_dir:
        if val_dir:
            loader = build_loader(val_dir, "val", classes=classes, **loader_kw)
        else:
            arrays = load_cifar(cifar_dir, cifar_name, train=False)
            _check_cifar_classes(arrays.classes, classes, cifar_dir)
            loader = build_loader(arrays, "val", **loader_kw)
        clean = evaluate_loader(model, loader, env, desc="clean", progress=progress, **run)
        results["clean"] = clean.summary()
        clean_error = clean.error
        total_images, total_seconds = total_images + clean.n, total_seconds + clean.seconds

    if c_root:
        counts: dict[str, dict[int, tuple[int, int]]] = {}
        calib: dict[str, dict[str, dict[str, float]]] = {"rms_calibration_error": {}, "ece": {}}
        nll: dict[str, dict[str, float]] = {}
        for c in corrs:
            counts[c], nll[c] = {}, {}
            calib["rms_calibration_error"][c], calib["ece"][c] = {}, {}
            loaders = []
            for s in sevs:
                if imagenet_c_dir:
                    src = Path(imagenet_c_dir) / c / str(s)
                    loaders.append(
                        build_loader(
                            src, "corrupted", classes=classes, c_resize=c_resize, **loader_kw
                        )
                    )
                else:
                    arrays = load_cifar_c(cifar_c, c, s, classes=classes)
                    if len(arrays.labels) and int(arrays.labels.max()) >= len(classes):
                        raise dataset_error(
                            f"{cifar_c}/labels.npy has label {int(arrays.labels.max())} but the model "
                            f"has {len(classes)} classes: is --cifar_name {cifar_name!r} right?"
                        )
                    loaders.append(build_loader(arrays, "corrupted", **loader_kw))
            bar = tqdm(
                total=sum(len(ld) for ld in loaders), desc=c, leave=True,
                disable=not (progress and env.is_main),
            )  # fmt: skip
            try:
                for s, loader in zip(sevs, loaders):
                    bar.set_postfix_str(f"severity {s}")
                    r = evaluate_loader(model, loader, env, desc=f"{c}/{s}", pbar=bar, **run)
                    counts[c][s] = (r.n - r.correct1, r.n)
                    nll[c][str(s)] = r.nll
                    cal = r.calibration()
                    calib["rms_calibration_error"][c][str(s)] = cal["rms_calibration_error"]
                    calib["ece"][c][str(s)] = cal["ece"]
                    total_images, total_seconds = total_images + r.n, total_seconds + r.seconds
            finally:
                bar.close()
        key = "imagenet_c" if imagenet_c_dir else "cifar_c"
        summary = rb.summarize_corruptions(counts, clean_error, normalise=bool(imagenet_c_dir))
        main = [c for c in corrs if c in protocols.CORRUPTIONS]
        for name, table in calib.items():
            summary.setdefault("calibration", {})[name] = table
            if main:
                summary["calibration"][f"mean_{name}"] = float(
                    np.mean([np.mean(list(table[c].values())) for c in main])
                )
        summary["nll"] = nll
        summary["severities"] = sevs
        summary["dataset"] = "ImageNet-C" if imagenet_c_dir else f"{cifar_name.upper()}-C"
        summary["root"] = str(c_root)
        results[key] = summary

    if imagenet_p_dir:
        from .imagenet_p import evaluate_perturbations

        # ImageNet-P sequences hold 31 frames (41 for translate): default to ~batch_size frames.
        seqs = p_batch_size or max(1, batch_size // 31)
        block, frames, seconds = evaluate_perturbations(
            model, env, root=imagenet_p_dir, classes=classes, perturbations=perts,
            difficulties=diffs, batch_size=seqs, crop_size=crop_size, decoder=p_decoder,
            num_threads=num_threads, progress=progress,
            reference=reference, reference_name=str(p_reference) if p_reference else None, **run,
        )  # fmt: skip
        results["imagenet_p"] = block
        results["run"]["p_sequences_per_batch"] = seqs
        total_images, total_seconds = total_images + frames, total_seconds + seconds

    results["run"]["images"] = total_images
    results["run"]["seconds"] = total_seconds
    results["run"]["images_per_s"] = total_images / total_seconds if total_seconds > 0 else None
    results["reference_keys"] = REFERENCE_KEYS
    return results


def _load_p_reference(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The normalising FP / T5D per perturbation from a results JSON (``--p_reference``)."""
    import json

    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--p_reference {str(path)!r}: cannot read it ({e})") from None
    try:
        return rb.reference_from_results(results)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--p_reference {str(path)!r}: {e}") from None


def _check_cifar_classes(found: Sequence[str], classes: Sequence[str], root: Any) -> None:
    if list(found) != list(classes):
        raise dataset_error(
            f"the CIFAR classes in {str(root)!r} ({list(found)[:3]}..., {len(found)}) differ from the "
            f"model's ({list(classes)[:3]}..., {len(classes)}): check --cifar_name"
        )
