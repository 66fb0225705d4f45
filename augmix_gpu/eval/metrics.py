"""ImageNet-C / CIFAR-C bookkeeping: corruption names, AlexNet references, mCE and calibration.

Pure functions on *counts* (wrong, total) per (corruption, severity): an error rate is always
``wrong / total`` over every image of that cell, never a mean of per-batch means, so the numbers do
not depend on the batch size or on how images were sharded over ranks.

Definitions (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", section 3):

- ``E_{c,s}``: top-1 error on corruption ``c`` at severity ``s``.
- ``CE_c = 100 * sum_s E_{c,s} / sum_s E^{AlexNet}_{c,s}``. ``ALEXNET_ERRORS[c]`` is AlexNet's error
  *averaged* over the 5 severities, so the ratio of sums equals ``mean_s E_{c,s} / ALEXNET_ERRORS[c]``.
- ``mCE = mean_c CE_c`` over the 15 corruptions. The 4 extras have AlexNet errors too
  (``protocols.ALEXNET_EXTRA_ERRORS``): their CE and ``mCE (extra)`` are reported apart, never
  inside the mCE.
- ``relative CE_c = 100 * sum_s (E_{c,s} - E_clean) / sum_s (E^{AlexNet}_{c,s} - E^{AlexNet}_clean)``
  ``= 100 * (mean_s E_{c,s} - E_clean) / (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR)``.
- Unnormalised mean corruption error: ``mean_c mean_s E_{c,s}``; what hendrycks/robustness
  ``ImageNet-C/test.py`` prints as "mCE (unnormalized by AlexNet errors)", what the official augmix
  ``cifar.py`` reports for CIFAR-10-C/100-C, and what the reference learnable-severity script
  called "mCE".

All error-like outputs are in percent (CE of 100 = as robust as AlexNet).

ImageNet-P (same paper, section 3, "perturbation robustness metrics"; every detail below follows
hendrycks/robustness ``ImageNet-P/test.py``) works on per-sequence counts, see the section at the
end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..protocols import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    ALEXNET_EXTRA_ERRORS,
    ALEXNET_FLIP_PROBABILITY,
    ALEXNET_TOP5_DISTANCE,
    ALEXNET_UNAVAILABLE,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    EXTRA_PERTURBATIONS,
    HEADLINE_DIFFICULTY,
    PERTURBATIONS,
    SEVERITIES,
)

Counts = Mapping[str, Mapping[int, tuple[int, int]]]  # corruption -> severity -> (wrong, total)
_ALEXNET = {**ALEXNET_ERRORS, **ALEXNET_EXTRA_ERRORS}  # the 15 and the 4 extras


def error_rate(wrong: int, total: int) -> float:
    """``wrong / total`` in percent, with a clear error for an empty cell."""
    if total <= 0:
        raise ValueError(f"cannot compute an error rate over {total} images")
    if not 0 <= wrong <= total:
        raise ValueError(f"wrong={wrong} must lie in [0, total={total}]")
    return 100.0 * wrong / total


def error_table(counts: Counts) -> dict[str, dict[int, float]]:
    """Error in percent per (corruption, severity), each from its own counts."""
    return {
        c: {int(s): error_rate(*wt) for s, wt in sorted(sev.items())} for c, sev in counts.items()
    }


def corruption_errors(counts: Counts) -> dict[str, float]:
    """Unnormalised error per corruption: mean over its severities of ``E_{c,s}`` (percent)."""
    table = error_table(counts)
    return {c: float(np.mean(list(sev.values()))) for c, sev in table.items()}


def corruption_error_ce(counts: Counts) -> dict[str, float]:
    """AlexNet-normalised ``CE_c`` (percent) for every corruption that has a reference."""
    out = {}
    for c, err in corruption_errors(counts).items():
        if c in _ALEXNET:
            out[c] = err / _ALEXNET[c]  # err is in percent, so this is 100 * ratio
    return out


def relative_ce(counts: Counts, clean_error: float) -> dict[str, float]:
    """Relative ``CE_c`` (percent) given the clean error in percent."""
    out = {}
    for c, err in corruption_errors(counts).items():
        if c in _ALEXNET:
            denom = 100.0 * (_ALEXNET[c] - ALEXNET_CLEAN_ERROR)
            out[c] = 100.0 * (err - clean_error) / denom
    return out


def coverage(counts: Counts, required: Sequence[str] = CORRUPTIONS) -> tuple[bool, str | None]:
    """(complete, reason): complete only with every required corruption at all 5 severities."""
    missing = [c for c in required if c not in counts]
    if missing:
        return False, f"{len(missing)} of the {len(required)} corruptions not evaluated: {missing}"
    short = {c: sorted(set(SEVERITIES) - set(counts[c])) for c in required}
    short = {c: s for c, s in short.items() if s}
    if short:
        return False, f"severities missing: {short}"
    return True, None


def summarize_corruptions(
    counts: Counts, clean_error: float | None = None, *, normalise: bool = True
) -> dict:
    """Everything derived from a counts table, ready for the results JSON.

    ``normalise=False`` (CIFAR-C) skips the AlexNet columns: there is no AlexNet reference there
    and the official CIFAR code reports the unnormalised mean. When the 15 corruptions at all 5
    severities are not all present the result is ``partial``: ``mce``/``relative_mce`` are None and
    the means over what *was* evaluated carry a ``_partial`` suffix, so a subset can never be
    quoted as an mCE. The extras present get their own CE (``extra_ce``) and ``mce_extra`` (None,
    with ``mce_extra_partial``, unless all 4 are there at all 5 severities).
    """
    main = {c: v for c, v in counts.items() if c in CORRUPTIONS}
    extra = {c: v for c, v in counts.items() if c not in CORRUPTIONS}
    complete, reason = coverage(counts)
    per_c = corruption_errors(counts) if counts else {}
    out: dict = {
        "corruptions": [c for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS) if c in counts]
        + sorted(c for c in counts if c not in CORRUPTIONS and c not in EXTRA_CORRUPTIONS),
        "counts": {c: {str(s): {"wrong": int(w), "total": int(t)} for s, (w, t) in sorted(sev.items())}
                   for c, sev in counts.items()},
        "error": {c: {str(s): e for s, e in sev.items()} for c, sev in error_table(counts).items()},
        "corruption_error": per_c,
        "partial": not complete,
        "partial_reason": reason,
    }  # fmt: skip
    main_mean = float(np.mean([per_c[c] for c in main])) if main else None
    out["mean_corruption_error" if complete else "mean_corruption_error_partial"] = main_mean
    if extra:
        out["extra_mean_corruption_error"] = float(np.mean([per_c[c] for c in extra]))
    if not normalise:
        return out
    out["ce"] = corruption_error_ce(main)
    out.update(_mean_of("mce", out["ce"], complete))
    extra_ce = corruption_error_ce(extra)
    if extra_ce:
        out["extra_ce"] = extra_ce
        out.update(_mean_of("mce_extra", extra_ce, coverage(extra, EXTRA_CORRUPTIONS)[0]))
    out["relative_mce"] = None
    if clean_error is not None and main:
        out["relative_ce"] = relative_ce(main, clean_error)
        out.update(_mean_of("relative_mce", out["relative_ce"], complete))
    return out


def _mean_of(key: str, values: Mapping[str, float], complete: bool) -> dict[str, float | None]:
    """``{key: mean}`` over a complete set; else ``{key: None, key_partial: mean}``."""
    mean = float(np.mean(list(values.values()))) if values else None
    return {key: mean} if complete else {key: None, f"{key}_partial": mean}


# ----------------------------------------------------------------------------- calibration


def _as_arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(
            f"confidence {conf.shape} and correct {corr.shape} must have one entry per sample"
        )
    if conf.size == 0:
        raise ValueError("calibration needs at least one sample")
    if np.any((conf < 0) | (conf > 1)) or not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be probabilities in [0, 1]")
    return conf, corr


def rms_calibration_error(confidence, correct, bin_size: int = 100) -> float:
    """RMS calibration error (percent) with adaptive bins of ``bin_size`` samples.

    As in the AugMix paper (Hendrycks et al., ICLR 2020, which takes it from Hendrycks et al. 2019,
    ``calib_err(p='2', beta=100)`` in hendrycks/outlier-exposure utils/calibration_tools.py):
    sort by confidence, cut into ``n // bin_size`` bins of consecutive samples (the last one takes
    the remainder), and return ``sqrt(sum_b |b|/n * (mean conf_b - mean correct_b)^2)``.

    Two deliberate differences from that code: its loop ``range(len(bins) - 1)`` never visits the
    last bin (the one holding the most confident samples); here every sample counts. And with fewer
    than ``bin_size`` samples it raises IndexError; here everything is one bin.

    Ties: samples with equal confidence (common at 1.0 in float32) have no order, yet a bin edge
    may cut their group. Each member of a tie group is given the group's mean correctness, which
    is the expected bin accuracy over all orders of the group: the result depends neither on the
    sample order (rank layout) nor on an arbitrary tie-break, and equals the plain one without ties.
    """
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    conf, corr = _as_arrays(confidence, correct)
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n = conf.size
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])  # first index of each tie group
    sizes = np.diff(np.r_[starts, n])
    corr = np.repeat(np.add.reduceat(corr, starts) / sizes, sizes)
    n_bins = max(1, n // bin_size)
    edges = [i * bin_size for i in range(n_bins)] + [n]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        gap = conf[lo:hi].mean() - corr[lo:hi].mean()
        total += (hi - lo) / n * gap * gap
    return 100.0 * math.sqrt(total)


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE (percent) with ``n_bins`` equal-width confidence bins (Guo et al., ICML 2017; 15 bins).

    Bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]`` (the first also holds 0);
    ``ECE = sum_b |b|/n * |mean correct_b - mean conf_b|``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, corr = _as_arrays(confidence, correct)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    n = conf.size
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            ece += mask.sum() / n * abs(corr[mask].mean() - conf[mask].mean())
    return 100.0 * float(ece)


# ----------------------------------------------------------------------------- ImageNet-P


def sequence_rates(flips, comparisons, top5, zipf) -> dict[str, float]:
    """FP (percent), T5D and Zipf distance over sequences, each the mean of per-sequence means.

    test.py averages each sequence's comparisons, then the sequences (every sequence weighs the
    same, whatever its length); arguments are per-sequence sums and comparison counts.
    """
    comps = np.asarray(comparisons, dtype=np.float64)
    if comps.size == 0:
        raise ValueError("no sequences to summarise")
    if np.any(comps <= 0):
        raise ValueError("every sequence needs at least one comparison")
    return {
        "flip_probability": 100.0 * float(np.mean(np.asarray(flips, np.float64) / comps)),
        "top5_distance": float(np.mean(np.asarray(top5, np.float64) / comps)),
        "zipf_distance": float(np.mean(np.asarray(zipf, np.float64) / comps)),
    }


PCounts = Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]  # p -> difficulty -> name -> [N]


def summarize_perturbations(
    counts: PCounts,
    reference: Mapping[str, Mapping[str, float]] | None = None,
    reference_name: str | None = None,
) -> dict:
    """Everything derived from per-sequence counts, ready for the results JSON.

    ``counts[p][d]`` holds per-sequence arrays ``flips``, ``comparisons``, ``top5`` (sum of top-5
    distances) and ``zipf``. ``reference[p]`` holds ``flip_probability`` (percent) and
    ``top5_distance`` of the normalising model at difficulty 1 (AlexNet in the paper). Without the
    10 perturbations at difficulty 1 the result is partial: means carry a ``_partial`` suffix and
    ``mfr``/``mt5d`` are None, so a subset is never quoted as an mFR.
    """
    reference = reference if reference is not None else _alexnet_reference()
    known = (*PERTURBATIONS, *EXTRA_PERTURBATIONS)
    perts = [p for p in known if p in counts] + sorted(p for p in counts if p not in known)
    out = _perturbation_tables(counts, perts)
    at = [p for p in perts if HEADLINE_DIFFICULTY in counts[p]]
    main = [p for p in PERTURBATIONS if p in at]
    missing = [p for p in PERTURBATIONS if p not in at]
    complete = not missing
    out["partial"] = not complete
    out["partial_reason"] = (
        None
        if complete
        else f"{len(missing)} of the {len(PERTURBATIONS)} perturbations not evaluated at "
        f"difficulty {HEADLINE_DIFFICULTY}: {missing}"
    )
    sfx = "" if complete else "_partial"
    d = str(HEADLINE_DIFFICULTY)
    fp = {p: out["flip_probability"][p][d] for p in at}
    t5 = {p: out["top5_distance"][p][d] for p in at}
    zf = {p: out["zipf_distance"][p][d] for p in at}
    out["mean_flip_probability" + sfx] = _mean(fp, main)
    out["mean_top5_distance" + sfx] = _mean(t5, main)
    out["mean_zipf_distance" + sfx] = _mean(zf, main)
    extra = [p for p in at if p not in PERTURBATIONS]
    if extra:
        out["extra_mean_flip_probability"] = _mean(fp, extra)
        out["extra_mean_top5_distance"] = _mean(t5, extra)
    out.update(_normalised(fp, t5, main, complete, reference, reference_name))
    out["difficulty"] = HEADLINE_DIFFICULTY
    return out


def _mean(table: Mapping[str, float], names: Sequence[str]) -> float | None:
    return float(np.mean([table[p] for p in names])) if names else None


def _perturbation_tables(counts: PCounts, perts: list[str]) -> dict:
    """FP, T5D, Zipf distance and the counts per (perturbation, difficulty)."""
    out: dict = {"perturbations": perts, "counts": {}, "flip_probability": {}, "top5_distance": {},
                 "zipf_distance": {}}  # fmt: skip
    for p in perts:
        for name in ("counts", "flip_probability", "top5_distance", "zipf_distance"):
            out[name][p] = {}
        for d, c in sorted(counts[p].items()):
            rates = sequence_rates(c["flips"], c["comparisons"], c["top5"], c["zipf"])
            for name, value in rates.items():
                out[name][p][str(d)] = value
            out["counts"][p][str(d)] = {
                "sequences": int(len(c["comparisons"])),
                "flips": int(np.sum(c["flips"])),
                "comparisons": int(np.sum(c["comparisons"])),
            }
    return out


def _normalised(
    fp: Mapping[str, float],
    t5: Mapping[str, float],
    main: list[str],
    complete: bool,
    reference: Mapping[str, Mapping[str, float]],
    reference_name: str | None,
) -> dict:
    """FR and T5D rate per perturbation (percent; 100 = as stable as the reference), where a
    reference exists, and their means (mFR, mT5D: only over the complete 10)."""
    fr, t5r, why = {}, {}, []
    for p in fp:
        ref = reference.get(p) or {}
        rfp, rt5 = ref.get("flip_probability"), ref.get("top5_distance")
        if rfp:
            fr[p] = 100.0 * fp[p] / rfp
        if rt5:
            t5r[p] = 100.0 * t5[p] / rt5
        if not (rfp and rt5) and p in PERTURBATIONS:
            why.append(p)
    out: dict = {"fr": fr, "t5d_rate": t5r}
    out["normalisation"] = {
        "reference": reference_name or "AlexNet",
        "available": not why,
        "reason": None if not why else (
            ALEXNET_UNAVAILABLE if not reference else f"the reference has no (non-zero) value for {why}"
        ),
    }  # fmt: skip
    has_all = complete and all(p in fr and p in t5r for p in PERTURBATIONS)
    out["mfr"] = _mean(fr, PERTURBATIONS) if has_all else None
    out["mt5d"] = _mean(t5r, PERTURBATIONS) if has_all else None
    if not has_all and any(p in fr for p in main):
        out["mfr_partial"] = _mean(fr, [p for p in main if p in fr])
        out["mt5d_partial"] = _mean(t5r, [p for p in main if p in t5r])
    return out


def _alexnet_reference() -> dict[str, dict[str, float]]:
    return {
        p: {"flip_probability": 100.0 * ALEXNET_FLIP_PROBABILITY[p],
            "top5_distance": ALEXNET_TOP5_DISTANCE[p]}
        for p in ALEXNET_FLIP_PROBABILITY if p in ALEXNET_TOP5_DISTANCE
    }  # fmt: skip


def reference_from_results(results: Mapping) -> dict[str, dict[str, float]]:
    """The difficulty-1 FP / T5D per perturbation of a results JSON of this tool (--p_reference)."""
    block = results.get("imagenet_p") if isinstance(results, Mapping) else None
    if not block:
        raise ValueError(
            "the reference results hold no imagenet_p block: evaluate it with --imagenet_p"
        )
    d = str(HEADLINE_DIFFICULTY)
    return {
        p: {"flip_probability": block["flip_probability"][p][d],
            "top5_distance": block["top5_distance"][p][d]}
        for p in block["perturbations"] if d in block["flip_probability"].get(p, {})
    }  # fmt: skip
