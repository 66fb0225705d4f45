"""The shifted severity study's evaluation of a run: error, NLL and calibration, before and after
temperature scaling, on the clean val set and every -C cell, in one pass over each.

Why temperature scaling: AugMix + JSD makes the model under-confident here, more so at high
severity (the first severity study: -C RMS calibration error 9 at s = 1, 23 at s = 8). A single
temperature fitted after training removes what is only a scale of the logits; what remains after
it is what a severity did to the ranking of the predictions. The temperature is fitted on the
held-out split (training images with the test split's nuisances, corrupted by the 4 validation
corruptions: never val, never an evaluation corruption) by minimising its NLL over log T.

Why here and not in the trainer: the logits are needed twice (T = 1 and the fitted T), so the
study trains with ``--no_c_eval`` and evaluates the final checkpoint (``last.ckpt``: the weights
the trainer's own evaluation would see) once, with the evaluation's preprocessing and loop
(``eval.loop.model_outputs``); the -C figures are formed as the evaluation forms them (mean over
corruptions of the mean over severities). Cached in the run folder as ``evaluation.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CACHE = "evaluation.json"
HELDOUT_KEYS = ("held-out error", "held-out NLL")  # added later: a cache without them gains them
LOG_T_RANGE = (-3.0, 3.0)  # T in [0.05, 20]: far beyond what a trained classifier needs


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """argmin_T NLL(logits / T) over log T (bounded scalar search: the NLL is convex in 1/T)."""
    from scipy.optimize import minimize_scalar

    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    res = minimize_scalar(nll, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5})
    return math.exp(res.x)


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """Error and NLL (percent, nats) and the RMS calibration error of ``logits / temperature``."""
    from augmix_gpu.eval.metrics import rms_calibration_error

    probs = F.softmax(logits.double() / temperature, dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).numpy()
    return {
        "error": 100.0 * (1.0 - correct.mean()),
        "nll": float(F.nll_loss(probs.clamp_min(1e-300).log(), labels)),
        "rms": rms_calibration_error(conf.numpy(), correct),
    }


def _logits(model, source: Path, recipe: str, classes: list[str], crop: int, resize: int):
    from augmix_gpu.data import build_loader
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.eval.loop import model_outputs

    env = DistEnv(0, 0, 1, torch.device("cpu"), None)
    loader = build_loader(source, recipe, batch_size=256, device="cpu", crop_size=crop,
                          resize_size=resize, classes=classes, num_threads=1)  # fmt: skip
    logits, labels = [], []
    for batch_logits, batch_labels, valid in model_outputs(model, loader, env):
        logits.append(batch_logits[valid])  # padding of the last batch left out
        labels.append(batch_labels[valid])
    return torch.cat(logits), torch.cat(labels)


def _mean_over_cells(cells: dict[tuple[str, int], dict], key: str) -> float:
    """The -C figure as the evaluation forms it: mean over corruptions of the mean over severities."""
    by_corruption: dict[str, list[float]] = {}
    for (c, _s), v in cells.items():
        by_corruption.setdefault(c, []).append(v[key])
    return float(np.mean([np.mean(v) for v in by_corruption.values()]))


def evaluate_run(run_dir: Path, heldout_root: Path, val: Path, c_root: Path) -> dict:
    """Clean and -C error; NLL and RMS calibration error before and after scaling; T; and the
    error and NLL on the held-out split itself (what the held-out objective descends: where its
    own optimum lies). A cache without the held-out figures gets them added (one pass)."""
    cached = run_dir / CACHE
    out: dict[str, Any] | None = json.loads(cached.read_text()) if cached.is_file() else None
    if out is not None and all(k in out for k in HELDOUT_KEYS):
        return out
    from augmix_gpu.eval.model import load_checkpoint_model

    loaded = load_checkpoint_model(run_dir / "last.ckpt", "cpu")
    cfg = json.loads((run_dir / "config.json").read_text())
    size = dict(classes=loaded.classes, crop=cfg["crop_size"], resize=cfg["val_resize"])
    model = loaded.model
    held = _logits(model, heldout_root, "corrupted", **size)
    if out is None:
        out = _clean_and_c(model, fit_temperature(*held), val, c_root, size)
    on_held = scores(*held)
    out["held-out error"], out["held-out NLL"] = on_held["error"], on_held["nll"]
    cached.write_text(json.dumps(out, indent=1))
    return out


def _clean_and_c(model, temperature: float, val: Path, c_root: Path, size: dict) -> dict:
    clean = _logits(model, val, "val", **size)
    cells = {
        (c.name, int(s.name)): _logits(model, s, "corrupted", **size)
        for c in sorted(p for p in c_root.iterdir() if p.is_dir())
        for s in sorted(p for p in c.iterdir() if p.is_dir())
    }
    out: dict[str, Any] = {"temperature": temperature}
    for tag, t in (("", 1.0), (" (T-scaled)", temperature)):  # the error does not change with T
        on_clean = scores(*clean, t)
        per_cell = {k: scores(*v, t) for k, v in cells.items()}
        out[f"clean NLL{tag}"] = on_clean["nll"]
        out[f"-C NLL{tag}"] = _mean_over_cells(per_cell, "nll")
        out[f"clean RMS calib.{tag}"] = on_clean["rms"]
        out[f"-C RMS calib.{tag}"] = _mean_over_cells(per_cell, "rms")
        out.setdefault("clean error", on_clean["error"])
        out.setdefault("mean corruption error", _mean_over_cells(per_cell, "error"))
    return out
