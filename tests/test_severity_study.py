"""The severity study's goal check (benchmarks/severity_study.py), on summaries written by hand."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import severity_study  # noqa: E402


def _summary(values: dict[str, tuple[list[float], float]]) -> dict:
    """variant -> (mean corruption errors over seeds, final severity) in the study's shape."""
    out = {}
    for v, (errors, s) in values.items():
        out[v] = {
            "mean corruption error": {
                "values": errors,
                "mean": statistics.fmean(errors),
                "std": statistics.stdev(errors),
            },
            "final severity median": {"values": [s] * 3, "mean": s, "std": 0.0},
        }
    return out


FIXED = {  # best fixed: s2 at 20 +- 1; the default s3 at 23 +- 1
    "fixed_s1": ([21.0, 22.0, 23.0], 1.0),
    "fixed_s2": ([19.0, 20.0, 21.0], 2.0),
    "fixed_s3": ([22.0, 23.0, 24.0], 3.0),
}


def test_goal_met_when_every_start_lands_near_the_best_and_agrees():
    held = {
        f"learned_heldout_s{s}": ([20.0, 20.5, 21.0], f) for s, f in ((1, 2.0), (3, 2.4), (8, 2.9))
    }
    goal = severity_study.goal_check(_summary(FIXED | held))
    assert goal["best fixed"] == "fixed_s2"
    assert all(r["within best fixed std"] and r["beats fixed_s3"] for r in goal["heldout"].values())
    assert goal["final severity ratio"] == pytest.approx(2.9 / 2.0) and goal["met"]


def test_goal_not_met_names_each_failure():
    held = {
        "learned_heldout_s1": ([20.0, 20.5, 21.0], 1.0),  # near the best, but
        "learned_heldout_s3": ([21.5, 22.0, 22.5], 6.5),  # 2.0 above the best (std 1.0): outside
        "learned_heldout_s8": ([20.0, 20.5, 21.0], 4.0),  # severities 1.0 .. 6.5: x6.5
    }
    goal = severity_study.goal_check(_summary(FIXED | held))
    rows = goal["heldout"]
    assert rows["learned_heldout_s1"]["within best fixed std"]
    assert not rows["learned_heldout_s3"]["within best fixed std"]
    assert rows["learned_heldout_s3"]["above best fixed"] == pytest.approx(2.0)
    assert not rows["learned_heldout_s3"]["beats fixed_s3"]  # 1.0 below s3, spread 1.0
    assert goal["final severity ratio"] == pytest.approx(6.5) and not goal["severities agree"]
    assert not goal["met"]
    text = "\n".join(severity_study.goal_lines(goal))
    assert "Goal not met" in text and "x6.50" in text and "outside its std" in text


def test_when_the_default_is_best_within_its_spread_counts():
    worse = {"fixed_s1": ([24.0, 25.0, 26.0], 1.0), "fixed_s2": ([23.5, 24.0, 24.5], 2.0)}
    fixed = FIXED | worse  # s3 (23 +- 1) is now the best
    held = {f"learned_heldout_s{s}": ([23.0, 23.5, 24.0], 3.0) for s in (1, 3, 8)}
    goal = severity_study.goal_check(_summary(fixed | held))
    assert goal["best fixed"] == "fixed_s3" and goal["met"]
