"""Does the severity's effect on the held-out loss show after one step, or only after many?

The shifted severity study (severity_study_shift.py) found the held-out split's NLL ~28 % higher
at s = 8 than at its minimum (s ~ 0.8) after whole runs, while the held-out objective's one-step
hypergradient from s = 8 averaged zero. This probe measures the horizon directly, by common random
numbers: from one trained checkpoint, K training steps at s = 0.8 and the same K steps (same
batches, same AugMix draws, only the magnitudes differ) at s = 8, then the held-out NLL of both.
The difference d(K) = NLL(s = 8) - NLL(s = 0.8), over ``--repeats`` seeds (other batches and
draws), says how fast the severity's effect builds up (near zero at K = 1 and clearly positive
at larger K would be the short-horizon bias of a one-step hypergradient; it is not what was found:
docs/studies.md). Each run is read twice: as trained, and with the start's BatchNorm running
statistics put back (the weights' change alone, which is all a lookahead models).

Every run starts from the same weights with a fresh AdamW at a constant learning rate (the
schedule's value two thirds into a run: ``LR``; ``--extra`` changes the optimiser), so the only
difference within a pair is the severity.

Beside the pairs, the held-out objective's own hypergradient at s = 8 from the same checkpoint
and optimiser settings (``--estimator_steps``: one per step, the severity held in place): does the
estimator see what the pairs see?

    python benchmarks/severity_study_horizon.py            # needs the study's fixed_s8 seed 0 run
    python benchmarks/severity_study_horizon.py --steps 1 10 30 90 --repeats 5
    python benchmarks/severity_study_horizon.py --low 6 --steps 1 10 --estimator_steps 0  # local
    python benchmarks/severity_study_horizon.py --steps 1 10 --lengths fixed --tag sgd \
        --extra --optimizer sgd --momentum 0 --lr 0.05   # no momentum: one step is the lookahead
    python benchmarks/severity_study_horizon.py --steps 1 --lengths fixed --tag paired \
        --extra --severity_estimator paired              # the paired estimator
    python benchmarks/severity_study_horizon.py --stage 2 --steps 1 --lengths fixed \
        --tag stage2 --extra --severity_estimator paired # from the end of epoch 2 (1..12)
    python benchmarks/severity_study_horizon.py --stage 4 --steps 10 30 --low 0.3 --high 0.8 \
        --estimator_steps 0 --tag stage4-k10   # a pair below the optimum (0.8 runs reused)

Writes ``benchmarks/results/severity_study_shift/horizon.json`` and ``horizon.md`` (with
``--low``: ``horizon-low<LOW>.*``, ``--high``: ``...-high<HIGH>``, with ``--tag``: ``horizon-<TAG>.*``); the runs go under
``horizon_runs/`` (not committed) and are reused.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402
from _study import REPO, Run, pooled_z, run_all  # noqa: E402
from severity_study_shift import BUDGET, prepare_sets  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "severity_study_shift"
HIGH = 8.0  # the grid's top, where the study's held-out runs stayed
LOW = 0.8  # the held-out NLL's fitted minimum (0.81); --low 6 asks for a local difference
LR = 5e-4  # the study's cosine at 2/3 of a run: 2e-3 x (1 + cos(2 pi / 3)) / 2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--start", default=str(OUT / "runs" / "fixed_s8" / "seed0"),
                   help="the run folder whose last.ckpt every probe starts from")  # fmt: skip
    p.add_argument("--steps", nargs="+", type=int, default=[1, 10, 30, 90])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--low", type=float, default=LOW,
                   help="the lower severity of each pair (the other is 8); not 0.8: the files "
                        "are named horizon-low<LOW>")  # fmt: skip
    p.add_argument("--high", type=float, default=HIGH,
                   help="the higher severity of each pair (not 8: the files are named "
                        "horizon-...-high<HIGH>); with --low, a pair anywhere on the grid")  # fmt: skip
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=LENGTHS,
                   help="the estimator's --severity_step_length values")  # fmt: skip
    p.add_argument("--tag", default="",
                   help="a name for a variant (its runs and files: horizon-<TAG>.*), with --extra")  # fmt: skip
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more train.py flags for every run (e.g. --optimizer sgd --lr 0.05)")  # fmt: skip
    p.add_argument("--stage", type=int, default=None,
                   help="start instead from the end of this epoch of the same run (fixed_s8, "
                        "seed 0), made again by train.py stopped there and resumed: where in "
                        "training does the one-step slope turn?")  # fmt: skip
    p.add_argument("--estimator_steps", type=int, default=90,
                   help="and the held-out objective's own hypergradient at s = 8 from the same "
                        "checkpoint, one per step for this many steps (0: skip)")  # fmt: skip
    return p.parse_args()


def difference_stats(d: list[float]) -> dict:
    """Mean, standard error and t of the paired differences (t = mean / se)."""
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"values": d, "mean": mean, "se": se, "t": mean / se if se > 0 else float("nan")}


@functools.lru_cache(maxsize=4)
def _batchnorm_statistics(ckpt: Path) -> dict:
    """{module name: (running mean, running var)} of a checkpoint's BatchNorm layers, read once."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from augmix_gpu.eval.model import load_checkpoint_model

    model = load_checkpoint_model(ckpt, "cpu").model
    return {n: (m.running_mean.clone(), m.running_var.clone())
            for n, m in model.named_modules() if isinstance(m, _BatchNorm)}  # fmt: skip


def heldout_nll(ckpt: Path, heldout: Path, statistics_of: Path | None = None) -> float:
    """The held-out split's NLL (the objective's loss) of a checkpoint, as the study reads it;
    ``statistics_of``: with the BatchNorm running statistics of that checkpoint instead of its
    own (the weights' part of a change alone: a training step also moves those statistics toward
    its views', which the held-out objective's lookahead leaves out)."""
    import json

    from severity_study_eval import _logits, scores
    from torch.nn.modules.batchnorm import _BatchNorm

    from augmix_gpu.eval.model import load_checkpoint_model

    loaded = load_checkpoint_model(ckpt, "cpu")
    if statistics_of is not None:
        start_stats = _batchnorm_statistics(statistics_of)
        for name, m in loaded.model.named_modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(start_stats[name][0])
                m.running_var.copy_(start_stats[name][1])
    cfg = json.loads((ckpt.parent / "config.json").read_text())
    held = _logits(loaded.model, heldout, "corrupted", classes=loaded.classes,
                   crop=cfg["crop_size"], resize=cfg["val_resize"])  # fmt: skip
    return scores(*held)["nll"]


def segment_flags(start: Path, steps: int, extra: list[str]) -> list[str]:
    """K steps from ``start`` at the study's budget: a fresh AdamW at ``LR``, constant (unless
    ``extra`` says otherwise)."""
    return [*BUDGET, "--synthetic_shift", "none", "--no_c_eval", "--epochs", "1",
            "--pretrained", str(start), "--max_steps_per_epoch", str(steps),
            "--schedule", "constant", "--warmup_epochs", "0", "--lr", f"{LR:g}", *extra]  # fmt: skip


LENGTHS = ("fixed", "free")  # --severity_step_length: the estimator both ways


def estimator_runs(start: Path, steps: int, repeats: int, out: Path, length: str,
                   extra: list[str]) -> list[Run]:  # fmt: skip
    """The held-out objective at s = 8 from the same checkpoint and optimiser settings, one
    hypergradient per step (``--severity_update_every 1``) and a hyper learning rate too small to
    move the severity: its per-run mean, standard error and SNR over ``steps`` updates."""
    flags = [*segment_flags(start, steps, extra), "--aug_type", "learnable_augmix_jsd",
             "--severity_objective", "heldout", "--initial_aug_severity", f"{HIGH:g}",
             "--severity_update_every", "1", "--severity_hyper_lr", "1e-9",
             "--severity_step_length", length]  # fmt: skip
    name = "estimator" if length == "fixed" else f"estimator-{length}"
    return [Run(name, r, flags, out / name / f"seed{r}") for r in range(repeats)]


def estimator_line(length: str, runs: list[Run], steps: int) -> tuple[dict, str]:
    """The estimator's per-run signal-to-noise and their pooled z (sum over sqrt(runs))."""
    per_run = [{k: r.result["history"][0].get(k) for k in
                ("hypergrad_updates", "hypergrad_mu_mean", "hypergrad_mu_se", "hypergrad_snr")}
               for r in runs]  # fmt: skip
    pooled = pooled_z([h["hypergrad_snr"] for h in per_run])
    snrs = ", ".join(f"{h['hypergrad_snr']:+.2f}" for h in per_run)
    line = f"- step length {length}: SNR per seed {snrs}; pooled z {pooled:+.2f}"
    return {"steps": steps, "runs": per_run, "pooled z": pooled}, line


STEPS_PER_EPOCH = 93  # the study's budget: 3000 training images, batch 32


def stage_checkpoint(stage: int, out: Path) -> Path:
    """The study's fixed_s8 seed 0 run at the end of epoch ``stage``: the run made again in
    segments (``--debug_stop_at_step`` at each asked epoch's last step, then ``--resume auto``:
    exact, so its epoch 12 is the study's run), each stage's checkpoint kept in its own folder."""
    import os
    import shutil
    import subprocess

    from severity_study_shift import _flags

    from augmix_gpu.checkpoint import load_checkpoint

    folder = out / "horizon_runs" / "stages"
    dest = folder / f"e{stage}" / "augmix_jsd"
    if (dest / "last.ckpt").is_file():
        return dest.parent
    study_args = argparse.Namespace(shift="none", epochs=12, extra=[])
    run = Run("fixed_s8", 0, _flags("fixed_s8", study_args), folder / "run")
    done = folder / "run" / "augmix_jsd" / "last.ckpt"
    target = STEPS_PER_EPOCH * stage
    command = run.command() + ["--debug_stop_at_step", str(target)]
    if done.is_file() and load_checkpoint(done)["train_state"]["global_step"] < target:
        command += ["--resume", "auto"]  # on from the latest stage made
    else:
        shutil.rmtree(folder / "run", ignore_errors=True)  # past it: from the start again
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"--stage {stage}: train.py exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("last.ckpt", "config.json"):
        shutil.copy2(done.parent / name, dest / name)
    return dest.parent


def main() -> None:
    args = parse()
    if args.stage is not None:
        args.start = str(stage_checkpoint(args.stage, Path(args.out)))
    start = next(Path(args.start).glob("*/last.ckpt"), None)
    if start is None:
        sys.exit(
            f"--start {args.start}: no */last.ckpt (run the shifted study's fixed sweep first)"
        )
    study_args = argparse.Namespace(shift="none", epochs=12, extra=[])
    heldout, _, _ = prepare_sets(study_args)
    runs_dir = Path(args.out) / "horizon_runs" / args.tag  # the tag's own runs
    runs = [
        Run(f"K{k}_s{s:g}", r,
            [*segment_flags(start, k, args.extra), "--aug_type", "augmix_jsd", "--initial_aug_severity", f"{s:g}"],
            runs_dir / f"K{k}_s{s:g}" / f"seed{r}")
        for k in args.steps for r in range(args.repeats) for s in (args.low, args.high)
    ]  # fmt: skip
    estimators = {length: estimator_runs(start, args.estimator_steps, args.repeats, runs_dir,
                                         length, args.extra)
                  for length in (args.lengths if args.estimator_steps else ())}  # fmt: skip
    run_all(runs + [r for rs in estimators.values() for r in rs], jobs=2, reuse=True)
    base = heldout_nll(start, heldout)
    lo, hi = f"{args.low:g}", f"{args.high:g}"
    record = {"benchmark": "severity_study_horizon", "args": vars(args),
              "environment": environment_info(), "start": str(start), "lr": LR,
              "start held-out NLL": base, "steps": {}}  # fmt: skip
    how = f"AdamW at lr {LR:g}" + (f", then {' '.join(args.extra)}" if args.extra else "")
    text = f"From {start} (held-out NLL {base:.4f}), {how}, {args.repeats} seeds per K."
    readings = {"as trained": None, "weights only (the start's BatchNorm statistics)": start}
    for reading, statistics_of in readings.items():
        nll = {(r.variant, r.seed): heldout_nll(r.finished().parent / "last.ckpt", heldout,
                                                statistics_of) for r in runs}  # fmt: skip
        rows, record["steps"][reading] = [], {}
        for k in args.steps:
            pairs = [(nll[(f"K{k}_s{lo}", r)], nll[(f"K{k}_s{hi}", r)])
                     for r in range(args.repeats)]  # fmt: skip
            d = difference_stats([b - a for a, b in pairs])
            record["steps"][reading][str(k)] = {f"s={lo}": [a for a, _ in pairs],
                                                f"s={hi}": [b for _, b in pairs],
                                                "difference": d}  # fmt: skip
            rows.append([str(k), f"{statistics.fmean(a for a, _ in pairs):.4f}",
                         f"{statistics.fmean(b for _, b in pairs):.4f}",
                         f"{d['mean']:+.4f} ± {d['se']:.4f}", f"{d['t']:+.1f}",
                         f"{sum(x > 0 for x in d['values'])}/{len(pairs)}"])  # fmt: skip
        table = markdown_table(
            ["steps K", f"held-out NLL, s = {lo}", f"s = {hi}", "difference (mean ± se)", "t",
             "pairs > 0"], rows)  # fmt: skip
        text += f"\n\nHeld-out NLL {reading}:\n\n{table}"
    if estimators:
        record["estimator"], lines = {}, []
        for length, est in estimators.items():
            record["estimator"][length], line = estimator_line(length, est, args.estimator_steps)
            lines.append(line)
        text += (f"\n\nThe held-out objective's hypergradient of mu at s = {HIGH:g} from the same "
                 f"checkpoint, one per step over {args.estimator_steps} steps (> 0: the severity "
                 "is pushed down, as the paired differences above say it should be):\n\n"
                 + "\n".join(lines))  # fmt: skip
    print(text)
    out = Path(args.out)
    name = "horizon" + ("" if args.low == LOW else f"-low{args.low:g}")
    name += "" if args.high == HIGH else f"-high{args.high:g}"
    name += f"-{args.tag}" if args.tag else ""
    (out / f"{name}.md").write_text(text + "\n")
    write_json(out / f"{name}.json", record)
    print(f"wrote {out / (name + '.json')}, {out / (name + '.md')}")


if __name__ == "__main__":
    main()
