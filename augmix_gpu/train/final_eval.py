"""The final model on the run's robustness sets: the training settings turned into the
evaluation's (``eval.settings.EvalSettings``), the reports written under ``<run dir>/eval``.

For CIFAR the headline is the unnormalised mean corruption error (what the official cifar.py and
the PyTorch port report).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from tqdm import tqdm

from ..distributed import DistEnv
from ..eval.imagenet_p import present_perturbations
from ..eval.model import ModelCard, describe_model
from ..eval.reports import markdown_table, write_reports
from ..eval.run import check_layouts, evaluate_model
from ..eval.settings import DataSettings, EvalSettings, ModelSource, RunSettings
from .data import DataSpec

if TYPE_CHECKING:
    from .config import Settings


def eval_settings(
    settings: Settings, data: DataSpec, world_size: int, model: ModelSource | None = None
) -> EvalSettings:
    """What the evaluation of this run reads: its clean set (val folder, or CIFAR's test split),
    its robustness roots, its sizes, normalisation, batch and precision; ``model``: for
    ``--eval_only``, whose normalisation is the checkpoint's (or the weights file's) own."""
    s, roots = settings, data.roots
    p = roots.get("imagenet_p")
    if s.data.is_cifar:
        clean = dict(cifar=s.data.data, cifar_name=s.data.dataset, crop_size=32, resize_size=32)
    else:
        clean = dict(val=str(data.val), crop_size=s.data.crop_size, resize_size=s.data.val_resize)
    options = DataSettings(
        **clean,
        normalization=None if model else s.data.normalization,
        on_corrupt=s.data.on_corrupt,
        severities=s.robustness.c_severities,
        perturbations=present_perturbations(p) if p else [],  # a partial -P set: what it holds
    )
    run = RunSettings(
        batch=settings.per_rank_batch(world_size), workers=s.data.workers, device=s.run.device,
        precision=s.model.precision, channels_last=s.model.channels_last,
        out=str(s.run_dir / "eval"), no_progress=s.run.no_progress,
    )  # fmt: skip
    return EvalSettings(model=model or ModelSource(), data=options, run=run, roots=roots)


def check_robustness_layouts(settings: Settings, data: DataSpec, classes: list[str]) -> None:
    """Every robustness tree's layout, before the first step: a typo costs seconds, not a run."""
    if data.roots:
        check_layouts(eval_settings(settings, data, 1), classes)


def evaluate_after_training(
    model: nn.Module, data: DataSpec, classes: list[str], settings: Settings, env: DistEnv
) -> dict[str, Any]:
    """Clean vs every robustness set in ``data.roots``; the results dict (same on every rank)."""
    s = settings
    options = eval_settings(s, data, env.world_size)
    model.eval()
    start = time.perf_counter()
    card = ModelCard.from_settings(s.to_dict())
    info = {"model": describe_model(card, None, name=s.model.arch), "args": s.to_dict()}
    results = evaluate_model(model, env, classes=classes, settings=options, extra_info=info)
    if env.is_main:
        out = Path(options.run.out)
        write_reports(results, out)
        tqdm.write(markdown_table(results))
        if "cifar_c" in results:
            block = results["cifar_c"]
            error = block.get("mean_corruption_error", block.get("mean_corruption_error_partial"))
            tqdm.write(f"{block['dataset']} mean corruption error: {error:.2f} %")
        took = time.perf_counter() - start
        tqdm.write(f"robustness evaluation took {took:.0f} s; reports in {out}")
    return results
