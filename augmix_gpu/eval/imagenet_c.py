"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019): top-1 error per corruption and severity, mCE.

Layout ``root/<corruption>/<severity>/<class>/<image>``: 15 corruptions x 5 severities of the
50,000 val images, 224 px JPEGs, plus 4 extra corruptions reported apart. Each (corruption,
severity) cell is one loader through the one loop; its error is ``wrong / total`` from counts
summed over ranks. ``metrics.summarize_corruptions`` turns the counts into CE (AlexNet-normalised),
relative CE (with the clean error) and mCE; a subset is **partial**, never an mCE.

Preprocessing (``--c_resize``): as stored + centre crop (hendrycks/robustness ImageNet-C/test.py,
the default), or resize the shorter side first (the official augmix imagenet.py: 256).

CIFAR-10-C / CIFAR-100-C (``cifar_c.py``) follow the same protocol on arrays and share the cell
loop, the block and the reports written here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from .. import protocols
from . import metrics as rb
from .benchmark import Benchmark, Outcome, compare_row, fmt, row
from .layouts import check_class_folders, check_names, check_root, dataset_error
from .loop import Context, progress_bar
from .settings import DataSettings

# --- layout --------------------------------------------------------------------------------------


def default_corruptions(root: str | os.PathLike) -> list[str]:
    """The 15 corruptions, plus each of the 4 extras whose folder (or .npy) is present."""
    root = Path(root)
    extras = [
        c
        for c in protocols.EXTRA_CORRUPTIONS
        if (root / c).is_dir() or (root / f"{c}.npy").is_file()
    ]
    return [*protocols.CORRUPTIONS, *extras]


def resolve_cells(root: Path, options: DataSettings) -> tuple[list[str], list[int]]:
    """The corruptions and severities asked for (default: all present / all 5), names checked."""
    sevs = [int(s) for s in (options.severities or protocols.SEVERITIES)]
    check_names([str(s) for s in sevs], [str(s) for s in protocols.SEVERITIES], "severity")
    corrs = list(options.corruptions) or default_corruptions(root)
    check_names(corrs, [*protocols.CORRUPTIONS, *protocols.EXTRA_CORRUPTIONS], "corruption")
    return corrs, sevs


def check_c_layout(
    root: str | os.PathLike,
    corruptions: Sequence[str],
    severities: Sequence[int],
    classes: Sequence[str] | None,
) -> None:
    """Raise a ``DatasetError`` naming the path for the first structural problem of a -C tree.

    Checks ``root/<corruption>/<severity>/<class>/<image>``: every requested corruption and severity
    folder exists, holds class folders, each class folder is one of ``classes`` (the checkpoint's)
    and holds at least one file. Cheap (directory listings only).
    """
    root = check_root(
        root, "ImageNet-C", "<corruption>/<severity>/<class>/<image> (e.g. .../ImageNet-C)"
    )
    known = set(classes) if classes is not None else None
    for c in corruptions:
        cdir = root / c
        if not cdir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise dataset_error(
                f"missing corruption folder {str(cdir)!r} (found {present[:20]}): download/extract "
                f"it, or evaluate a subset with --corruptions (reported as partial, not as mCE)"
            )
        for s in severities:
            sdir = cdir / str(int(s))
            if not sdir.is_dir():
                raise dataset_error(
                    f"missing severity folder {str(sdir)!r}: ImageNet-C holds severities 1-5 per "
                    "corruption; re-extract it, or pass --severities (reported as partial)"
                )
            check_class_folders(sdir, known, None, "<corruption>/<severity>/<class>/<image>")


@dataclass(frozen=True)
class CPlan:
    """What a -C evaluation reads: every (corruption, severity) cell of ``root``."""

    root: Path
    corruptions: list[str]
    severities: list[int]
    classes: list[str]
    c_resize: int | None = None


def check_layout(root: Path, classes: list[str], options: DataSettings) -> CPlan:
    corrs, sevs = resolve_cells(root, options)
    check_c_layout(root, corrs, sevs, classes)
    return CPlan(Path(root), corrs, sevs, list(classes), options.c_resize)


def class_folder(root: Path, options: DataSettings) -> Path:
    """The first cell's folder: its class folders are the model's (``--pretrained``)."""
    c = (options.corruptions or protocols.CORRUPTIONS)[0]
    return Path(root) / c / str((options.severities or [1])[0])


# --- the cells through the one loop ---------------------------------------------------------------


@dataclass
class Cells:
    """Counts per (corruption, severity), all ranks summed; NLL and calibration per cell."""

    counts: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)  # (wrong, total)
    nll: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=lambda: {"rms_calibration_error": {}, "ece": {}}
    )
    images: int = 0
    seconds: float = 0.0


def evaluate_cells(
    model: nn.Module,
    context: Context,
    corruptions: Sequence[str],
    severities: Sequence[int],
    make_loader: Callable[[str, int], Any],
) -> Cells:
    """Every cell's loader (``make_loader(corruption, severity)``) through the one loop; one
    progress bar per corruption."""
    cells = Cells()
    for c in corruptions:
        loaders = [make_loader(c, s) for s in severities]
        total = sum(len(loader) for loader in loaders)
        bar = progress_bar(total, c, context.env, context.progress, leave=True)
        try:
            for s, loader in zip(severities, loaders):
                bar.set_postfix_str(f"severity {s}")
                r = context.count(model, loader, f"{c}/{s}", pbar=bar)
                cells.counts.setdefault(c, {})[s] = (r.n - r.correct1, r.n)
                cells.nll.setdefault(c, {})[str(s)] = r.nll
                for name, value in r.calibration().items():
                    cells.calibration[name].setdefault(c, {})[str(s)] = value
                cells.images, cells.seconds = cells.images + r.n, cells.seconds + r.seconds
        finally:
            bar.close()
    return cells


def corruption_block(
    cells: Cells,
    plan: Any,
    clean_error: float | None,
    *,
    normalise: bool,
    dataset: str,
) -> dict[str, Any]:
    """The results block: ``metrics.summarize_corruptions`` plus calibration, NLL, provenance."""
    block = rb.summarize_corruptions(cells.counts, clean_error, normalise=normalise)
    main = [c for c in plan.corruptions if c in protocols.CORRUPTIONS]
    block["calibration"] = {}
    for name, table in cells.calibration.items():
        block["calibration"][name] = table
        if main:
            means = [np.mean(list(table[c].values())) for c in main]
            block["calibration"][f"mean_{name}"] = float(np.mean(means))
    block.update(nll=cells.nll, severities=plan.severities, dataset=dataset, root=str(plan.root))
    return block


def evaluate(model: nn.Module, context: Context, plan: CPlan) -> Outcome:
    def cell_loader(c: str, s: int) -> Any:
        source = plan.root / c / str(s)
        return context.loader(source, "corrupted", classes=plan.classes, c_resize=plan.c_resize)

    cells = evaluate_cells(model, context, plan.corruptions, plan.severities, cell_loader)
    block = corruption_block(cells, plan, context.clean_error, normalise=True, dataset="ImageNet-C")
    crop = context.crop_size
    read = (
        f"resize shorter side {plan.c_resize} + centre crop {crop} (official augmix imagenet.py)"
        if plan.c_resize
        else f"as stored + centre crop {crop} (hendrycks/robustness)"
    )
    return Outcome(block, cells.images, cells.seconds, preprocessing={"corrupted": read})


# --- reports (from the block alone) -------------------------------------------------------------


def headline(block: dict) -> dict[str, float | None]:
    cal = block.get("calibration", {})
    return {
        "mCE": block.get("mce"),
        "mCE (partial)": block.get("mce_partial"),
        "mCE (extra)": block.get("mce_extra"),
        "mCE (extra, partial)": block.get("mce_extra_partial"),
        "relative mCE": block.get("relative_mce"),
        "mean corruption error (unnorm.)": block.get("mean_corruption_error"),
        "mean corruption error (partial)": block.get("mean_corruption_error_partial"),
        "C RMS calib. error": cal.get("mean_rms_calibration_error"),
        "C ECE": cal.get("mean_ece"),
    }


def corruption_ce(block: dict, corruption: str) -> float | None:
    """CE of one of the 15 (``ce``) or of an extra (``extra_ce``); None where not normalised."""
    return block.get("ce", {}).get(corruption, block.get("extra_ce", {}).get(corruption))


def report_lines(c: dict) -> list[str]:
    """Error per corruption x severity, each row's mean, and CE / relative CE where normalised."""
    sevs = c["severities"]
    has_ce = "ce" in c
    head = ["corruption", *[f"s{s}" for s in sevs], "mean"] + (["CE", "rel. CE"] if has_ce else [])
    lines = [
        "",
        f"{c['dataset']} top-1 error (%) by severity"
        + ("; CE = 100 x error / AlexNet's" if has_ce else ""),
        "",
        row(head),
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    for corr in c["corruptions"]:
        cells = [corr + ("" if corr in protocols.CORRUPTIONS else " (extra)")]
        cells += [fmt(c["error"][corr].get(str(s))) for s in sevs]
        cells.append(fmt(c["corruption_error"][corr]))
        if has_ce:
            cells += [fmt(corruption_ce(c, corr)), fmt(c.get("relative_ce", {}).get(corr))]
        lines.append(row(cells))
    if c.get("partial"):
        lines += [
            "",
            f"**Partial** ({c['partial_reason']}): not an mCE; means cover what was evaluated.",
        ]
    return lines


def compare_lines(ca: dict, cb: dict) -> list[str]:
    """CE per corruption (the unnormalised error where either lacks CE), B - A."""
    normalised = "ce" in ca and "ce" in cb
    label = "CE" if normalised else "error"

    def value(block: dict, corr: str) -> float | None:
        return corruption_ce(block, corr) if normalised else block["corruption_error"].get(corr)

    lines = []
    for corr in [c for c in ca["corruptions"] if c in cb["corruptions"]]:
        lines.append(compare_row(f"{label} {corr}", value(ca, corr), value(cb, corr)))
    if ca.get("partial") or cb.get("partial"):
        lines.append("| (partial: not an mCE) | | | |")
    return lines


def pictures(results: dict, out: Path, stem: str) -> dict[str, Path]:
    """``<stem>_heatmap.png``: error by corruption x severity (needs matplotlib)."""
    import warnings

    try:
        from .plots import plot_error_heatmap

        return {"heatmap": plot_error_heatmap(results, out / f"{stem}_heatmap.png")}
    except ImportError as e:
        warnings.warn(f"heatmap not written: {e}", stacklevel=2)
        return {}


BENCHMARK = Benchmark(
    name="imagenet_c",
    title="ImageNet-C",
    help="ImageNet-C root: <corruption>/<severity>/<class>/<image>",
    check_layout=check_layout,
    evaluate=evaluate,
    headline=headline,
    report_lines=report_lines,
    compare_lines=compare_lines,
    pictures=pictures,
    class_folder=class_folder,
)
