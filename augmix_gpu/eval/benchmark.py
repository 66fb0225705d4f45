"""What a robustness benchmark is: one module offering a :class:`Benchmark`, registered in one line.

A benchmark is evaluated in two steps, both on every rank:

1. ``check_layout(root, classes, options) -> plan``: folder listings (and small index files)
   only, before any image of any benchmark is read. A structural problem raises a
   ``DatasetError`` naming the path; otherwise the plan says exactly what will be read (the
   folders found, the resolved subsets and options), so the layout is looked at once.
2. ``evaluate(model, context, plan) -> Outcome``: the images through the one loop
   (``loop.evaluate_loader`` / ``model_outputs``), sharded by global rank, every image counted
   exactly once whatever the world size; the outcome's ``block`` is the benchmark's entry in the
   results JSON (``results[name]``).

The rest reads a saved results JSON only (``reports.py``): ``headline(block)`` the numbers a
comparison is about, ``report_lines(block)`` its markdown, ``compare_lines(a, b)`` its rows of
``--compare`` beyond the headline, ``pictures(results, folder, stem)`` its figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from .loop import Context
from .settings import DataSettings


@dataclass
class Outcome:
    """What one evaluation produced: its results block and what goes beside it."""

    block: dict[str, Any]  # results[benchmark name]
    images: int  # images (or frames) read, for the run's images/s
    seconds: float
    preprocessing: dict[str, Any] = field(default_factory=dict)  # into results["preprocessing"]
    run: dict[str, Any] = field(default_factory=dict)  # into results["run"]


def no_lines(*_: Any) -> list[str]:
    return []


def no_pictures(*_: Any) -> dict[str, Path]:
    return {}


@dataclass(frozen=True)
class Benchmark:
    """One robustness benchmark; ``name`` is its results key and its flag (``--<name> DIR``).

    ``family``: the models it fits (``"imagenet"`` or ``"cifar"``); benchmarks of two families
    cannot share a run. ``class_folder(root, options)``: a folder whose sub-folders are all the
    model's classes, which ``--pretrained`` reads the class list from (None: the benchmark has no
    such folder, e.g. a 200-class subset).
    """

    name: str
    title: str
    help: str
    check_layout: Callable[[Path, list[str], DataSettings], Any]
    evaluate: Callable[[nn.Module, Context, Any], Outcome]
    headline: Callable[[dict], dict[str, float | None]]
    report_lines: Callable[[dict], list[str]]
    compare_lines: Callable[[dict, dict], list[str]] = no_lines
    pictures: Callable[[dict, Path, str], dict[str, Path]] = no_pictures
    family: str = "imagenet"
    class_folder: Callable[[Path, DataSettings], Path] | None = None


# --- shared by the benchmarks' reports ----------------------------------------------------------


def fmt(x: Any, digits: int = 2) -> str:
    """A table cell: ``–`` for None (not evaluated), ``nan`` kept visible."""
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def compare_row(label: str, a: float | None, b: float | None) -> str:
    """``| label | a | b | b - a |``."""
    diff = b - a if a is not None and b is not None else None
    return row([label, fmt(a), fmt(b), fmt(diff)])
