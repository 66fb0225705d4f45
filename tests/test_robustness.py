"""mCE, relative mCE, CE per corruption and calibration metrics against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from augmix_gpu import protocols
from augmix_gpu.eval import metrics as rb

# Written out from google-research/augmix imagenet.py (ALEXNET_ERR, citing hendrycks/robustness).
PUBLISHED_ALEXNET = [
    ("gaussian_noise", 0.886428),
    ("shot_noise", 0.894468),
    ("impulse_noise", 0.922640),
    ("defocus_blur", 0.819880),
    ("glass_blur", 0.826268),
    ("motion_blur", 0.785948),
    ("zoom_blur", 0.798360),
    ("snow", 0.866816),
    ("frost", 0.826572),
    ("fog", 0.819324),
    ("brightness", 0.564592),
    ("contrast", 0.853204),
    ("elastic_transform", 0.646056),
    ("pixelate", 0.717840),
    ("jpeg_compression", 0.606500),
]


def test_constants_equal_the_published_lists():
    assert list(protocols.ALEXNET_ERRORS.items()) == PUBLISHED_ALEXNET  # values *and* order
    assert protocols.CORRUPTIONS == tuple(c for c, _ in PUBLISHED_ALEXNET)
    assert protocols.EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert (
        protocols.ALEXNET_CLEAN_ERROR == 0.4345
    )  # torchvision model zoo: AlexNet top-1 error 43.45 %
    assert protocols.SEVERITIES == (1, 2, 3, 4, 5)


def test_data_layer_uses_the_same_corruption_lists():
    from augmix_gpu import data

    assert tuple(data.CORRUPTIONS) == protocols.CORRUPTIONS
    assert tuple(data.EXTRA_CORRUPTIONS) == protocols.EXTRA_CORRUPTIONS


def _half_alexnet_table() -> dict[str, dict[int, tuple[int, int]]]:
    """Every corruption's mean error = half AlexNet's; severities differ and have unequal totals.

    Severity s has 1e6*s images and error alexnet/2 + (s-3)/100, so the mean over severities is
    alexnet/2 (CE = 50 exactly) while pooling the counts (sum wrong / sum total) would weight the
    harder severities more and give CE > 50: the test pins "mean of per-severity errors".
    """
    table = {}
    for c, a in PUBLISHED_ALEXNET:
        table[c] = {}
        for s in range(1, 6):
            total = 1_000_000 * s
            wrong = round((a / 2 + (s - 3) / 100) * total)
            table[c][s] = (wrong, total)
    return table


def test_ce_mce_and_relative_mce_hand_computed():
    counts = _half_alexnet_table()
    ce = rb.corruption_error_ce(counts)
    assert set(ce) == set(protocols.CORRUPTIONS)
    for c in protocols.CORRUPTIONS:
        assert ce[c] == pytest.approx(50.0, abs=1e-9)
    out = rb.summarize_corruptions(counts, clean_error=20.0)
    assert out["partial"] is False and out["partial_reason"] is None
    assert out["mce"] == pytest.approx(50.0, abs=1e-9)
    # Unnormalised: 100 * mean(alexnet) / 2 = 100 * (11.834896 / 15) / 2 = 39.449653 %.
    assert out["mean_corruption_error"] == pytest.approx(39.449653, abs=1e-5)
    # gaussian_noise: mean error 44.3214 %; relative CE = (44.3214 - 20) / (88.6428 - 43.45) * 100.
    assert out["relative_ce"]["gaussian_noise"] == pytest.approx(53.816980, abs=1e-5)
    # brightness: (28.2296 - 20) / (56.4592 - 43.45) * 100.
    assert out["relative_ce"]["brightness"] == pytest.approx(63.259847, abs=1e-5)
    assert out["relative_mce"] == pytest.approx(55.610168, abs=1e-5)
    assert out["error"]["gaussian_noise"]["1"] == pytest.approx(100 * (0.443214 - 0.02), abs=1e-9)
    assert out["counts"]["snow"]["5"] == {"wrong": counts["snow"][5][0], "total": 5_000_000}


def test_small_table_by_hand():
    counts = {
        "gaussian_noise": {1: (10, 100), 2: (20, 100), 3: (30, 100), 4: (40, 100), 5: (50, 100)}
    }
    assert rb.corruption_errors(counts) == {"gaussian_noise": pytest.approx(30.0)}
    assert rb.corruption_error_ce(counts)["gaussian_noise"] == pytest.approx(30 / 0.886428)
    assert rb.corruption_error_ce(counts)["gaussian_noise"] == pytest.approx(33.843696, abs=1e-6)
    # A relative CE below 0 is legitimate (more robust than clean-vs-AlexNet would predict).
    assert rb.relative_ce(counts, clean_error=35.0)["gaussian_noise"] < 0


def test_subsets_are_partial_never_mce():
    counts = _half_alexnet_table()
    del counts["fog"]
    out = rb.summarize_corruptions(counts, clean_error=20.0)
    assert out["partial"] is True and "fog" in out["partial_reason"]
    assert out["mce"] is None and out["relative_mce"] is None
    assert "mean_corruption_error" not in out
    assert out["mce_partial"] == pytest.approx(50.0)
    assert "mean_corruption_error_partial" in out

    counts = _half_alexnet_table()
    del counts["snow"][5]
    out = rb.summarize_corruptions(counts)
    assert out["partial"] is True and "snow" in out["partial_reason"] and out["mce"] is None


def test_extras_are_reported_apart():
    counts = _half_alexnet_table()
    counts["spatter"] = {s: (900, 1000) for s in range(1, 6)}
    out = rb.summarize_corruptions(counts, clean_error=20.0)
    assert out["mce"] == pytest.approx(50.0)  # unchanged by the extra
    assert out["mean_corruption_error"] == pytest.approx(39.449653, abs=1e-5)
    assert out["extra_mean_corruption_error"] == pytest.approx(90.0)
    assert "spatter" not in out["ce"] and out["corruptions"][-1] == "spatter"
    # one extra of four: its CE (90 / 0.717512), an mCE (extra) only as partial
    assert out["extra_ce"] == {"spatter": pytest.approx(125.433442, abs=1e-6)}
    assert out["mce_extra"] is None
    assert out["mce_extra_partial"] == pytest.approx(125.433442, abs=1e-6)


def test_extras_ce_and_mce_extra_hand_computed():
    """AlexNet's published extras (84.5388, 78.7108, 71.7512, 65.8248 %) against errors of half,
    the same, half and 0.3 times them: CE 50, 100, 50, 30; mCE (extra) = 230 / 4 = 57.5."""
    counts = _half_alexnet_table()
    # wrong of 10,000,000 at every severity
    wrong = {"speckle_noise": 4226940, "gaussian_blur": 7871080, "spatter": 3587560,
             "saturate": 1974744}  # fmt: skip
    for c, w in wrong.items():
        counts[c] = {s: (w, 10_000_000) for s in range(1, 6)}
    out = rb.summarize_corruptions(counts, clean_error=20.0)
    want = {"speckle_noise": 50.0, "gaussian_blur": 100.0, "spatter": 50.0, "saturate": 30.0}
    assert out["extra_ce"] == {c: pytest.approx(v, abs=1e-9) for c, v in want.items()}
    assert out["mce_extra"] == pytest.approx(57.5, abs=1e-9) and "mce_extra_partial" not in out
    assert out["mce"] == pytest.approx(50.0, abs=1e-9)
    assert set(out["ce"]) == set(protocols.CORRUPTIONS)
    assert protocols.ALEXNET_EXTRA_ERRORS == {"speckle_noise": 0.845388, "gaussian_blur": 0.787108,
                                              "spatter": 0.717512, "saturate": 0.658248}  # fmt: skip


def test_cifar_mode_has_no_alexnet_columns():
    counts = {c: {s: (s, 10) for s in range(1, 6)} for c in protocols.CORRUPTIONS}
    out = rb.summarize_corruptions(counts, normalise=False)
    assert "ce" not in out and "mce" not in out
    assert out["mean_corruption_error"] == pytest.approx(30.0)  # mean of 10..50 %


def test_error_rate_rejects_bad_counts():
    with pytest.raises(ValueError, match="0 images"):
        rb.error_rate(0, 0)
    with pytest.raises(ValueError, match="wrong=11"):
        rb.error_rate(11, 10)


# ----------------------------------------------------------------------------- calibration

CONF = [0.9, 0.8, 0.6, 0.55, 0.3]
CORRECT = [1, 1, 0, 1, 0]


def test_rms_calibration_error_hand_computed():
    # Sorted: 0.3(0) 0.55(1) | 0.6(0) 0.8(1) 0.9(1)  (bin_size 2 -> 5 // 2 = 2 bins, last takes 3)
    # bin 1: conf 0.425, acc 0.5  -> gap^2 0.005625, weight 2/5 -> 0.00225
    # bin 2: conf 2.3/3, acc 2/3  -> gap^2 0.01,     weight 3/5 -> 0.006
    # RMS = sqrt(0.00825) = 9.0829511 %
    assert rb.rms_calibration_error(CONF, CORRECT, bin_size=2) == pytest.approx(9.0829511, abs=1e-6)
    # Fewer samples than a bin: one bin, |mean conf - accuracy| = |0.63 - 0.6|.
    assert rb.rms_calibration_error(CONF, CORRECT, bin_size=100) == pytest.approx(3.0, abs=1e-9)


def test_rms_is_order_independent_and_zero_when_calibrated():
    rng = np.random.default_rng(0)
    conf = rng.choice([0.25, 0.5, 0.75], size=1000)
    correct = rng.random(1000) < conf
    perm = rng.permutation(1000)
    a = rb.rms_calibration_error(conf, correct)
    assert a == rb.rms_calibration_error(conf[perm], correct[perm])
    assert rb.rms_calibration_error(np.ones(300), np.ones(300)) == 0.0
    # 300 ties at 0.5, half right: calibrated. Sorting ties by correctness would make pure bins
    # (RMS 40.8 %); spreading the tie group's accuracy over its members keeps it 0.
    assert rb.rms_calibration_error(np.full(300, 0.5), np.arange(300) % 2) == pytest.approx(0.0)
    # Tie groups straddling a bin edge: [0.2 x3: 1 right] [0.9 x3: 2 right], bins of 2 ->
    # accuracies per slot 1/3,1/3 | 1/3,2/3 | 2/3,2/3; bins: (0.2, 1/3), (0.55, 1/2), (0.9, 2/3).
    conf = [0.9, 0.2, 0.9, 0.2, 0.9, 0.2]
    corr = [1, 0, 0, 1, 1, 0]
    want = np.sqrt((0.2 - 1 / 3) ** 2 / 3 + (0.55 - 0.5) ** 2 / 3 + (0.9 - 2 / 3) ** 2 / 3) * 100
    assert rb.rms_calibration_error(conf, corr, bin_size=2) == pytest.approx(want, abs=1e-9)


def test_ece_hand_computed():
    # 4 bins of width 0.25: (0.25,0.5]: {0.3: wrong}; (0.5,0.75]: {0.55 right, 0.6 wrong};
    # (0.75,1]: {0.8, 0.9 right}. ECE = 1/5*0.3 + 2/5*|0.5-0.575| + 2/5*|1-0.85| = 0.15
    assert rb.expected_calibration_error(CONF, CORRECT, n_bins=4) == pytest.approx(15.0, abs=1e-9)
    # A bin edge goes to the lower bin: 0.5 sits in (0.25, 0.5].
    assert rb.expected_calibration_error([0.5, 0.5], [1, 0], n_bins=4) == pytest.approx(0.0)
    assert rb.expected_calibration_error([0.0, 1.0], [0, 1], n_bins=15) == pytest.approx(0.0)


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="one entry per sample"):
        rb.rms_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="probabilities"):
        rb.expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="at least one"):
        rb.rms_calibration_error([], [])
