"""The shifted severity study's statistics (benchmarks/_study.py, severity_study_shift.py): the
quadratic fit against simulation and numpy, Welch against scipy, the gate and the goal on data
made by hand."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import severity_study_shift as study  # noqa: E402
from _study import Run, quadratic_fit, welch  # noqa: E402

X = np.log(np.repeat(study.SWEEP, 5))  # the gate's design: 6 severities x 5 seeds


def _curve(x, b0=30.0, vertex=0.5, b2=2.0):
    return b0 + b2 * (x - vertex) ** 2


def test_quadratic_fit_matches_numpy_and_its_errors_match_simulation() -> None:
    """Coefficients as numpy's polyfit; the vertex's delta-method standard error as the spread of
    400 refits on fresh noise; the curvature test's false-alarm rate about 5 % on a line; the one-
    run interval covering about 95 % of new runs."""
    rng = np.random.default_rng(0)
    y = _curve(X) + rng.normal(0, 1.5, X.size)
    fit = quadratic_fit(X, y)
    assert fit.coef == pytest.approx(np.polyfit(X, y, 2)[::-1], rel=1e-9)
    vertices, covered, alarms = [], 0, 0
    for _ in range(400):
        f = quadratic_fit(X, _curve(X) + rng.normal(0, 1.5, X.size))
        vertices.append(f.vertex)
        lo, hi = f.run_interval(0.5)
        covered += lo <= _curve(0.5) + rng.normal(0, 1.5) <= hi
        alarms += quadratic_fit(X, 30 + 2 * X + rng.normal(0, 1.5, X.size)).p_curvature < 0.05
    assert fit.vertex_se == pytest.approx(np.std(vertices), rel=0.2)
    assert 0.92 <= covered / 400 <= 0.98
    assert 0.02 <= alarms / 400 <= 0.09


def test_welch_matches_scipy() -> None:
    a, b = [20.1, 21.5, 19.8, 22.0, 20.6], [23.0, 22.1, 25.3, 21.9, 24.4]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (w["lo"], w["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def _points(curve, seed_spread: float = 0.0, rng_seed: int = 1) -> list:
    """The gate's design: every severity with every seed, a seed's effect shared by its runs."""
    rng = np.random.default_rng(rng_seed)
    effects = rng.normal(0, seed_spread, 5)
    return [(math.log(s), seed, curve(math.log(s)) + effects[seed] + rng.normal(0, 1.0))
            for s in study.SWEEP for seed in range(5)]  # fmt: skip


def test_seed_blocks_leave_the_curve_and_take_the_seeds_spread_out() -> None:
    """Every seed at every severity: by seed, b1 and b2 are the plain fit's; the vertex's standard
    error (its median) matches the spread of 300 refits with fresh seed effects (4 points of spread, 1 within
    a seed), where the plain fit's is several times larger; a line is called curved about 5 %
    of the time; the prediction is the mean over seeds."""
    vertices, ses, alarms = [], [], 0
    for i in range(300):
        x, seeds, y = zip(*_points(_curve, seed_spread=4.0, rng_seed=10 + i))
        blocked = quadratic_fit(x, y, groups=seeds)
        vertices.append(blocked.vertex)
        ses.append(blocked.vertex_se)
        line = [yi - _curve(xi) + 30 + 2 * xi for xi, yi in zip(x, y)]  # the same noise
        alarms += quadratic_fit(x, line, groups=seeds).p_curvature < 0.05
    plain = quadratic_fit(x, y)
    assert blocked.coef[1:3] == pytest.approx(plain.coef[1:3], rel=1e-9)
    assert np.median(ses) == pytest.approx(np.std(vertices), rel=0.25)
    assert plain.vertex_se > 2.5 * blocked.vertex_se
    assert 0.02 <= alarms / 300 <= 0.09
    assert blocked.predict(0.5)[0] == pytest.approx(plain.predict(0.5)[0], rel=1e-9)


def test_gate_passes_an_interior_minimum_and_fails_a_monotone_curve() -> None:
    inside = study.sweep_fit(_points(lambda x: _curve(x, vertex=0.5, b2=3.0), seed_spread=4.0))
    assert inside["gate"]["passed"] and inside["optimum s"] == pytest.approx(math.exp(0.5), rel=0.2)
    assert inside["plain fit"]["optimum ln s se"] > inside["optimum ln s se"]
    falling = study.sweep_fit(_points(lambda x: 40 - 4 * x))  # the polarity probe's shape
    assert not falling["gate"]["passed"]
    at_edge = study.sweep_fit(_points(lambda x: _curve(x, vertex=math.log(8), b2=1.0)))
    assert not at_edge["gate"]["minimum inside by 2 se"]


def _run(variant: str, seed: int, final_s: float, error: float) -> Run:
    run = Run(variant, seed, [], Path())
    run.result = {"config": {"aug_type": study.LEARNED, "initial_aug_severity": 1.0},
                  "history": [{"severity_median": final_s}],
                  "evaluation": {study.MCE: error}}  # fmt: skip
    return run


def test_goal_is_judged_per_run_and_per_seed() -> None:
    fit = {"optimum s": 2.0, "one run 95% interval": [28.0, 32.0]}
    good = [_run(v, seed, 2.0 * f, 30.0) for seed in (0, 1) for v, f in
            zip(study.HELDOUT, (0.8, 1.0, 1.15))]  # fmt: skip
    goal = study.goal_check(good, fit)
    assert goal["met"] and goal["starts agree (max/min per seed)"][0] == pytest.approx(1.15 / 0.8)
    far = good[:-1] + [_run(study.HELDOUT[2], 1, 3.2, 30.0)]  # x1.6 from the optimum
    goal = study.goal_check(far, fit)
    assert not goal["met"] and not goal["runs"][-1]["within x1.5"]
    spread = good[:-1] + [_run(study.HELDOUT[2], 1, 2.9, 33.0)]  # x1.45 but outside the interval
    assert not study.goal_check(spread, fit)["runs"][-1]["inside interval"]
    text = "\n".join(study.goal_lines(study.goal_check(far, fit)))
    assert "1/2 runs within x1.5" in text and "Goal not met" in text


def test_the_judged_metric_can_be_the_c_nll() -> None:
    """--judge "-C NLL": the fit says what it fitted, and the goal reads that metric's interval."""
    points = _points(lambda x: _curve(x, vertex=0.5, b2=3.0))
    fit = study.sweep_fit(points, "-C NLL")
    assert fit["metric"] == "-C NLL" and study.sweep_fit(points)["metric"] == study.MCE
    assert "Gate on -C NLL" in study.gate_lines(fit)[0]
    fit = {"metric": "-C NLL", "optimum s": 2.0, "one run 95% interval": [0.7, 0.8]}
    runs = [_run(v, 0, 2.0, 99.0) for v in study.HELDOUT]  # error far off: not what is judged
    for run in runs:
        run.result["evaluation"]["-C NLL"] = 0.75
    goal = study.goal_check(runs, fit)
    assert goal["met"] and goal["runs"][0]["-C NLL"] == 0.75
    runs[0].result["evaluation"]["-C NLL"] = 0.9
    assert not study.goal_check(runs, fit)["met"]
    assert "its -C NLL in [0.700, 0.800]" in "\n".join(study.goal_lines(goal))


def test_temperature_fit_recovers_a_known_scale() -> None:
    """Labels drawn from softmax(z): the logits 3 z are over-confident by exactly T = 3, and
    scaling by the fitted T brings the NLL down to the true model's."""
    import torch
    from severity_study_eval import fit_temperature, scores

    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    t = fit_temperature(3 * z, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    assert scores(3 * z, labels, t)["nll"] == pytest.approx(scores(z, labels)["nll"], rel=0.01)
    assert scores(3 * z, labels, t)["rms"] < scores(3 * z, labels)["rms"] / 3


def test_plots_are_written(tmp_path) -> None:
    from severity_study_plots import plot_all

    runs = []
    for v, s, obj in (("fixed_s1", 1.0, None), ("fixed_s4", 4.0, None),
                      ("learned_heldout_s2", 2.0, "heldout")):  # fmt: skip
        run = _run(v, 0, s, 30.0)
        run.result["config"] = {"aug_type": "augmix_jsd" if obj is None else study.LEARNED,
                                "initial_aug_severity": s, "severity_objective": obj}  # fmt: skip
        run.result["severity_trajectory"] = [{"step": 1, "severity_median": s}]
        run.result["history"] = [{"epoch": 1, "severity_median": s, "hypergrad_snr": 1.5}]
        runs.append(run)
    fit = study.sweep_fit(_points(lambda x: _curve(x, vertex=0.5, b2=3.0)))
    paths = plot_all(runs, {}, fit, tmp_path)
    assert [p.name for p in paths] == [
        "error_vs_severity.png", "severity_trajectory.png", "snr_per_epoch.png"
    ]  # fmt: skip
    assert all(p.stat().st_size > 10_000 for p in paths)
    pilot = plot_all(runs, {}, fit, tmp_path, prefix="pilot-")  # beside, not over, the study's
    assert [p.name for p in pilot] == ["pilot-" + p.name for p in paths]


def test_a_cached_evaluation_gains_the_held_out_figures_in_one_pass(tmp_path, monkeypatch) -> None:
    """An evaluation.json from before the held-out figures: one pass over the held-out split adds
    its error and NLL (cross-entropy, computed here by torch), the cached figures stay as they are."""
    import json
    import types

    import severity_study_eval as ev
    import torch
    import torch.nn.functional as F

    import augmix_gpu.eval.model as model_module

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])
    passes = []

    def fake_logits(model, source, recipe, **size):
        passes.append(source)
        return logits, labels

    monkeypatch.setattr(ev, "_logits", fake_logits)
    monkeypatch.setattr(model_module, "load_checkpoint_model",
                        lambda path, device: types.SimpleNamespace(model=None, classes=["a", "b"]))  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"crop_size": 8, "val_resize": 8}))
    old = {"temperature": 0.9, "-C NLL": 0.8, "mean corruption error": 25.0}
    (tmp_path / ev.CACHE).write_text(json.dumps(old))
    out = ev.evaluate_run(tmp_path, tmp_path / "heldout", tmp_path / "val", tmp_path / "c")
    assert passes == [tmp_path / "heldout"]  # the held-out split only: no clean, no -C pass
    assert {k: out[k] for k in old} == old
    assert out["held-out error"] == pytest.approx(25.0)  # the third image is misclassified
    assert out["held-out NLL"] == pytest.approx(float(F.cross_entropy(logits.double(), labels)))
    assert json.loads((tmp_path / ev.CACHE).read_text()) == out
    assert ev.evaluate_run(tmp_path, tmp_path / "heldout", tmp_path / "val", tmp_path / "c") == out
    assert len(passes) == 1  # now cached


def test_the_hypergradient_signal_is_pooled_over_epochs_and_seeds() -> None:
    """Mean, standard error and share > 0 of the per-epoch SNR, and each run's z over all its
    updates, against statistics' own."""
    import math
    import statistics

    snr = {0: [1.0, -0.5, 2.0], 1: [0.5, None, -1.0]}  # None: an epoch without an update
    runs = []
    for seed, xs in snr.items():
        run = _run(study.HELDOUT[2], seed, 8.0, 30.0)
        run.result["history"] = [{"hypergrad_snr": x} for x in xs]
        updates = {0: [0.1, 0.3, 0.2], 1: [0.5]}[seed]  # one update: no standard error
        run.result["severity_trajectory"] = [{"step": 1}] + [{"hypergrad_mu": g} for g in updates]
        runs.append(run)
    runs.append(_run("fixed_s1", 0, 1.0, 30.0))  # no hypergradient: not counted
    s = study.hypergradient_signal(runs)[study.HELDOUT[2]]
    pooled = [1.0, -0.5, 2.0, 0.5, -1.0]
    assert s["epochs"] == 5 and s["mean SNR"] == pytest.approx(statistics.fmean(pooled))
    assert s["se"] == pytest.approx(statistics.stdev(pooled) / math.sqrt(5))
    assert s["share > 0"] == pytest.approx(0.6)
    assert s["pooled z per run"] == pytest.approx([2.5 / math.sqrt(3), -0.5 / math.sqrt(2)])
    g = [0.1, 0.3, 0.2]  # over a run's updates, whatever the epochs
    z = statistics.fmean(g) / (statistics.stdev(g) / math.sqrt(3))
    assert s["update z per run"] == [pytest.approx(z), None]
    lines = study.signal_lines({study.HELDOUT[2]: s})
    assert "mean +0.40 ± " in lines[1] and f"z = {z:+.2f}, n/a" in lines[2]


def test_the_horizon_probe_pairs_its_differences() -> None:
    """severity_study_horizon: the paired differences' mean, standard error and t as scipy's
    one-sample t-test computes them."""
    from severity_study_horizon import difference_stats

    d = [0.010, 0.030, -0.005, 0.020, 0.015]
    s = difference_stats(d)
    assert s["mean"] == pytest.approx(0.014)
    assert s["t"] == pytest.approx(stats.ttest_1samp(d, 0.0).statistic)
    assert s["se"] == pytest.approx(stats.sem(d))


def test_readings_towards_the_optimum_count_each_update_from_where_the_run_was() -> None:
    """Above the optimum a reading > 0 (lower s) points towards it, below it a reading < 0; the
    severity before each update is the entry before it; a zero reading is no vote; z against a
    coin as scipy's binomial normal approximation."""
    run = _run(study.HELDOUT[2], 0, 4.0, 30.0)
    median = lambda s: {"severity_median": s}  # noqa: E731
    run.result["severity_trajectory"] = [
        median(8.0), {**median(7.0), "hypergrad_mu": 0.2},  # from 8: towards
        median(7.0), {**median(7.5), "hypergrad_mu": -0.1},  # from 7: away
        median(0.5), {**median(0.6), "hypergrad_mu": -0.3},  # from 0.5 (below 2): towards
        median(0.6), {**median(0.6), "hypergrad_mu": 0.0},  # no vote
    ]  # fmt: skip
    t = study.readings_towards([run, _run("fixed_s1", 0, 1.0, 30.0)], s_opt=2.0)
    assert list(t) == [study.HELDOUT[2]]
    t = t[study.HELDOUT[2]]
    assert (t["readings"], t["towards"]) == (3, 2)
    assert t["z vs a coin"] == pytest.approx((2 - 1.5) / math.sqrt(0.75))
    signed = [0.2, -0.1, 0.3]  # towards: +
    assert t["signed mean"] == pytest.approx(statistics.fmean(signed))
    assert t["signed std"] == pytest.approx(statistics.stdev(signed))
    assert t["updates for 2 se"] == pytest.approx((2 * statistics.stdev(signed) / 0.4 * 3) ** 2)
    text = "\n".join(study.towards_lines({study.HELDOUT[2]: t}, 2.0))
    assert "2/3 (67 %), z +0.58" in text and "2 se clear of zero after 10 updates" in text
    far = {study.HELDOUT[2]: {**t, "updates for 2 se": 2e5}}
    assert "beyond 10,000 updates" in "\n".join(study.towards_lines(far, 2.0))
    away = {study.HELDOUT[2]: {**t, "updates for 2 se": None}}
    assert "never (its mean points away)" in "\n".join(study.towards_lines(away, 2.0))


def test_a_report_takes_missing_runs_from_a_record(tmp_path) -> None:
    """--records: a study record's per_run entries become runs whose results read as the trained
    runs' did (evaluation, final severity from the variant's flags, timing); only the variants
    asked for."""
    import json

    entry = lambda seed, e: {"seed": seed, "history": [{"severity_median": 0.7}],  # noqa: E731
                             "severity_trajectory": [], "evaluation": {study.MCE: e},
                             "seconds": 10.0 + seed, "cpu_seconds": 9.0}  # fmt: skip
    record = {"per_run": {"fixed_s4": [entry(0, 25.0), entry(1, 26.0)],
                          "learned_heldout_s2": [entry(0, 27.0)]}}  # fmt: skip
    path = tmp_path / "study.json"
    path.write_text(json.dumps(record))
    args = study.argparse.Namespace(shift="none", epochs=12, extra=[])
    runs = study.runs_from_records([str(path)], ["fixed_s4"], args, tmp_path)
    assert [(r.variant, r.seed) for r in runs] == [("fixed_s4", 0), ("fixed_s4", 1)]
    assert [study.METRICS[study.MCE](r.result) for r in runs] == [25.0, 26.0]
    assert (
        study.final_severity(runs[0].result) == 4.0
        and study.METRICS["wall s"](runs[1].result) == 11.0
    )
    learned = study.runs_from_records([str(path)], ["learned_heldout_s2"], args, tmp_path)[0]
    assert study.final_severity(learned.result) == 0.7  # learned: the last epoch's median
    assert learned.result["config"]["severity_objective"] == "heldout"
