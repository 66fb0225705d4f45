"""Figures for results JSONs. matplotlib (Agg backend) is imported lazily: it is an optional extra."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "matplotlib is needed for plots: pip install 'augmix-gpu[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_error_heatmap(results: dict, path: str | os.PathLike) -> Path:
    """Top-1 error (%) by corruption (rows) x severity (columns), plus each row's mean.

    The colour scale starts at the clean error when there is one, and the colour bar marks it,
    so a cell's shade reads as "how much worse than clean".
    """
    block = results.get("imagenet_c") or results.get("cifar_c")
    if not block:
        raise ValueError("the results hold no imagenet_c / cifar_c block to plot")
    plt = _pyplot()
    import numpy as np

    corrs, sevs = block["corruptions"], block["severities"]
    table = np.array(
        [
            [block["error"][c].get(str(s), np.nan) for s in sevs] + [block["corruption_error"][c]]
            for c in corrs
        ],
        dtype=float,
    )
    clean = (results.get("clean") or {}).get("error")
    lo = min(clean, np.nanmin(table)) if clean is not None else np.nanmin(table)
    vmax = max(np.nanmax(table), lo + 1e-6)
    vmin = lo - 0.03 * (vmax - lo)  # a little room under the clean mark so its line shows
    fig, ax = plt.subplots(figsize=(1.1 * (len(sevs) + 1) + 3.0, 0.38 * len(corrs) + 1.8), dpi=120)
    im = ax.imshow(table, cmap="magma_r", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(sevs) + 1), [*map(str, sevs), "mean"])
    ax.set_yticks(range(len(corrs)), corrs)
    ax.set_xlabel("severity")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table[i, j]
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) > 0.55
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.axvline(len(sevs) - 0.5, color="white", lw=2)
    bar = fig.colorbar(im, ax=ax, label="top-1 error (%)")
    title = f"{block.get('dataset', 'corrupted')} top-1 error"
    if clean is not None:
        bar.ax.axhline(clean, color="cyan", lw=2)
        title += f" (clean {clean:.1f}%, cyan on the scale)"
    summary = block.get("mce")
    if summary is not None:
        title += f"\nmCE {summary:.1f}"
    elif block.get("partial"):
        title += "\npartial: not an mCE"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
