"""The final model on the run's robustness sets: the training settings turned into the eval
wing's arguments, the reports written under ``<run dir>/eval``.

For CIFAR the headline is the unnormalised mean corruption error (what the official cifar.py and
the PyTorch port report).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from tqdm import tqdm

from ..distributed import DistEnv
from ..runtime import amp_dtype
from .data import DataSpec

if TYPE_CHECKING:
    from .config import Settings


def evaluate_after_training(
    model: nn.Module, data: DataSpec, classes: list[str], settings: Settings, env: DistEnv
) -> dict[str, Any]:
    """Clean vs every robustness set in ``data.roots``; the results dict (same on every rank)."""
    from ..eval.layouts import present_perturbations
    from ..eval.run import describe_model, evaluate_robustness, markdown_table, write_reports

    s, roots = settings, data.roots
    if s.data.is_cifar:
        where = dict(cifar_c=roots.get("cifar_c"), cifar_dir=s.data.data, cifar_name=s.data.dataset,
                     crop_size=32, resize_size=32)  # fmt: skip
    else:
        p = roots.get("imagenet_p")
        where = dict(val_dir=data.val, imagenet_c_dir=roots.get("imagenet_c"), imagenet_p_dir=p,
                     perturbations=present_perturbations(p) if p else None,
                     crop_size=s.data.crop_size, resize_size=s.data.val_resize)  # fmt: skip
    model.eval()
    start = time.perf_counter()
    info = describe_model(s.to_dict(), None, name=s.model.arch)
    results = evaluate_robustness(
        model, env, classes=classes, **where, severities=s.robustness.c_severities,
        batch_size=s.per_rank_batch(env.world_size), num_threads=s.data.workers,
        progress=env.is_main and not s.run.no_progress, amp_dtype=amp_dtype(s.model.precision),
        channels_last=s.model.channels_last, extra_info={"model": info, "args": s.to_dict()},
    )  # fmt: skip
    if env.is_main:
        out = s.run_dir / "eval"
        write_reports(results, out)
        tqdm.write(markdown_table(results))
        if "cifar_c" in results:
            block = results["cifar_c"]
            error = block.get("mean_corruption_error", block.get("mean_corruption_error_partial"))
            tqdm.write(f"{block['dataset']} mean corruption error: {error:.2f} %")
        took = time.perf_counter() - start
        tqdm.write(f"robustness evaluation took {took:.0f} s; reports in {out}")
    return results
