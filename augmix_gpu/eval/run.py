"""Evaluate a model in memory on the clean set and every benchmark given: the results dict (JSON).

The entry point of evaluate.py (``cli.py``) and of the trainer's end-of-run evaluation::

    from augmix_gpu.eval.model import describe_model
    from augmix_gpu.eval.reports import markdown_table, write_reports
    from augmix_gpu.eval.run import evaluate_model
    from augmix_gpu.eval.settings import DataSettings, EvalSettings, RunSettings

    settings = EvalSettings(
        data=DataSettings(val="data/val", crop_size=224, resize_size=256),
        run=RunSettings(batch=64, workers=4, precision="bf16", no_progress=not env.is_main),
        roots={"imagenet_c": "data/ImageNet-C", "imagenet_p": None},  # None: not evaluated
    )
    results = evaluate_model(model, env, classes=classes, settings=settings,
                             extra_info={"model": describe_model(card, None), "args": flat})
    if env.is_main:
        write_reports(results, "runs/x/eval")

``check_layouts(settings, classes)`` checks every given tree alone (the trainer's "fail before the
training, not after"); ``evaluate_model`` runs it again first.

Every layout first (each given benchmark's ``check_layout``, on every rank: a typo costs seconds,
not a night), then the clean set (its error feeds relative mCE), then the benchmarks in the
registry's order, each a block of the results under its name. The results are identical on
every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..distributed import DistEnv
from .benchmark import Benchmark, Outcome
from .clean import evaluate_clean
from .layouts import check_names
from .loop import Context
from .registry import BENCHMARKS
from .settings import NORMALIZATIONS, EvalSettings

__all__ = ["check_layouts", "evaluate_model", "given_benchmarks"]

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

UNITS = (
    "errors, accuracies, CE, mCE, calibration errors, flip probabilities, FR, mFR, mT5D: "
    "percent; nll: nats; top-5 / Zipf distances: per comparison"
)


def given_benchmarks(settings: EvalSettings) -> list[tuple[Benchmark, Path]]:
    """The benchmarks whose root is given, in the registry's order, with their roots. Checks what
    is asked for: known names, something to evaluate, models of one family (ImageNet, CIFAR)."""
    check_names(list(settings.roots), [b.name for b in BENCHMARKS], "benchmark")
    given = [(b, Path(settings.roots[b.name])) for b in BENCHMARKS if b.name in settings.roots]
    if not (settings.data.val or settings.data.cifar or given):
        flags = ", ".join(f"--{b.name}" for b in BENCHMARKS)
        raise ValueError(f"nothing to evaluate: pass --val, --cifar and/or a root ({flags})")
    first: dict[str, Benchmark] = {}
    for b, _ in given:
        first.setdefault(b.family, b)
    if len(first) > 1:
        a, b = first.values()
        raise ValueError(f"--{a.name} and --{b.name} need different models: run them separately")
    return given


def check_layouts(settings: EvalSettings, classes: Sequence[str]) -> list[tuple[Benchmark, Any]]:
    """``(benchmark, plan)`` of each given benchmark: its layout checked, no image read yet (a
    caller such as the trainer may run this first, to fail before hours of work)."""
    return [
        (b, b.check_layout(root, list(classes), settings.data))
        for b, root in given_benchmarks(settings)
    ]


def evaluate_model(
    model: nn.Module,
    env: DistEnv,
    *,
    classes: Sequence[str],
    settings: EvalSettings,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Clean + every benchmark of ``settings.roots``: the results JSON content (every rank).

    ``model``: in eval mode on ``env.device`` (channels-last already if ``settings.run`` says
    so); ``classes``: its label order. ``settings.data.crop_size`` / ``resize_size`` default to
    224 / 256. ``extra_info`` (e.g. ``{"args": ..., "model": describe_model(...)}``) goes first.
    """
    plans = check_layouts(settings, classes)
    context = Context.create(env, settings.run, settings.data)
    results = _header(context, settings, extra_info, [b for b, _ in plans])
    outcomes: list[Outcome] = []
    clean = evaluate_clean(model, context, classes, settings.data)
    if clean is not None:
        results["clean"] = clean.block
        context = replace(context, clean_error=clean.block["error"])
        outcomes.append(clean)
    for benchmark, plan in plans:
        outcome = benchmark.evaluate(model, context, plan)
        results[benchmark.name] = outcome.block
        outcomes.append(outcome)
    results["skipped_files"] = context.skipped_files()  # --on_corrupt skip: not counted anywhere
    return _finish(results, outcomes)


def _header(
    context: Context,
    settings: EvalSettings,
    extra_info: dict[str, Any] | None,
    benchmarks: list[Benchmark],
) -> dict[str, Any]:
    """What is known before the first image: provenance, units, preprocessing, the run."""
    results: dict[str, Any] = {"format_version": RESULTS_FORMAT, **(extra_info or {})}
    results["units"] = UNITS
    pre: dict[str, Any] = {"clean": None}
    if settings.data.val or any(b.family == "imagenet" for b in benchmarks):
        # CIFAR arrays are read as stored: no crop or resize to report for them
        pre.update(crop_size=context.crop_size, resize_size=context.resize_size)
        pre["c_resize"] = settings.data.c_resize
    mean, std = NORMALIZATIONS[context.normalization]
    pre["normalization"] = f"{context.normalization}: mean {mean}, std {std} on [0,1] RGB"
    results["preprocessing"] = pre
    results["run"] = {
        "world_size": context.env.world_size,
        "device": str(context.env.device.type),
        "loader_device": context.loader_device,
        "precision": settings.run.precision,
        "batch_size_per_rank": context.batch_size,
        "torch": torch.__version__,
    }
    return results


def _finish(results: dict[str, Any], outcomes: list[Outcome]) -> dict[str, Any]:
    """Each evaluation's preprocessing and run entries, the totals, the reference keys."""
    for outcome in outcomes:
        results["preprocessing"].update(outcome.preprocessing)
        results["run"].update(outcome.run)
    images = sum(o.images for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    results["run"].update(
        images=images, seconds=seconds, images_per_s=images / seconds if seconds > 0 else None
    )
    results["reference_keys"] = REFERENCE_KEYS
    return results
