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
    _annotate(ax, table, vmin, vmax)
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


def _annotate(ax: Any, table: Any, vmin: float, vmax: float) -> None:
    """Each finite cell's value, white on the dark end of the scale."""
    import numpy as np

    for (i, j), v in np.ndenumerate(table):
        if np.isfinite(v):
            dark = (v - vmin) / (vmax - vmin) > 0.55
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip


def plot_sequence_flips(results: dict, path: str | os.PathLike, crop_size: int = 224) -> Path:
    """One row per perturbation: frames of its example sequence (the one with the most flips),
    each captioned with the model's top-1 (green: the label, red: not), and under them a band
    with the top-1 of every frame, a tick where test.py counts a flip (noise: vs the first frame;
    others: vs the previous one). The frames are re-read from the videos named in the JSON.
    """
    block = results.get("imagenet_p") or {}
    examples = block.get("examples") or {}
    if not examples:
        raise ValueError("the results hold no imagenet_p examples to draw")
    plt = _pyplot()
    import numpy as np
    import torch

    from ..data.sequences import centre_crop
    from ..data.video import read_video_cpu
    from ..protocols import is_noise

    shown = 8
    fig = plt.figure(figsize=(1.3 * shown, 1.95 * len(examples)), dpi=110)
    grid = fig.add_gridspec(2 * len(examples), 1, height_ratios=[5, 1] * len(examples))
    cmap = plt.get_cmap("tab20")
    for row, (name, ex) in enumerate(examples.items()):
        video = torch.from_numpy(read_video_cpu(ex["path"])).permute(0, 3, 1, 2)
        frames = centre_crop(video, crop_size).permute(0, 2, 3, 1).numpy()
        preds = ex["predictions"][: len(frames)]
        picks = np.unique(np.linspace(0, len(frames) - 1, shown).round().astype(int))
        names = ex["classes"]
        # The picked frames side by side in one image (one axes per row, not one per frame: a
        # figure of ~90 axes took 6 s of the demo to lay out and draw), white gaps between them.
        h, w = frames.shape[1:3]
        gap = max(w // 4, 1)
        strip = np.full((h, len(picks) * (w + gap) - gap, 3), 255, dtype=np.uint8)
        ax = fig.add_subplot(grid[2 * row, 0])
        for col, t in enumerate(picks):
            x0 = col * (w + gap)
            strip[:, x0 : x0 + w] = frames[t]
            ok = preds[t] == ex["label"]
            ax.text(x0 + w / 2, h + 0.04 * h, f"{t}: {names.get(str(preds[t]), preds[t])}"[:16],
                    ha="center", va="top", fontsize=6, color="green" if ok else "red")  # fmt: skip
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(name, fontsize=7)
        band = fig.add_subplot(grid[2 * row + 1, :])
        band.imshow(np.asarray(preds)[None] % 20, cmap=cmap, vmin=0, vmax=19, aspect="auto",
                    interpolation="nearest")  # fmt: skip
        base = [0] * len(preds) if is_noise(name) else list(range(-1, len(preds) - 1))
        flips = [j for j in range(1, len(preds)) if preds[j] != preds[base[j]]]
        for j in flips:
            band.axvline(j - 0.5, color="black", lw=1.2)
        band.set_yticks([])
        band.set_xticks(range(0, len(preds), 5))
        band.tick_params(labelsize=6)
        band.set_xlabel(
            f"{name}: top-1 per frame ({len(flips)} flips in {len(preds) - 1} comparisons; "
            f"label {names.get(str(ex['label']), ex['label'])})",
            fontsize=7,
        )
    fig.suptitle("ImageNet-P: the sequence with the most top-1 flips, per perturbation", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
