"""Evaluation engine shared by evaluate.py and train.py: clean, ImageNet-C and CIFAR-C, exact counts.

Every image is counted exactly once whatever the world size: the loaders shard by global rank and
pad the last batch with ``valid=False`` slots (DALI issue #4199: padded samples counted twice),
this module masks them, and ranks all-reduce *counts* (torchvision's references do the same), then
check the total against the dataset size. Per-sample confidences are gathered too, so the
calibration metrics are identical on every rank and independent of the rank layout.

The layout of an ImageNet-C tree is checked before the first image is read
(:func:`check_c_layout`): a typo in a path should cost seconds, not a night of evaluation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import robustness as rb
from .distributed import DistEnv, all_gather_cat, all_reduce_sum

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
    from .augmix import normalize_images

    return normalize_images(images)


def _max_over_ranks(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


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
    from tqdm.auto import tqdm

    model.eval()
    device = env.device
    counts = torch.zeros(3, dtype=torch.long, device=device)  # n, correct@1, correct@5
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Per batch: full-length tensors and the mask, filtered once at the end. Boolean indexing
    # (`conf[valid]`) would cost a host sync per batch (its output size is data-dependent).
    confs: list[Tensor] = []
    corrs: list[Tensor] = []
    valids: list[Tensor] = []
    own_bar = pbar is None
    bar = (
        tqdm(total=len(loader), desc=desc, disable=not (progress and env.is_main), leave=False)
        if own_bar
        else pbar
    )
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for images, labels, valid in loader.epoch(0):
                images, labels, valid = images.to(device), labels.to(device), valid.to(device)
                x = normalize_uint8(images)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    logits = model(x)
                logits = logits.float()
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
                bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if own_bar:
            bar.close()
    seconds = _max_over_ranks(time.perf_counter() - start, env)
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


# ----------------------------------------------------------------------------- layout checks


def _dataset_error(message: str) -> Exception:
    from .data import DatasetError

    return DatasetError(message)


def _check_names(names: Sequence[str], known: Sequence[str], what: str) -> None:
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown {what} {name!r}{hint}: expected some of {list(known)}")


def default_corruptions(root: str | os.PathLike) -> list[str]:
    """The 15 corruptions, plus each of the 4 extras whose folder (or .npy) is present."""
    root = Path(root)
    extras = [
        c for c in rb.EXTRA_CORRUPTIONS if (root / c).is_dir() or (root / f"{c}.npy").is_file()
    ]
    return [*rb.CORRUPTIONS, *extras]


def check_c_layout(
    root: str | os.PathLike,
    corruptions: Sequence[str],
    severities: Sequence[int],
    classes: Sequence[str] | None,
) -> None:
    """Raise a ``DatasetError`` naming the path for the first structural problem of a -C tree.

    Checks ``root/<corruption>/<severity>/<class>/<image>``: every requested corruption and severity
    folder exists, holds class folders, each class folder is one of ``classes`` (the checkpoint's)
    and holds at least one file. Cheap (directory listings only); the per-file header scan happens
    when each loader is built.
    """
    root = Path(root)
    if not root.is_dir():
        raise _dataset_error(
            f"ImageNet-C root {str(root)!r} is not a folder: pass the folder that holds "
            "<corruption>/<severity>/<class>/<image> (e.g. .../ImageNet-C)"
        )
    known = set(classes) if classes is not None else None
    for c in corruptions:
        cdir = root / c
        if not cdir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise _dataset_error(
                f"missing corruption folder {str(cdir)!r} (found {present[:20]}): download/extract "
                f"it, or evaluate a subset with --corruptions (reported as partial, not as mCE)"
            )
        for s in severities:
            sdir = cdir / str(int(s))
            if not sdir.is_dir():
                raise _dataset_error(
                    f"missing severity folder {str(sdir)!r}: ImageNet-C holds severities 1-5 per "
                    "corruption; re-extract it, or pass --severities (reported as partial)"
                )
            class_dirs = sorted(e.name for e in os.scandir(sdir) if e.is_dir())
            if not class_dirs:
                raise _dataset_error(
                    f"empty folder {str(sdir)!r}: expected one sub-folder per class "
                    "(<corruption>/<severity>/<class>/<image>); re-extract the archive"
                )
            if known is not None:
                unknown = [d for d in class_dirs if d not in known]
                if unknown:
                    raise _dataset_error(
                        f"class folder(s) {unknown[:5]} in {str(sdir)!r} are not among the model's "
                        f"{len(known)} classes (first: {sorted(known)[:3]}): evaluate with the "
                        "checkpoint the data belongs to, or remove folders that are not classes"
                    )
            for d in class_dirs:
                with os.scandir(sdir / d) as it:
                    if not any(e.is_file() and not e.name.startswith(".") for e in it):
                        raise _dataset_error(
                            f"empty class folder {str(sdir / d)!r}: it holds no images; "
                            "re-extract it or remove the folder"
                        )


def check_cifar_c_layout(root: str | os.PathLike, corruptions: Sequence[str]) -> None:
    """Every ``<corruption>.npy`` and ``labels.npy`` present with matching lengths."""
    root = Path(root)
    if not root.is_dir():
        raise _dataset_error(
            f"CIFAR-C folder {str(root)!r} does not exist (it holds <corruption>.npy)"
        )
    labels = root / "labels.npy"
    if not labels.is_file():
        raise _dataset_error(
            f"missing {str(labels)!r}: pass the extracted CIFAR-10-C / CIFAR-100-C folder"
        )
    n = np.load(labels, mmap_mode="r").shape[0]
    for c in corruptions:
        path = root / f"{c}.npy"
        if not path.is_file():
            raise _dataset_error(
                f"missing {str(path)!r}: re-extract CIFAR-C, or evaluate a subset with --corruptions"
            )
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] != n or shape[0] % 5:
            raise _dataset_error(
                f"{str(path)!r} holds {shape[0]} images, labels.npy {n}; expected 5 x N"
            )


# ----------------------------------------------------------------------------- the engine


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
) -> dict[str, Any]:
    """Clean + corrupted evaluation; returns the results JSON content (identical on every rank).

    ``val_dir``: clean ImageNet-layout folder (resize ``resize_size`` + centre crop ``crop_size``).
    ``imagenet_c_dir``: ``corruption/severity/class/file`` (JPEGs as is + centre crop, or
    ``c_resize`` first, as the official augmix imagenet.py does). ``cifar_c``: CIFAR-10-C/100-C
    ``.npy`` folder; ``cifar_dir``: the CIFAR root for the clean test split.
    """
    from tqdm.auto import tqdm

    from .data import build_loader, load_cifar, load_cifar_c

    if not (val_dir or imagenet_c_dir or cifar_c or cifar_dir):
        raise ValueError("nothing to evaluate: pass val_dir, imagenet_c_dir, cifar_c or cifar_dir")
    if imagenet_c_dir and cifar_c:
        raise ValueError("evaluate ImageNet-C and CIFAR-C in separate runs (different models)")
    classes = list(classes)
    sevs = [int(s) for s in (severities or rb.SEVERITIES)]
    _check_names([str(s) for s in sevs], [str(s) for s in rb.SEVERITIES], "severity")
    c_root = imagenet_c_dir or cifar_c
    corrs: list[str] = []
    if c_root:
        corrs = list(corruptions) if corruptions else default_corruptions(c_root)
        _check_names(corrs, [*rb.CORRUPTIONS, *rb.EXTRA_CORRUPTIONS], "corruption")
        # Layout first, on every rank (cheap), so all ranks fail alike and before any compute.
        if imagenet_c_dir:
            check_c_layout(imagenet_c_dir, corrs, sevs, classes)
        else:
            check_cifar_c_layout(cifar_c, corrs)

    dev = _loader_device(env, device_kind)
    loader_kw = dict(
        batch_size=batch_size, device=dev, rank=env.rank, world_size=env.world_size,
        crop_size=crop_size, resize_size=resize_size, num_threads=num_threads,
    )  # fmt: skip
    run = dict(amp_dtype=amp_dtype, channels_last=channels_last)
    results: dict[str, Any] = {"format_version": RESULTS_FORMAT}
    results.update(extra_info or {})
    results["units"] = "errors, accuracies, CE, mCE, calibration errors: percent; nll: nats"
    results["preprocessing"] = {
        "clean": f"resize shorter side {resize_size} + centre crop {crop_size}",
        "corrupted": (
            f"resize shorter side {c_resize} + centre crop {crop_size} (official augmix imagenet.py)"
            if c_resize
            else f"as stored + centre crop {crop_size} (hendrycks/robustness)"
        )
        if imagenet_c_dir
        else "as stored (32x32 arrays)",
        "crop_size": crop_size,
        "resize_size": resize_size,
        "c_resize": c_resize,
        "normalization": "ImageNet mean/std on [0,1] RGB",
    }
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
                        raise _dataset_error(
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
        main = [c for c in corrs if c in rb.CORRUPTIONS]
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

    results["run"]["images"] = total_images
    results["run"]["seconds"] = total_seconds
    results["run"]["images_per_s"] = total_images / total_seconds if total_seconds > 0 else None
    results["reference_keys"] = REFERENCE_KEYS
    return results


def _check_cifar_classes(found: Sequence[str], classes: Sequence[str], root: Any) -> None:
    if list(found) != list(classes):
        raise _dataset_error(
            f"the CIFAR classes in {str(root)!r} ({list(found)[:3]}..., {len(found)}) differ from the "
            f"model's ({list(classes)[:3]}..., {len(classes)}): check --cifar_name"
        )


# ----------------------------------------------------------------------------- reports


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def _c_block(results: dict) -> tuple[str | None, dict | None]:
    for key in ("imagenet_c", "cifar_c"):
        if key in results:
            return key, results[key]
    return None, None


def headline(results: dict) -> dict[str, float | None]:
    """The handful of numbers a comparison is about (None where not evaluated)."""
    clean = results.get("clean", {})
    _, c = _c_block(results)
    c = c or {}
    cal = c.get("calibration", {})
    return {
        "clean error": clean.get("error"),
        "clean top-5 error": clean.get("top5_error"),
        "clean NLL": clean.get("nll"),
        "clean RMS calib. error": clean.get("rms_calibration_error"),
        "clean ECE": clean.get("ece"),
        "mCE": c.get("mce"),
        "mCE (partial)": c.get("mce_partial"),
        "relative mCE": c.get("relative_mce"),
        "mean corruption error (unnorm.)": c.get("mean_corruption_error"),
        "mean corruption error (partial)": c.get("mean_corruption_error_partial"),
        "C RMS calib. error": cal.get("mean_rms_calibration_error"),
        "C ECE": cal.get("mean_ece"),
    }


def markdown_table(results: dict) -> str:
    """Headline numbers, then error per corruption x severity with CE / relative CE columns."""
    name = (
        (results.get("model") or {}).get("name")
        or (results.get("model") or {}).get("weights")
        or "model"
    )
    lines = [f"### {name}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in headline(results).items() if v is not None]
    key, c = _c_block(results)
    if c is not None:
        sevs = c["severities"]
        has_ce = "ce" in c
        head = ["corruption", *[f"s{s}" for s in sevs], "mean"] + (
            ["CE", "rel. CE"] if has_ce else []
        )
        lines += [
            "",
            f"{c['dataset']} top-1 error (%) by severity"
            + ("; CE = 100 x error / AlexNet's" if has_ce else ""),
            "",
        ]
        lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for corr in c["corruptions"]:
            row = [corr + ("" if corr in rb.CORRUPTIONS else " (extra)")]
            row += [_fmt(c["error"][corr].get(str(s))) for s in sevs]
            row.append(_fmt(c["corruption_error"][corr]))
            if has_ce:
                row += [_fmt(c["ce"].get(corr)), _fmt(c.get("relative_ce", {}).get(corr))]
            lines.append("| " + " | ".join(row) + " |")
        if c.get("partial"):
            lines += [
                "",
                f"**Partial** ({c['partial_reason']}): not an mCE; means cover what was evaluated.",
            ]
    if "model" in results and results["model"].get("ops"):
        lines += [
            "",
            f"Trained with: aug_type={results['model'].get('aug_type')}, ops: {results['model']['ops']}.",
        ]
    pre = results.get("preprocessing", {})
    if pre:
        lines += [f"Preprocessing: clean {pre.get('clean')}; corrupted {pre.get('corrupted')}."]
    return "\n".join(lines) + "\n"


def compare_table(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Side by side: headline numbers, then per-corruption CE (or error) of two results, with B - A."""
    lines = [
        f"| metric | {names[0]} | {names[1]} | {names[1]} - {names[0]} |",
        "|---|---:|---:|---:|",
    ]
    ha, hb = headline(a), headline(b)
    for k in ha:
        va, vb = ha[k], hb[k]
        if va is None and vb is None:
            continue
        diff = vb - va if va is not None and vb is not None else None
        lines.append(f"| {k} | {_fmt(va)} | {_fmt(vb)} | {_fmt(diff)} |")
    _, ca = _c_block(a)
    _, cb = _c_block(b)
    if ca and cb:
        col = "ce" if "ce" in ca and "ce" in cb else "corruption_error"
        label = "CE" if col == "ce" else "error"
        for corr in [c for c in ca["corruptions"] if c in cb["corruptions"]]:
            va, vb = (
                ca[col].get(corr, ca["corruption_error"].get(corr)),
                cb[col].get(corr, cb["corruption_error"].get(corr)),
            )
            lines.append(f"| {label} {corr} | {_fmt(va)} | {_fmt(vb)} | {_fmt(vb - va)} |")
        if ca.get("partial") or cb.get("partial"):
            lines.append("| (partial: not an mCE) | | | |")
    return "\n".join(lines) + "\n"


def write_reports(
    results: dict, out_dir: str | os.PathLike, name: str = "results"
) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and, with matplotlib, ``<name>_heatmap.png`` under ``out_dir``.

    The JSON and markdown are written first, so a missing matplotlib costs the plot only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_table(results))
    key, c = _c_block(results)
    if c is not None:
        try:
            from .plots import plot_error_heatmap

            paths["heatmap"] = plot_error_heatmap(results, out / f"{name}_heatmap.png")
        except ImportError as e:
            warnings.warn(f"heatmap not written: {e}", stacklevel=2)
    return paths
