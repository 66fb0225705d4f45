"""The robustness benchmarks' protocol constants: what each benchmark holds and how it is normalised.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019): 15 corruptions x 5 severities, 4 extras reported
apart, AlexNet's errors for the CE normalisation. ImageNet-P: 10 perturbations (+ 4 validation
ones), 3 difficulties, the frame pairs a sequence is scored on. Names and figures only: the metrics
that use them live in ``eval/metrics.py``; the makers in ``data/`` take the names from here.
"""

from __future__ import annotations

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

# AlexNet top-1 error on the 4 extras, averaged over the 5 severities (fractions): published with
# the 15 above in the mCE spreadsheet the hendrycks/robustness README links ("Calculating the
# mCE"), as speckle noise 84.5388 %, gaussian blur 78.7108 %, spatter 71.7512 %, saturate 65.8248 %.
# They normalise the extras' CE and "mCE (extra)", reported beside the mCE, never inside it.
ALEXNET_EXTRA_ERRORS: dict[str, float] = dict(
    zip(EXTRA_CORRUPTIONS, (0.845388, 0.787108, 0.717512, 0.658248))
)

# AlexNet clean top-1 error on ImageNet val (fraction) for relative mCE: 43.45 %, torchvision's
# model-zoo table for alexnet-owt-4df8aa71.pth, the weights hendrycks/robustness ImageNet-C/test.py
# evaluates; Hendrycks & Dietterich (2019), Table 1, print it rounded as 43.5.
ALEXNET_CLEAN_ERROR: float = 0.4345


# The 10 ImageNet-P perturbations of the benchmark (mFR, mT5D) and the 4 validation ones, reported
# apart (Hendrycks & Dietterich 2019, section 4; hendrycks/robustness ImageNet-P/test.py choices).
PERTURBATIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
    "brightness", "translate", "rotate", "tilt", "scale",
)  # fmt: skip
EXTRA_PERTURBATIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "shear")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3)
# The benchmark's figures are at difficulty 1: "Most people only measure with difficulty 1. For
# example, in [google-research/augmix] we use difficulty 1" (hendrycks/robustness issue #23).
HEADLINE_DIFFICULTY = 1

# AlexNet's flip probability and top-5 distance per perturbation (the FR / T5D normalisers) are
# not published in the paper, which prints normalised rates only, nor in hendrycks/robustness or
# google-research/augmix code: the maintainers point to a spreadsheet (hendrycks/robustness
# issue #49) that no stored source holds. So they are left empty, never guessed: FR, mFR, mT5D
# are reported as unavailable unless a reference results file is passed (evaluate.py
# --p_reference: e.g. torchvision's AlexNet evaluated by this code on the same -P data, which is
# how the paper defines the normaliser).
ALEXNET_FLIP_PROBABILITY: dict[str, float] = {}
ALEXNET_TOP5_DISTANCE: dict[str, float] = {}
ALEXNET_UNAVAILABLE = (
    "AlexNet's per-perturbation flip probabilities / top-5 distances are not in the paper or its "
    "code (hendrycks/robustness issue #49 points to a spreadsheet): pass --p_reference with an "
    "AlexNet results.json from this tool on the same -P data to get FR, mFR and mT5D"
)


def is_noise(perturbation: str) -> bool:
    """Noise sequences are not temporally related: each frame is compared with the first."""
    return "noise" in perturbation  # test.py: ``'noise' in args.perturbation``


def perturbation_folder(perturbation: str, difficulty: int) -> str:
    """``gaussian_noise_2`` etc.: only the noise perturbations have a folder per difficulty."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    return (
        f"{perturbation}_{difficulty}"
        if is_noise(perturbation) and difficulty > 1
        else perturbation
    )


def comparison_pairs(n_frames: int, perturbation: str, difficulty: int) -> list[tuple[int, int]]:
    """The (earlier, later) frame pairs a sequence is scored on, in test.py's order.

    Noise: ``(0, j)`` for every later frame (difficulty selects the folder, not a step). Others: the
    step is the difficulty ``d``; for each offset ``i < d`` the chain ``i, i+d, i+2d, ...`` is
    compared frame with previous frame.
    """
    if is_noise(perturbation):
        pairs = [(0, j) for j in range(1, n_frames)]
    else:
        pairs = [
            (a, a + difficulty)
            for i in range(difficulty)
            for a in range(i, n_frames - difficulty, difficulty)
        ]
    if not pairs:
        raise ValueError(
            f"a {perturbation} sequence of {n_frames} frame(s) has nothing to compare at "
            f"difficulty {difficulty}: it needs at least {2 if is_noise(perturbation) else difficulty + 1}"
        )
    return pairs
