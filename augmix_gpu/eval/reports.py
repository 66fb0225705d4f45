"""Report writers: the headline numbers, the markdown tables, --compare, and the files on disk.

Pure functions of a results dict (the JSON): they never evaluate anything, so a report can be
re-made or compared from saved JSON alone. The pictures live in ``plots.py``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from .. import protocols


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
        **p_headline(results),
    }


def p_headline(results: dict) -> dict[str, float | None]:
    """ImageNet-P's headline: mFR / mT5D where normalised, the unnormalised means always."""
    p = results.get("imagenet_p") or {}
    return {
        "mFR": p.get("mfr"),
        "mFR (partial)": p.get("mfr_partial"),
        "mT5D": p.get("mt5d"),
        "mT5D (partial)": p.get("mt5d_partial"),
        "mean flip prob. (unnorm.)": p.get("mean_flip_probability"),
        "mean flip prob. (partial)": p.get("mean_flip_probability_partial"),
        "mean top-5 dist. (unnorm.)": p.get("mean_top5_distance"),
        "mean top-5 dist. (partial)": p.get("mean_top5_distance_partial"),
    }


def p_table(p: dict) -> list[str]:
    """Markdown lines of the ImageNet-P section: one row per (perturbation, difficulty)."""
    norm = p.get("normalisation") or {}
    ref = norm.get("reference") or "AlexNet"
    lines = [
        "",
        f"ImageNet-P: flip probability FP (%), top-5 distance T5D and Zipf distance per comparison; "
        f"FR and T5D rate = 100 x value / {ref}'s (difficulty {p.get('difficulty', 1)})",
        "",
        "| perturbation | difficulty | sequences | FP | FR | T5D | T5D rate | Zipf |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    head = str(p.get("difficulty", 1))
    for name in p["perturbations"]:
        label = name + ("" if name in protocols.PERTURBATIONS else " (validation)")
        for d, fp in p["flip_probability"][name].items():
            fr = p.get("fr", {}).get(name) if d == head else None
            t5r = p.get("t5d_rate", {}).get(name) if d == head else None
            row = [label, d, str(p["counts"][name][d]["sequences"]), _fmt(fp), _fmt(fr),
                   _fmt(p["top5_distance"][name][d], 3), _fmt(t5r),
                   _fmt(p["zipf_distance"][name][d], 4)]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    if not norm.get("available", False):
        lines += ["", f"FR / mFR / mT5D unavailable: {norm.get('reason')}."]
    if p.get("partial"):
        lines += [
            "",
            f"**Partial** ({p['partial_reason']}): not an mFR; means cover what was evaluated.",
        ]
    return lines


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
            row = [corr + ("" if corr in protocols.CORRUPTIONS else " (extra)")]
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
    if results.get("imagenet_p"):
        lines += p_table(results["imagenet_p"])
    if "model" in results and results["model"].get("ops"):
        lines += [
            "",
            f"Trained with: aug_type={results['model'].get('aug_type')}, ops: {results['model']['ops']}.",
        ]
    pre = results.get("preprocessing", {})
    if pre:
        parts = [f"{k} {pre[k]}" for k in ("clean", "corrupted", "perturbed") if pre.get(k)]
        lines += ["Preprocessing: " + "; ".join(parts) + "."] if parts else []
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
    pa, pb = a.get("imagenet_p"), b.get("imagenet_p")
    if pa and pb:
        d = str(protocols.HEADLINE_DIFFICULTY)
        both_fr = all(x.get("fr") for x in (pa, pb))
        for name in [p for p in pa["perturbations"] if p in pb["perturbations"]]:
            if both_fr and name in pa["fr"] and name in pb["fr"]:
                va, vb, label = pa["fr"][name], pb["fr"][name], "FR"
            else:
                va = pa["flip_probability"][name].get(d)
                vb = pb["flip_probability"][name].get(d)
                label = "FP"
            if va is not None and vb is not None:
                lines.append(f"| {label} {name} | {_fmt(va)} | {_fmt(vb)} | {_fmt(vb - va)} |")
        if pa.get("partial") or pb.get("partial"):
            lines.append("| (partial: not an mFR) | | | |")
    return "\n".join(lines) + "\n"


def write_reports(
    results: dict, out_dir: str | os.PathLike, name: str = "results"
) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and, with matplotlib, ``<name>_heatmap.png`` (-C) and
    ``<name>_flips.png`` (-P: frames of one sequence per perturbation, the top-1 along it).

    The JSON and markdown are written first, so a missing matplotlib costs the plots only.
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
    if (results.get("imagenet_p") or {}).get("examples"):
        try:
            from .plots import plot_sequence_flips

            crop = (results.get("preprocessing") or {}).get("crop_size") or 224
            paths["flips"] = plot_sequence_flips(results, out / f"{name}_flips.png", crop)
        except (ImportError, ValueError) as e:  # no matplotlib, or the videos moved away
            warnings.warn(f"flips picture not written: {e}", stacklevel=2)
    return paths
