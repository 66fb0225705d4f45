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
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402

# variant name -> train.py flags (on top of configs/demo.toml)
VARIANTS: dict[str, list[str]] = {
    "none": ["--aug_type", "none"],
    "augmix": ["--aug_type", "augmix"],
    "augmix_jsd": ["--aug_type", "augmix_jsd"],
    "learnable_min": ["--aug_type", "learnable_augmix_jsd", "--severity_objective", "minimize"],
    "learnable_adv": ["--aug_type", "learnable_augmix_jsd", "--severity_objective", "adversarial"],
}
METRICS = {  # label -> value from a run's robustness block (all % and lower is better)
    "clean error": lambda r: dig(r, "clean.error"),
    "mean corruption error": lambda r: dig(r, "imagenet_c.mean_corruption_error"),
    # what corruption adds on top of the clean error: the robustness effect apart from accuracy
    "corruption gap": lambda r: dig(r, "imagenet_c.mean_corruption_error") - dig(r, "clean.error"),
    "mCE (AlexNet-norm.)": lambda r: dig(r, "imagenet_c.mce"),
    "clean RMS calib.": lambda r: dig(r, "clean.rms_calibration_error"),
    "-C RMS calib.": lambda r: dig(r, "imagenet_c.calibration.mean_rms_calibration_error"),
    # ImageNet-P stability (the demo's generated -P set): mean flip probability (%) and top-5
    # distance over the 10 perturbations; mFR / mT5D only where a normaliser exists (robustness.py)
    "-P flip prob.": lambda r: dig(r, "imagenet_p.mean_flip_probability"),
    "-P top-5 dist.": lambda r: dig(r, "imagenet_p.mean_top5_distance"),
    "mFR": lambda r: dig(r, "imagenet_p.mfr"),
    "mT5D": lambda r: dig(r, "imagenet_p.mt5d"),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the demo preset's epochs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "robustness_study"))
    p.add_argument(
        "--reuse", action="store_true", help="read finished runs' results.json, train the rest"
    )
    p.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags, last"
    )
    return p.parse_args()


def dig(d: dict, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def run_one(variant: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    run = out / "runs" / variant / f"seed{seed}"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", "demo.toml", *VARIANTS[variant],
           "--seed", str(seed), "--ckpt_dir_base", str(run), "--c_severities", "1", "2", "3", "4", "5",
           "--no_progress", "--wandb", "disabled"]  # fmt: skip
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    cmd += args.extra
    done = list(run.glob("*/results.json"))
    if args.reuse and done:
        res = json.loads(done[0].read_text())
        res["_seconds"] = float("nan")
        return res
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results_path = next((run).glob("*/results.json"))
    res = json.loads(results_path.read_text())
    res["_seconds"] = time.perf_counter() - start
    return res


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def beyond_spread(a: list[float], b: list[float]) -> bool:
    if len(a) < 2 or len(b) < 2:
        return False
    (ma, sa), (mb, sb) = summarize(a), summarize(b)
    return abs(ma - mb) > 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def plots(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from augmix_gpu.robustness import CORRUPTIONS

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
        ax.set_ylabel("median severity exp(mu)")
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
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    start = time.perf_counter()
    for seed in args.seeds:  # seeds outermost: a partial study still covers every variant
        for variant in args.variants:
            res = run_one(variant, seed, args, out)
            runs[variant].append(res)
            rob = res.get("robustness", {})
            fp = dig(rob, "imagenet_p.mean_flip_probability")
            print(f"{variant:>14} seed {seed}: clean {dig(rob, 'clean.error'):.1f}%  "
                  f"mean corruption error {dig(rob, 'imagenet_c.mean_corruption_error'):.1f}%  "
                  + (f"-P flip prob. {fp:.2f}%  " if fp is not None else "")
                  + f"({res['_seconds']:.0f} s)", flush=True)  # fmt: skip

    summary: dict[str, dict] = {}
    for variant, rs in runs.items():
        summary[variant] = {}
        for label, metric in METRICS.items():
            vals = [metric(r["robustness"]) for r in rs]
            vals = [v for v in vals if v is not None]
            summary[variant][label] = (
                {"values": vals, **dict(zip(("mean", "std"), summarize(vals)))} if vals else None
            )
        if variant.startswith("learnable"):
            # the median exp(mu): E[s] ignores the (0, max_severity] bound and explodes with sigma
            finals = [r["history"][-1]["severity_median"] for r in rs]
            summary[variant]["final severity median"] = {
                "values": finals,
                **dict(zip(("mean", "std"), summarize(finals))),
            }
    baseline = "none" if "none" in runs else args.variants[0]
    rows = []
    for variant in args.variants:
        row = [variant]
        for label in METRICS:
            s = summary[variant][label]
            if s is None:
                row.append("–")
                continue
            mark = ""
            if variant != baseline and summary[baseline][label] is not None:
                mark = (
                    " *" if beyond_spread(s["values"], summary[baseline][label]["values"]) else ""
                )
            row.append(f"{s['mean']:.1f} ± {s['std']:.1f}{mark}")
        sev = summary[variant].get("final severity median")
        row.append(f"{sev['mean']:.2f} ± {sev['std']:.2f}" if sev else "–")
        rows.append(row)
    table = markdown_table(["mode", *METRICS, "final median s"], rows)
    note = (f"mean ± std over seeds {args.seeds}; * = differs from `{baseline}` by more than 2 standard "
            "errors of the difference (a coarse screen with this few seeds). Errors and flip probabilities "
            "in %; mFR / mT5D: – while no AlexNet normaliser is available (robustness.py).")  # fmt: skip
    print(table)
    print(note)
    pngs = plots(runs, out)
    (out / "table.md").write_text(table + "\n\n" + note + "\n")
    first = next(iter(runs.values()))[0]
    write_json(out / "study.json", {
        "benchmark": "robustness_study", "args": vars(args), "environment": environment_info(),
        "config": {k: first["config"][k] for k in ("arch", "epochs", "batch", "crop_size", "lr", "optimizer",
                                                 "synthetic_train_per_class", "synthetic_val_per_class",
                                                 "initial_aug_severity", "beta_jsd", "beta_augmenter_reg")},
        "summary": summary, "seconds": time.perf_counter() - start,
        "per_run": {v: [{"seed": r["config"]["seed"], "robustness": r.get("robustness"), "history": r["history"],
                          "severity_trajectory": r["severity_trajectory"], "seconds": r["_seconds"]} for r in rs]
                    for v, rs in runs.items()},
        "pngs": [str(p) for p in pngs],
    })  # fmt: skip
    print(f"wrote {out / 'study.json'}, {out / 'table.md'}, " + ", ".join(map(str, pngs)))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
