"""Does the learned severity find what a severity sweep finds? The severity study.

On the embedded task, through the whole pipeline (DALI -> AugMix on tensors -> the trainer -> -C
evaluation), 3 seeds each:
- a sweep of fixed severities, AugMix + JSD at s in {1, 2, 3, 5, 8} (``fixed_s1`` ... ``fixed_s8``);
- the learned severity under each objective: ``learned_minimize_s3``, ``learned_adversarial_s3``
  (the reference objectives, now bounded) and ``learned_heldout_s1/_s3/_s8`` (the held-out
  hypergradient from three starting severities; the number is the start).
Reported per variant (mean ± std over seeds): clean error, mean corruption error, mCE
(AlexNet-normalised), RMS calibration error (clean and -C), the final severity the ops received,
and the wall and CPU time of a run. Pictures: the learned trajectories, and corruption error
against severity with the learned variants placed on the sweep's axis.

    python benchmarks/severity_study.py                  # the study (make severity-study)
    python benchmarks/severity_study.py --budget 8 16 24 32 --variants fixed_s3 --seeds 0
                                                         # the training-length curve
    python benchmarks/severity_study.py --reuse          # continue a study stopped half-way

The dataset is fixed (``--synthetic_seed 0``) and so is the held-out split (``--heldout_seed 0``);
the seed changes initialisation, data order and augmentation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402
from _study import REPO, Run, dig, run_all, summarize_runs, summary_table  # noqa: E402

SWEEP = (1, 2, 3, 5, 8)
LEARNED = "learnable_augmix_jsd"
VARIANTS: dict[str, list[str]] = {
    **{f"fixed_s{s}": ["--aug_type", "augmix_jsd", "--initial_aug_severity", str(s)] for s in SWEEP},
    "learned_minimize_s3": ["--aug_type", LEARNED, "--severity_objective", "minimize",
                            "--initial_aug_severity", "3"],
    "learned_adversarial_s3": ["--aug_type", LEARNED, "--severity_objective", "adversarial",
                               "--initial_aug_severity", "3"],
    **{f"learned_heldout_s{s}": ["--aug_type", LEARNED, "--severity_objective", "heldout",
                                 "--initial_aug_severity", str(s)] for s in (1, 3, 8)},
}  # fmt: skip
# The training length, from the budget curve (README): fixed_s3's val accuracy climbs until epoch
# ~16-19, then moves within about +-1.5 points (300 val images); 32 epochs still ended 3 points
# lower than 24 for seed 0, about the seed spread at 24, at 1.3x the cost of the 30-run study.
EPOCHS = 24


def final_severity(res: dict) -> float | None:
    """The median severity the ops received at the end: the fixed value, or the learned one."""
    cfg = res["config"]
    if cfg["aug_type"] == "augmix_jsd":
        return float(cfg["initial_aug_severity"])
    return res["history"][-1]["severity_median"] if res.get("history") else None


METRICS = {  # label -> value from a run's results.json (errors in %, lower is better)
    "clean error": lambda r: dig(r, "robustness.clean.error"),
    "mean corruption error": lambda r: dig(r, "robustness.imagenet_c.mean_corruption_error"),
    "mCE (AlexNet-norm.)": lambda r: dig(r, "robustness.imagenet_c.mce"),
    "clean RMS calib.": lambda r: dig(r, "robustness.clean.rms_calibration_error"),
    "-C RMS calib.": lambda r: dig(r, "robustness.imagenet_c.calibration.mean_rms_calibration_error"),
    # ImageNet-P stability on the demo's generated -P set (FR/mFR need AlexNet's rates: README)
    "-P flip prob.": lambda r: dig(r, "robustness.imagenet_p.mean_flip_probability"),
    "-P top-5 dist.": lambda r: dig(r, "robustness.imagenet_p.mean_top5_distance"),
    "final severity median": final_severity,
    "wall s": lambda r: r["_seconds"] if r["_seconds"] == r["_seconds"] else None,
    "CPU s": lambda r: r["_cpu_seconds"] if r["_cpu_seconds"] == r["_cpu_seconds"] else None,
}  # fmt: skip
DIGITS = {
    "final severity median": 2,
    "-P flip prob.": 2,
    "-P top-5 dist.": 2,
    "wall s": 0,
    "CPU s": 0,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument(
        "--budget", type=int, nargs="+", default=None,
        help="instead of the study: train each variant for each of these epoch counts",
    )  # fmt: skip
    p.add_argument(
        "--prep_cost", type=int, default=0, metavar="N",
        help="instead of the study: time preparing N held-out images at ImageNet size",
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "severity_study"))
    p.add_argument("--reuse", action="store_true", help="read finished runs, train the rest")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    return p.parse_args()


def _runs(args, out: Path, epochs: int, tag: str = "") -> list[Run]:
    flags = ["--epochs", str(epochs), "--c_severities", "1", "2", "3", "4", "5"]
    return [
        Run(v, seed, VARIANTS[v] + flags + args.extra, out / "runs" / f"{v}{tag}" / f"seed{seed}")
        for seed in args.seeds  # seeds outermost: a partial study still covers every variant
        for v in args.variants
    ]


def _report(run: Run) -> None:
    r = run.result
    print(f"{run.variant:>24} seed {run.seed}: clean {METRICS['clean error'](r):.1f}%  "
          f"mean corruption error {METRICS['mean corruption error'](r):.1f}%  "
          f"final s {final_severity(r):.2f}  ({r['_seconds']:.0f} s wall, "
          f"{r['_cpu_seconds']:.0f} s CPU)", flush=True)  # fmt: skip


def _epochs(run: Run) -> int:
    return run.result["config"]["epochs"]


def budget_curve(args, out: Path) -> None:
    """Clean and corruption error against the number of epochs (each a full cosine schedule)."""
    runs = [run for e in args.budget for run in _runs(args, out, e, tag=f"_e{e}")]
    run_all(runs, jobs=args.jobs, reuse=args.reuse, on_done=_report)
    rows, curve = [], {}
    for run in runs:
        key = f"{run.variant} e{_epochs(run)}"
        curve.setdefault(key, []).append(run.result)
    for key, rs in curve.items():
        clean = statistics.fmean(METRICS["clean error"](r) for r in rs)
        corr = statistics.fmean(METRICS["mean corruption error"](r) for r in rs)
        rows.append(
            [
                key,
                f"{clean:.1f}",
                f"{corr:.1f}",
                f"{statistics.fmean(r['_seconds'] for r in rs):.0f}",
            ]
        )
    table = markdown_table(
        ["variant, epochs", "clean error", "mean corruption error", "wall s"], rows
    )
    print(table)
    _budget_plot(runs, args, out)
    write_json(out / "budget.json", {
        "benchmark": "severity_study_budget", "args": vars(args), "environment": environment_info(),
        "table": table,
        "per_run": [{"variant": r.variant, "seed": r.seed, "epochs": _epochs(r),
                     "clean error": METRICS["clean error"](r.result),
                     "mean corruption error": METRICS["mean corruption error"](r.result),
                     "val_top1 per epoch": [h["val_top1"] for h in r.result["history"]],
                     "seconds": r.result["_seconds"], "cpu_seconds": r.result["_cpu_seconds"]}
                    for r in runs],
    })  # fmt: skip


def _budget_plot(runs: list[Run], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, variant in enumerate(args.variants):
        for label, metric, ls in (
            ("clean", "clean error", "-"),
            ("corrupted", "mean corruption error", "--"),
        ):
            pts = sorted(
                (_epochs(r), METRICS[metric](r.result)) for r in runs if r.variant == variant
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=f"C{i}",
                    label=f"{variant}: {label}")  # fmt: skip
        # the val error along the longest run (one cosine schedule): where it flattens
        longest = max((r for r in runs if r.variant == variant), key=_epochs)
        errs = [100 - h["val_top1"] for h in longest.result["history"]]
        ax.plot(range(1, len(errs) + 1), errs, ":", color=f"C{i}", alpha=0.6,
                label=f"{variant}: val error per epoch ({_epochs(longest)}-epoch run)")  # fmt: skip
    ax.set_xlabel("training epochs (each point: a full run of that length)")
    ax.set_ylabel("error (%)")
    ax.set_title("Training length on the embedded task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budget_curve.png", dpi=120)
    plt.close(fig)


def goal_check(summary: dict) -> dict:
    """The issue's goal, measured: each ``learned_heldout_*`` variant's mean corruption error
    against the best fixed severity's (within its std) and against ``fixed_s3``'s (below it by
    more than the seed spread, the larger of the two stds, or within that spread if ``fixed_s3``
    is the best), and whether the held-out runs' final severities agree within a factor of 1.5."""
    mce, sev = "mean corruption error", "final severity median"
    fixed = [v for v in summary if v.startswith("fixed")]
    heldout = [v for v in summary if v.startswith("learned_heldout")]
    if not fixed or not heldout or "fixed_s3" not in summary:
        return {}
    best = min(fixed, key=lambda v: summary[v][mce]["mean"])
    b, d = summary[best][mce], summary["fixed_s3"][mce]
    rows = {}
    for v in heldout:
        m = summary[v][mce]
        spread = max(m["std"], d["std"])
        vs_default = d["mean"] - m["mean"]  # > 0: better than the default severity
        rows[v] = {
            "mean corruption error": m["mean"],
            "above best fixed": m["mean"] - b["mean"],
            "within best fixed std": m["mean"] - b["mean"] <= b["std"],
            "below fixed_s3": vs_default,
            "seed spread": spread,
            "beats fixed_s3": (abs(vs_default) <= spread)
            if best == "fixed_s3"
            else vs_default > spread,
            "final severity": summary[v][sev]["mean"],
        }
    finals = [r["final severity"] for r in rows.values()]
    ratio = max(finals) / min(finals)
    met = all(r["within best fixed std"] and r["beats fixed_s3"] for r in rows.values())
    return {"best fixed": best, "best fixed mean": b["mean"], "best fixed std": b["std"],
            "fixed_s3 mean": d["mean"], "fixed_s3 std": d["std"], "heldout": rows,
            "final severity ratio": ratio, "severities agree": ratio <= 1.5,
            "met": met and ratio <= 1.5}  # fmt: skip


def goal_lines(goal: dict) -> list[str]:
    """The goal check as sentences for the console and table.md."""
    if not goal:
        return []
    lines = [f"Goal check: best fixed {goal['best fixed']} {goal['best fixed mean']:.1f} ± "
             f"{goal['best fixed std']:.1f}; fixed_s3 {goal['fixed_s3 mean']:.1f} ± "
             f"{goal['fixed_s3 std']:.1f}."]  # fmt: skip
    for v, r in goal["heldout"].items():
        lines.append(
            f"- {v}: {r['mean corruption error']:.1f} ({r['above best fixed']:+.1f} vs best fixed: "
            f"{'within' if r['within best fixed std'] else 'outside'} its std; "
            f"{-r['below fixed_s3']:+.1f} vs fixed_s3, seed spread {r['seed spread']:.1f}: "
            f"{'met' if r['beats fixed_s3'] else 'not met'}); final severity {r['final severity']:.2f}"
        )
    lines.append(f"- final severities agree within x{goal['final severity ratio']:.2f} "
                 f"({'met' if goal['severities agree'] else 'not met'}: goal x1.5). "
                 f"Goal {'met' if goal['met'] else 'not met'}.")  # fmt: skip
    return lines


def plots(runs: list[Run], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = {"minimize": "C0", "adversarial": "C3", "heldout": "C2"}
    # 1. trajectories of the learned severity (what the ops received: bounded)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for run in runs:
        cfg = run.result["config"]
        if cfg["aug_type"] != LEARNED:
            continue
        traj = run.result["severity_trajectory"]
        obj = cfg["severity_objective"]
        ax.plot([t["step"] for t in traj], [t["severity_median"] for t in traj],
                color=colours[obj], alpha=0.7, lw=1,
                ls={1.0: ":", 3.0: "-", 8.0: "--"}.get(cfg["initial_aug_severity"], "-"),
                label=run.variant if run.variant not in seen else None)  # fmt: skip
        seen.add(run.variant)
    best = min((v for v in summary if v.startswith("fixed")),
               key=lambda v: summary[v]["mean corruption error"]["mean"], default=None)  # fmt: skip
    if best:
        ax.axhline(summary[best]["final severity median"]["mean"], color="black", lw=0.8,
                   label=f"best fixed severity ({best})")  # fmt: skip
    ax.axhline(runs[0].result["config"]["max_severity"], color="grey", ls=":", label="bound")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("median severity received by the ops")
    ax.set_title("Learned AugMix severity (one line per seed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "severity_trajectory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. corruption error against severity: the sweep as a curve, the learned variants placed on it
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed = sorted(
        (summary[v]["final severity median"]["mean"], v) for v in summary if v.startswith("fixed")
    )
    if fixed:
        xs = [s for s, _ in fixed]
        for metric, ls in (("mean corruption error", "-"), ("clean error", "--")):
            ax.errorbar(xs, [summary[v][metric]["mean"] for _, v in fixed],
                        yerr=[summary[v][metric]["std"] for _, v in fixed], color="black", ls=ls,
                        marker="o", capsize=3, label=f"fixed severity: {metric}")  # fmt: skip
    for v, s in summary.items():
        if v.startswith("fixed"):
            continue
        obj = v.split("_")[1]
        for metric, marker in (("mean corruption error", "D"), ("clean error", "s")):
            ax.errorbar(s["final severity median"]["mean"], s[metric]["mean"],
                        xerr=s["final severity median"]["std"], yerr=s[metric]["std"],
                        color=colours[obj], marker=marker, capsize=3, ls="none",
                        label=f"{v}: {metric}" if metric == "mean corruption error" else None)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("severity received by the ops (learned: final median)")
    ax.set_ylabel("error (%), mean over seeds")
    ax.set_title(
        "Error against severity (circles: fixed sweep; diamonds: learned, -C;\n"
        "squares: learned, clean)",
        fontsize=10,
    )
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    paths.append(out / "error_vs_severity.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def prep_cost(args, out: Path) -> None:
    """CPU time to prepare one held-out image at ImageNet size: decode + resize 256 + crop 224 of
    a ~500x375 JPEG, one validation corruption, JPEG encode (augmix_gpu.data.heldout)."""
    import tempfile

    from _common import photo_like
    from PIL import Image

    from augmix_gpu.data.heldout import _prepare_one
    from augmix_gpu.data.make_c import image_seed
    from augmix_gpu.protocols import EXTRA_CORRUPTIONS

    rows, per = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = []
        for i in range(args.prep_cost):
            path = Path(tmp) / f"{i}.JPEG"
            Image.fromarray(photo_like(500, seed=i)[:375]).save(path, quality=90)
            srcs.append(path)
        for c in EXTRA_CORRUPTIONS:
            times = []
            for i, src in enumerate(srcs):
                sev = 1 + i % 5
                start = time.process_time()
                _prepare_one((str(src), str(Path(tmp) / f"out{i}.JPEG"), 224, 256, c, sev,
                              image_seed(0, c, sev, i)))  # fmt: skip
                times.append(time.process_time() - start)
            per[c] = statistics.median(times) * 1000
            rows.append([c, f"{per[c]:.1f}"])
    mean = statistics.fmean(per.values())
    rows.append(["mean (round-robin assignment)", f"{mean:.1f}"])
    rows.append(["10,000 images (the default), core-minutes", f"{mean * 10_000 / 60_000:.1f}"])
    table = markdown_table(["corruption", "CPU ms per image (median)"], rows)
    print(table)
    write_json(out / "prep_cost.json", {"benchmark": "heldout_prep_cost", "args": vars(args),
               "environment": environment_info(), "ms_per_image": per, "mean_ms": mean})  # fmt: skip


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prep_cost:
        prep_cost(args, out)
        return
    if args.budget:
        budget_curve(args, out)
        return
    start = time.perf_counter()
    runs = _runs(args, out, args.epochs)
    run_all(runs, jobs=args.jobs, reuse=args.reuse, on_done=_report)
    summary = summarize_runs(runs, METRICS)
    labels = list(METRICS)
    baseline = "fixed_s3" if "fixed_s3" in summary else None
    table = markdown_table(["variant", *labels], summary_table(summary, labels, baseline, DIGITS))
    note = (f"mean ± std over seeds {args.seeds}, {args.epochs} epochs; * = differs from `{baseline}` "
            "(the default severity) by more than 2 standard errors of the difference. Errors in %; "
            "final severity: what the ops received (fixed: the value; learned: the bounded median "
            f"at the end); wall time with {args.jobs} runs at a time on a shared 2-core machine.")  # fmt: skip
    goal = goal_check(summary)
    goal_text = "\n".join(goal_lines(goal))
    print(table)
    print(note)
    print(goal_text)
    pngs = plots(runs, summary, out)
    (out / "table.md").write_text(table + "\n\n" + note + "\n\n" + goal_text + "\n")
    first = runs[0].result["config"]
    write_json(out / "study.json", {
        "benchmark": "severity_study", "args": vars(args), "environment": environment_info(),
        "config": {k: first[k] for k in ("arch", "epochs", "batch", "crop_size", "lr", "optimizer",
                                         "synthetic_train_per_class", "synthetic_val_per_class",
                                         "beta_jsd", "beta_augmenter_reg", "severity_update_every",
                                         "severity_hyper_lr", "heldout_images", "heldout_seed",
                                         "max_severity")},
        "summary": summary, "goal": goal, "seconds": time.perf_counter() - start,
        "per_run": {v: [{"seed": r.seed, "robustness": r.result.get("robustness"),
                         "history": r.result["history"], "heldout": r.result.get("heldout"),
                         "severity_trajectory": r.result["severity_trajectory"],
                         "seconds": r.result["_seconds"], "cpu_seconds": r.result["_cpu_seconds"]}
                        for r in runs if r.variant == v] for v in summary},
        "pngs": [str(p) for p in pngs],
    })  # fmt: skip
    print(f"wrote {out / 'study.json'}, {out / 'table.md'}, " + ", ".join(map(str, pngs)))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
