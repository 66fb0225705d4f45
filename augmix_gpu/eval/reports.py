"""Report writers: the headline numbers, the markdown tables, --compare, and the files on disk.

Pure functions of a results dict (the JSON): they never evaluate anything, so a report can be
re-made or compared from saved JSON alone. The clean set's rows are written here; each benchmark
of the registry present in the results adds its own (``Benchmark.headline``, ``report_lines``,
``compare_lines``, ``pictures``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .benchmark import compare_row, fmt
from .registry import BENCHMARKS


def _present(results: dict) -> list:
    return [(b, results[b.name]) for b in BENCHMARKS if results.get(b.name)]


def headline(results: dict) -> dict[str, float | None]:
    """The handful of numbers a comparison is about (None where not evaluated)."""
    clean = results.get("clean") or {}
    rows = {
        "clean error": clean.get("error"),
        "clean top-5 error": clean.get("top5_error"),
        "clean NLL": clean.get("nll"),
        "clean RMS calib. error": clean.get("rms_calibration_error"),
        "clean ECE": clean.get("ece"),
    }
    for benchmark, block in _present(results):
        rows.update(benchmark.headline(block))
    return rows


def markdown_table(results: dict) -> str:
    """Headline numbers, then each benchmark's section (e.g. error per corruption x severity)."""
    model = results.get("model") or {}
    name = model.get("name") or model.get("weights") or "model"
    lines = [f"### {name}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in headline(results).items() if v is not None]
    for benchmark, block in _present(results):
        lines += benchmark.report_lines(block)
    if model.get("ops"):
        lines += ["", f"Trained with: aug_type={model.get('aug_type')}, ops: {model['ops']}."]
    pre = results.get("preprocessing") or {}
    parts = [f"{k} {v}" for k, v in pre.items() if isinstance(v, str) and k != "normalization"]
    lines += ["Preprocessing: " + "; ".join(parts) + "."] if parts else []
    skipped = results.get("skipped_files") or []
    if skipped:  # --on_corrupt skip
        lines += [f"Skipped as undecodable (not counted): {len(skipped)} file(s): "
                  + ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "") + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def compare_table(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Side by side: headline numbers, then each benchmark both hold (e.g. CE per corruption)."""
    lines = [
        f"| metric | {names[0]} | {names[1]} | {names[1]} - {names[0]} |",
        "|---|---:|---:|---:|",
    ]
    ha, hb = headline(a), headline(b)
    for k in dict.fromkeys([*ha, *hb]):
        va, vb = ha.get(k), hb.get(k)
        if va is not None or vb is not None:
            lines.append(compare_row(k, va, vb))
    for benchmark in BENCHMARKS:
        if a.get(benchmark.name) and b.get(benchmark.name):
            lines += benchmark.compare_lines(a[benchmark.name], b[benchmark.name])
    return "\n".join(lines) + "\n"


def write_reports(
    results: dict, out_dir: str | os.PathLike, name: str = "results"
) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and, with matplotlib, each benchmark's pictures
    (``<name>_heatmap.png`` for -C, ``<name>_flips.png`` for -P).

    The JSON and markdown are written first, so a missing matplotlib costs the plots only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_table(results))
    for benchmark, _ in _present(results):
        paths.update(benchmark.pictures(results, out, name))
    return paths


def compare_files(a: str | os.PathLike, b: str | os.PathLike) -> str:
    """``compare_table`` of two results files, each named by its folder (``--compare``)."""
    loaded = []
    for path in (a, b):
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--compare: cannot read {str(path)!r} ({e})") from None
    names = tuple(Path(p).parent.name or str(p) for p in (a, b))
    return compare_table(*loaded, names=names)
