"""Does AugMix (and learning its severity) help? A small, honest version of the paper's experiment.

The same small model is trained on the embedded synthetic task under each mode and several seeds,
with the full pipeline (DALI -> AugMix on tensors -> the DDP loop -> -C evaluation), then the
clean error, the mean corruption error (mCE-style, AlexNet-normalised and unnormalised), the
calibration and the ImageNet-P stability (mean flip probability and top-5 distance on the demo's
generated -P set; mFR / mT5D where a normaliser exists) are reported as mean +- std over seeds, with the learned severity trajectories.

    python benchmarks/robustness_study.py                 # 5 variants x 3 seeds (make study)
    python benchmarks/robustness_study.py --seeds 0 --variants none augmix_jsd --epochs 2   # a quick look

A difference is called *larger than the seed spread* when |mean_a - mean_b| > 2 x the standard
error of the difference (Welch, sqrt(sd_a^2/n_a + sd_b^2/n_b)); with 3 seeds that is a coarse
screen, not a significance test, and the table says which differences pass it.
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

# variant name -> train.py flags (on top of configs/demo.toml)
VARIANTS: dict[str, list[str]] = {
    "none": ["--aug_type", "none"],
    "augmix": ["--aug_type", "augmix"],
    "augmix_jsd": ["--aug_type", "augmix_jsd"],
    "learnable_min": ["--aug_type", "learnable_augmix_jsd", "--severity_objective", "minimize"],
    "learnable_adv": ["--aug_type", "learnable_augmix_jsd", "--severity_objective", "adversarial"],
}


def _gap(r: dict) -> float | None:
    """What corruption adds on top of the clean error: the robustness effect apart from accuracy."""
    corrupted, clean = (
        dig(r, "robustness.imagenet_c.mean_corruption_error"),
        dig(r, "robustness.clean.error"),
    )
    return None if corrupted is None or clean is None else corrupted - clean


METRICS = {  # label -> value from a run's results.json (all % and lower is better)
    "clean error": lambda r: dig(r, "robustness.clean.error"),
    "mean corruption error": lambda r: dig(r, "robustness.imagenet_c.mean_corruption_error"),
    "corruption gap": _gap,
    "mCE (AlexNet-norm.)": lambda r: dig(r, "robustness.imagenet_c.mce"),
    "clean RMS calib.": lambda r: dig(r, "robustness.clean.rms_calibration_error"),
    "-C RMS calib.": lambda r: dig(r, "robustness.imagenet_c.calibration.mean_rms_calibration_error"),
    # ImageNet-P stability (the demo's generated -P set): mean flip probability (%) and top-5
    # distance over the 10 perturbations; mFR / mT5D only where a normaliser exists (eval/metrics.py)
    "-P flip prob.": lambda r: dig(r, "robustness.imagenet_p.mean_flip_probability"),
    "-P top-5 dist.": lambda r: dig(r, "robustness.imagenet_p.mean_top5_distance"),
    "mFR": lambda r: dig(r, "robustness.imagenet_p.mfr"),
    "mT5D": lambda r: dig(r, "robustness.imagenet_p.mt5d"),
    # the median severity the ops received at the end (the bounded one)
    "final median s": lambda r: r["history"][-1].get("severity_median") if r.get("history") else None,
}  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override the studies' 8 epochs (_study.STUDY_BUDGET)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "robustness_study"))
    p.add_argument(
        "--reuse", action="store_true", help="read finished runs' results.json, train the rest"
    )
    p.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags, last"
    )
    return p.parse_args()


def plots(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from augmix_gpu.protocols import CORRUPTIONS

    paths = []
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, (variant, rs) in enumerate(runs.items()):
        means = [
            statistics.fmean(dig(r, f"robustness.imagenet_c.corruption_error.{c}") for r in rs)
            for c in CORRUPTIONS
        ]
        clean = statistics.fmean(dig(r, "robustness.clean.error") for r in rs)
        ax.bar(
            [j + i * width for j in range(len(CORRUPTIONS) + 1)],
            [clean, *means],
            width,
            label=variant,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CORRUPTIONS) + 1)])
    ax.set_xticklabels(["clean", *CORRUPTIONS], rotation=45, ha="right")
    ax.set_ylabel("top-1 error (%), mean over seeds and severities")
    ax.legend(ncol=len(runs), fontsize=8)
    ax.set_title("Embedded task: error per corruption and mode")
    fig.tight_layout()
    paths.append(out / "error_per_corruption.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    learnable = {v: rs for v, rs in runs.items() if v.startswith("learnable")}
    if learnable:
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant, rs in learnable.items():
            for k, r in enumerate(rs):
                traj = r["severity_trajectory"]
                ax.plot([t["step"] for t in traj], [t["severity_median"] for t in traj],
                        color="C0" if variant == "learnable_min" else "C3", alpha=0.8,
                        label=variant if k == 0 else None)  # fmt: skip
        ax.axhline(
            rs[0]["config"]["initial_aug_severity"], color="grey", ls="--", label="prior mean"
        )
        ax.set_xlabel("training step")
        ax.axhline(
            rs[0]["config"]["max_severity"], color="black", ls=":", label="bound (s is clamped)"
        )
        ax.set_yscale("log")
        ax.set_ylabel("median severity received, min(exp(mu), bound)")
        ax.set_title("Learned AugMix severity (one line per seed)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "severity_trajectory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    flags = ["--c_severities", "1", "2", "3", "4", "5"]
    flags += ["--epochs", str(args.epochs)] if args.epochs else []
    runs = [
        Run(v, seed, VARIANTS[v] + flags + args.extra, out / "runs" / v / f"seed{seed}")
        for seed in args.seeds  # seeds outermost: a partial study still covers every variant
        for v in args.variants
    ]

    def report(run: Run) -> None:
        r = run.result
        fp = METRICS["-P flip prob."](r)
        print(f"{run.variant:>14} seed {run.seed}: clean {METRICS['clean error'](r):.1f}%  "
              f"mean corruption error {METRICS['mean corruption error'](r):.1f}%  "
              + (f"-P flip prob. {fp:.2f}%  " if fp is not None else "")
              + f"({r['_seconds']:.0f} s)", flush=True)  # fmt: skip

    run_all(runs, jobs=args.jobs, reuse=args.reuse, on_done=report)
    summary = summarize_runs(runs, METRICS)
    baseline = "none" if "none" in summary else args.variants[0]
    digits = {"final median s": 2}
    table = markdown_table(
        ["mode", *METRICS], summary_table(summary, list(METRICS), baseline, digits)
    )
    note = (f"mean ± std over seeds {args.seeds}; * = differs from `{baseline}` by more than 2 standard "
            "errors of the difference (a coarse screen with this few seeds). Errors and flip probabilities "
            "in %; mFR / mT5D: – while no AlexNet normaliser is available (eval/metrics.py).")  # fmt: skip
    print(table)
    print(note)
    by_variant = {v: [r.result for r in runs if r.variant == v] for v in args.variants}
    pngs = plots(by_variant, out)
    (out / "table.md").write_text(table + "\n\n" + note + "\n")
    first = runs[0].result
    write_json(out / "study.json", {
        "benchmark": "robustness_study", "args": vars(args), "environment": environment_info(),
        "config": {k: first["config"][k] for k in ("arch", "epochs", "batch", "crop_size", "lr", "optimizer",
                                                 "synthetic_train_per_class", "synthetic_val_per_class",
                                                 "initial_aug_severity", "beta_jsd", "beta_augmenter_reg")},
        "summary": summary, "seconds": time.perf_counter() - start,
        "per_run": {v: [{"seed": r["config"]["seed"], "robustness": r.get("robustness"), "history": r["history"],
                          "severity_trajectory": r["severity_trajectory"], "seconds": r["_seconds"],
                          "cpu_seconds": r["_cpu_seconds"]} for r in rs]
                    for v, rs in by_variant.items()},
        "pngs": [str(p) for p in pngs],
    })  # fmt: skip
    print(f"wrote {out / 'study.json'}, {out / 'table.md'}, " + ", ".join(map(str, pngs)))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
