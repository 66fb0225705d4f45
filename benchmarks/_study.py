"""Shared machinery of the studies: train.py runs per (variant, seed), a few at a time, then
mean +- std over seeds and a coarse spread screen.

Each run is a fresh ``train.py`` process on the embedded task (the whole pipeline: DALI, AugMix on
tensors, the trainer, the -C evaluation); its ``results.json`` is the record. Runs are timed in
wall seconds and in CPU seconds of the process and its threads (``os.wait4``): on a shared machine
the CPU time is the figure that does not depend on what else runs.

    from _study import Run, beyond_spread, dig, run_all, summarize, summary_table
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def dig(d: dict, path: str):
    """``d["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std); std 0 for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pooled_z(snrs: Sequence[float]) -> float:
    """Independent signal-to-noise ratios pooled into one z: their sum over sqrt(their number)."""
    return sum(snrs) / math.sqrt(len(snrs))


def beyond_spread(a: Sequence[float], b: Sequence[float]) -> bool:
    """|mean_a - mean_b| > 2 standard errors of the difference (Welch): a coarse screen."""
    if len(a) < 2 or len(b) < 2:
        return False
    (ma, sa), (mb, sb) = summarize(a), summarize(b)
    return abs(ma - mb) > 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))


# The budget every study was run with: the demo's until it moved to batch 32, 12 epochs and the
# channels-last layout (configs/demo.toml); pinned so that the studies' recorded figures stay
# reproducible (another layout sums in another order: another trajectory, as another thread count).
STUDY_BUDGET = ["--batch", "64", "--epochs", "8", "--warmup_epochs", "0.5", "--no-channels_last",
                "--synthetic_val_per_class", "30"]  # fmt: skip


@dataclass
class Run:
    """One train.py run: ``flags`` on top of ``--config demo.toml`` at ``STUDY_BUDGET``, written
    under ``out``."""

    variant: str
    seed: int
    flags: list[str]
    out: Path
    result: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "train.py"), "--config", "demo.toml", *STUDY_BUDGET,
                *self.flags,
                "--seed", str(self.seed), "--ckpt_dir_base", str(self.out), "--no_progress",
                "--wandb", "disabled", "--workers", "1"]  # fmt: skip

    def finished(self) -> Path | None:
        return next(iter(self.out.glob("*/results.json")), None)


def prepare_caches(runs: Sequence[Run]) -> None:
    """Make the data the runs need (the synthetic set, its -C set, held-out sets) once, here,
    before runs go in parallel: two runs generating the same cache at once would race."""
    sys.path.insert(0, str(REPO))
    import torch

    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.train.config import resolve_settings
    from augmix_gpu.train.data import prepare_data, prepare_heldout

    env = DistEnv(0, 0, 1, torch.device("cpu"), None)
    done = set()
    for run in runs:
        settings = resolve_settings(run.command()[2:])
        # the data a run makes: the synthetic task's and the held-out set's settings
        key = json.dumps([settings.data, settings.robustness, settings.severity,
                          settings.augment.aug_type], default=repr)  # fmt: skip
        if key not in done:
            done.add(key)
            prepare_heldout(settings, env, prepare_data(settings, env))


def _load(run: Run, wall: float, cpu: float) -> dict:
    res = json.loads(run.finished().read_text())
    timing_file = run.out / "timing.json"
    if wall == wall:  # a fresh run: record its timing beside its results
        timing_file.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    elif timing_file.is_file():  # reused: the timing of the run that made it
        t = json.loads(timing_file.read_text())
        wall, cpu = t["wall_s"], t["cpu_s"]
    res["_seconds"], res["_cpu_seconds"] = wall, cpu
    return res


def run_all(
    runs: Sequence[Run],
    *,
    jobs: int = 2,
    reuse: bool = False,
    on_done: Callable[[Run], None] | None = None,
) -> None:
    """Train every run (``jobs`` at a time, one intra-op thread each); fills ``run.result``.

    ``reuse``: a run whose ``results.json`` exists is read, not trained again (a study stopped
    half-way continues where it was).
    """
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    prepare_caches([run for run in runs if not (reuse and run.finished())])
    pending = []
    bar = tqdm(total=len(runs), desc="runs", unit="run", dynamic_ncols=True)
    for run in runs:
        if reuse and run.finished():
            run.result = _load(run, float("nan"), float("nan"))
            bar.update()
            if on_done:
                on_done(run)
        else:
            pending.append(run)
    active: dict[int, tuple[Run, subprocess.Popen, float, Path]] = {}
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            run.out.mkdir(parents=True, exist_ok=True)
            log = run.out / "train.log"
            with log.open("w") as f:
                proc = subprocess.Popen(run.command(), cwd=REPO, env=env, stdout=f, stderr=f)
            active[proc.pid] = (run, proc, time.perf_counter(), log)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in active:
            continue
        run, proc, start, log = active.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            for _, p, _, _ in active.values():
                p.kill()
            raise SystemExit(
                f"{run.variant} seed {run.seed} failed (exit {proc.returncode}):\n"
                + log.read_text()[-3000:]
            )
        run.result = _load(run, time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
        bar.update()
        if on_done:
            on_done(run)
    bar.close()


def summarize_runs(
    runs: Sequence[Run], metrics: dict[str, Callable[[dict], float | None]]
) -> dict[str, dict[str, dict | None]]:
    """``summary[variant][metric] = {"values": [...], "mean": m, "std": s}`` (None: no values)."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    out: dict[str, dict[str, dict | None]] = {}
    for variant, rs in by_variant.items():
        out[variant] = {}
        for label, metric in metrics.items():
            vals = [v for v in (metric(r.result) for r in rs) if v is not None]
            out[variant][label] = (
                {"values": vals, **dict(zip(("mean", "std"), summarize(vals)))} if vals else None
            )
    return out


def summary_table(
    summary: dict, labels: Sequence[str], baseline: str | None, digits: dict[str, int] | None = None
) -> list[list[str]]:
    """Rows ``[variant, "m ± s[ *]", ...]``; ``*``: beyond the spread of ``baseline``."""
    rows = []
    for variant, metrics in summary.items():
        row = [variant]
        for label in labels:
            s = metrics.get(label)
            if s is None:
                row.append("–")
                continue
            mark = ""
            base = summary.get(baseline, {}).get(label) if baseline else None
            if variant != baseline and base is not None:
                mark = " *" if beyond_spread(s["values"], base["values"]) else ""
            d = (digits or {}).get(label, 1)
            row.append(f"{s['mean']:.{d}f} ± {s['std']:.{d}f}{mark}")
        rows.append(row)
    return rows


# --- statistics that say what they can (the shifted severity study) ---------------------------


@dataclass(frozen=True)
class QuadraticFit:
    """``y = b0 + b1 x + b2 x^2`` (+ one effect per group beyond the first, with ``groups``) by
    least squares over every run (not over the means), with the covariance of the coefficients.

    Groups: the seeds of a sweep where every severity ran with every seed (the same initial
    weights and data order across severities), so the seed's own effect, common to a seed's runs,
    leaves the residual; with every seed at every severity it does not move b1 or b2.
    ``p_curvature``: two-sided t-test of ``b2 = 0``; ``p_model``: F-test of (b1, b2) = 0 (against
    the constant, or the groups alone). The minimum ``-b1 / (2 b2)`` has a delta-method error.
    ``predict`` is the mean over the groups at x."""

    coef: tuple[float, ...]  # b0, b1, b2, then the groups' effects
    cov: tuple[tuple[float, ...], ...]
    dof: int
    sigma2: float  # residual variance around the curve (within a seed, with groups)
    p_curvature: float
    p_model: float
    mean_row: tuple[float, ...] = ()  # the groups' columns averaged over the runs

    @property
    def vertex(self) -> float:
        return -self.coef[1] / (2 * self.coef[2])

    @property
    def vertex_se(self) -> float:
        b1, b2 = self.coef[1], self.coef[2]
        return math.sqrt(self._quad([0.0, -1 / (2 * b2), b1 / (2 * b2**2)]))

    def _quad(self, v: Sequence[float]) -> float:
        """v^T cov v over the first len(v) coefficients."""
        return sum(v[i] * self.cov[i][j] * v[j] for i in range(len(v)) for j in range(len(v)))

    def predict(self, x: float) -> tuple[float, float]:
        """(fitted mean at x, its standard error)."""
        v = [1.0, x, x * x, *self.mean_row]
        return sum(c * vi for c, vi in zip(self.coef, v)), math.sqrt(self._quad(v))

    def run_interval(self, x: float, level: float = 0.95) -> tuple[float, float]:
        """Where one new run at x lands with probability ``level`` (prediction interval; with
        groups, one more run of a seed of the sweep)."""
        from scipy import stats

        mean, se = self.predict(x)
        half = stats.t.ppf(0.5 + level / 2, self.dof) * math.sqrt(se**2 + self.sigma2)
        return mean - half, mean + half


def _least_squares(design, ys):
    """(coefficients, residual sum of squares) of ys on the columns of design."""
    import numpy as np

    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    resid = ys - design @ coef
    return coef, float(resid @ resid)


def quadratic_fit(
    x: Sequence[float], y: Sequence[float], groups: Sequence[Any] | None = None
) -> QuadraticFit:
    """Ordinary least squares of y on (1, x, x^2[, group indicators]); see :class:`QuadraticFit`."""
    import numpy as np
    from scipy import stats

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    levels = sorted(set(groups)) if groups is not None else []
    extra = [np.array([g == lv for g in groups], dtype=float) for lv in levels[1:]]
    base = np.stack([np.ones_like(xs), *extra], axis=1)  # the model without x
    design = np.concatenate([base[:, :1], xs[:, None], xs[:, None] ** 2, base[:, 1:]], axis=1)
    coef, ss_full = _least_squares(design, ys)
    _, ss_reduced = _least_squares(base, ys)
    dof = len(ys) - design.shape[1]
    sigma2 = ss_full / dof
    cov = sigma2 * np.linalg.inv(design.T @ design)
    t = coef[2] / math.sqrt(cov[2, 2])
    f = (ss_reduced - ss_full) / 2 / sigma2
    return QuadraticFit(
        coef=tuple(float(c) for c in coef),
        cov=tuple(tuple(float(v) for v in row) for row in cov),
        dof=dof,
        sigma2=sigma2,
        p_curvature=float(2 * stats.t.sf(abs(t), dof)),
        p_model=float(stats.f.sf(f, 2, dof)),
        mean_row=tuple(float(c.mean()) for c in extra),
    )


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of a minus mean of b, its ``level`` interval (Welch-Satterthwaite) and the two-sided
    p-value. Where the interval holds 0, ``max(|lo|, |hi|)`` is the largest difference the data
    still allow: "no difference above X points"."""
    from scipy import stats

    (ma, sa), (mb, sb) = summarize(a), summarize(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se else 1.0
    half = stats.t.ppf(0.5 + level / 2, dof) * se
    diff = ma - mb
    p = float(2 * stats.t.sf(abs(diff) / se, dof)) if se else (1.0 if diff == 0 else 0.0)
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "p": p, "dof": dof}


def write_table(out: str | os.PathLike, benchmark: str, args, headers, rows, **record) -> str:
    """Print a markdown table and write it, the arguments, the environment and ``record`` as the
    benchmark's JSON (the probes' one way to report)."""
    from _common import environment_info, markdown_table, write_json

    table = markdown_table(headers, rows)
    print(table)
    write_json(out, {"benchmark": benchmark, "args": vars(args),
                     "environment": environment_info(), **record, "table": table})  # fmt: skip
    return table
