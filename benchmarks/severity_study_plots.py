"""The shifted severity study's pictures: error against severity with the sweep's fit, where the
learned severity went, and the held-out hypergradient's signal-to-noise per epoch."""

from __future__ import annotations

import math
from pathlib import Path

from severity_study import LEARNED, final_severity

COLOURS = {"minimize": "C0", "adversarial": "C3", "heldout": "C2"}
START_STYLES = {0.5: ":", 2.0: "-", 8.0: "--"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _objective(run) -> str | None:
    cfg = run.result["config"]
    return cfg["severity_objective"] if cfg["aug_type"] == LEARNED else None


def error_vs_severity(runs, fit: dict | None, out: Path, prefix: str = "") -> Path:
    """Every run's judged metric (mean corruption error unless the fit says another) at the
    severity its ops received at the end; the fit."""
    import numpy as np

    metric = (fit or {}).get("metric", "mean corruption error")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed = [r for r in runs if _objective(r) is None]
    ax.plot([final_severity(r.result) for r in fixed],
            [r.result["evaluation"][metric] for r in fixed],
            "o", color="grey", alpha=0.6, label="fixed severity (one run each)")  # fmt: skip
    if fit is not None:
        b0, b1, b2 = fit["coef"]
        xs = np.linspace(math.log(0.25), math.log(8), 100)
        ax.plot(np.exp(xs), b0 + b1 * xs + b2 * xs**2, "k-", label="quadratic fit in ln s")
        lo, hi = fit["optimum s 2se range"]
        ax.axvspan(lo, hi, color="k", alpha=0.08, label="fitted optimum ± 2 se")
        ax.axhspan(*fit["one run 95% interval"], color="C1", alpha=0.1,
                   label="one run at the optimum, 95 %")  # fmt: skip
    seen = set()
    for r in runs:
        obj = _objective(r)
        if obj is None:
            continue
        ax.plot(final_severity(r.result), r.result["evaluation"][metric],
                "D", color=COLOURS[obj], alpha=0.8, label=r.variant if r.variant not in seen else None)  # fmt: skip
        seen.add(r.variant)
    ax.set_xscale("log")
    ax.set_xlabel("severity the ops received (learned: final median)")
    ax.set_ylabel(metric + (" (%)" if "error" in metric else ""))
    ax.set_title(f"Severity study: {metric} against severity")
    ax.legend(fontsize=6.5)
    name = "error" if metric == "mean corruption error" else metric.replace(" ", "_").strip("-")
    return _save(fig, out / f"{prefix}{name.lower()}_vs_severity.png")


def trajectories(runs, fit: dict | None, out: Path, prefix: str = "") -> Path:
    """The learned severity's median over training, one line per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for r in runs:
        obj = _objective(r)
        if obj is None:
            continue
        traj = r.result["severity_trajectory"]
        start = float(r.result["config"]["initial_aug_severity"])
        ax.plot([t["step"] for t in traj], [t["severity_median"] for t in traj],
                color=COLOURS[obj], ls=START_STYLES.get(start, "-"), lw=1, alpha=0.7,
                label=r.variant if r.variant not in seen else None)  # fmt: skip
        seen.add(r.variant)
    if fit is not None:
        ax.axhline(fit["optimum s"], color="black", lw=0.8, label="sweep's fitted optimum")
        ax.axhspan(*fit["optimum s 2se range"], color="k", alpha=0.08, label="± 2 se")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("median severity received by the ops")
    ax.set_title("Where the learned severity went (one line per seed)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / f"{prefix}severity_trajectory.png")


def snr_per_epoch(runs, out: Path, prefix: str = "") -> Path:
    """Each epoch's hypergradient signal-to-noise (mean / standard error of the updates' dL/dmu):
    beyond ±2 the severity moves by the held-out loss, inside it by noise."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r in runs:
        if _objective(r) != "heldout":
            continue
        hist = r.result["history"]
        start = float(r.result["config"]["initial_aug_severity"])
        ax.plot([h["epoch"] for h in hist], [h.get("hypergrad_snr") for h in hist],
                color=f"C{list(START_STYLES).index(start) if start in START_STYLES else 0}",
                marker="o", ms=3, lw=1, alpha=0.7,
                label=r.variant if r.variant not in seen else None)  # fmt: skip
        seen.add(r.variant)
    for y in (-2, 2):
        ax.axhline(y, color="grey", ls=":", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("hypergradient of mu: mean / standard error")
    ax.set_title("Held-out hypergradient signal-to-noise per epoch (> 0: severity goes down)")
    ax.legend(fontsize=7)
    return _save(fig, out / f"{prefix}snr_per_epoch.png")


def plot_all(runs, summary: dict, fit: dict | None, out: Path, prefix: str = "") -> list[Path]:
    """Every picture the runs call for, named ``prefix`` + its name (a pilot's: ``pilot-``, so
    that it leaves a study's pictures in the same folder as they were)."""
    paths = [error_vs_severity(runs, fit, out, prefix)]
    if any(_objective(r) for r in runs):
        paths.append(trajectories(runs, fit, out, prefix))
    if any(_objective(r) == "heldout" for r in runs):
        paths.append(snr_per_epoch(runs, out, prefix))
    return paths
