"""ImageNet-C / CIFAR-C bookkeeping: corruption names, AlexNet references, mCE and calibration.

Pure functions on *counts* (wrong, total) per (corruption, severity): an error rate is always
``wrong / total`` over every image of that cell, never a mean of per-batch means, so the numbers do
not depend on the batch size or on how images were sharded over ranks.

Definitions (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", section 3):

- ``E_{c,s}``: top-1 error on corruption ``c`` at severity ``s``.
- ``CE_c = 100 * sum_s E_{c,s} / sum_s E^{AlexNet}_{c,s}``. ``ALEXNET_ERRORS[c]`` is AlexNet's error
  *averaged* over the 5 severities, so the ratio of sums equals ``mean_s E_{c,s} / ALEXNET_ERRORS[c]``.
- ``mCE = mean_c CE_c`` over the 15 corruptions (the 4 extras are reported apart).
- ``relative CE_c = 100 * sum_s (E_{c,s} - E_clean) / sum_s (E^{AlexNet}_{c,s} - E^{AlexNet}_clean)``
  ``= 100 * (mean_s E_{c,s} - E_clean) / (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR)``.
- Unnormalised mean corruption error: ``mean_c mean_s E_{c,s}``; what hendrycks/robustness
  ``ImageNet-C/test.py`` prints as "mCE (unnormalized by AlexNet errors)", what the official augmix
  ``cifar.py`` reports for CIFAR-10-C/100-C, and what the reference learnable-severity script
  called "mCE".

All error-like outputs are in percent (CE of 100 = as robust as AlexNet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# The 15 ImageNet-C corruptions in the official order (noise, blur, weather, digital), as in
# hendrycks/robustness ImageNet-C/test.py and google-research/augmix imagenet.py.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip

# The 4 held-out corruptions released with ImageNet-C; never part of mCE.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# AlexNet top-1 error per corruption, averaged over the 5 severities (fractions). Source: the
# official google-research/augmix imagenet.py (ALEXNET_ERR, "Raw AlexNet errors taken from
# https://github.com/hendrycks/robustness"), in CORRUPTIONS order.
ALEXNET_ERRORS: dict[str, float] = dict(
    zip(
        CORRUPTIONS,
        (
            0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
            0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840,
            0.606500,
        ),
    )
)  # fmt: skip

# AlexNet clean top-1 error on ImageNet val (fraction) for relative mCE: 43.45 %, torchvision's
# model-zoo table for alexnet-owt-4df8aa71.pth, the weights hendrycks/robustness ImageNet-C/test.py
# evaluates; Hendrycks & Dietterich (2019), Table 1, print it rounded as 43.5.
ALEXNET_CLEAN_ERROR: float = 0.4345

Counts = Mapping[str, Mapping[int, tuple[int, int]]]  # corruption -> severity -> (wrong, total)


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
        if c in ALEXNET_ERRORS:
            out[c] = err / ALEXNET_ERRORS[c]  # err is in percent, so this is 100 * ratio
    return out


def relative_ce(counts: Counts, clean_error: float) -> dict[str, float]:
    """Relative ``CE_c`` (percent) given the clean error in percent."""
    out = {}
    for c, err in corruption_errors(counts).items():
        if c in ALEXNET_ERRORS:
            denom = 100.0 * (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR)
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
    quoted as an mCE.
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
    ce = corruption_error_ce(main)
    out["ce"] = ce
    mean_ce = float(np.mean(list(ce.values()))) if ce else None
    out["mce"] = mean_ce if complete else None
    if not complete:
        out["mce_partial"] = mean_ce
    if clean_error is not None and main:
        rce = relative_ce(main, clean_error)
        out["relative_ce"] = rce
        mean_rce = float(np.mean(list(rce.values())))
        out["relative_mce"] = mean_rce if complete else None
        if not complete:
            out["relative_mce_partial"] = mean_rce
    else:
        out["relative_mce"] = None
    return out


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
