"""CIFAR-C's corruptions against the official generator's constants, measured on the images.

The expected numbers are hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``'s, written
out here from that file (severities 1-5). Each strength is measured on what the corruption does
(the noise's standard deviation on a flat grey image, the blur of a step edge or a point, the
darkening of fog, ...) against a float64 reference or a hand computation, so that a wrong
constant fails; where the strength cannot be read off an image (motion blur's radius, zoom
factors, glass blur), the test records the values the building block receives. The function
bodies are held to ``imagecorruptions``' (the ImageNet-C code the CIFAR code was derived from)
at ImageNet-C constants, on the same draws.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import natural_image
from PIL import Image
from scipy import ndimage

from augmix_gpu.data import cifar_corruptions as cc
from augmix_gpu.data import make_c
from augmix_gpu.protocols import CORRUPTIONS, EXTRA_CORRUPTIONS

SEVERITIES = (1, 2, 3, 4, 5)
GREY = 128


def _flat(value: int = GREY) -> np.ndarray:
    return np.full((32, 32, 3), value, np.uint8)


def _runs(name: str, severity: int, image: np.ndarray, n: int = 16) -> np.ndarray:
    """``n`` draws of one corruption (image seeds 0..n-1), as float ``[n, 32, 32, 3]``."""
    outs = [make_c.corrupt_image(image, name, severity, seed, "cifar") for seed in range(n)]
    return np.stack(outs).astype(np.float64)


def test_every_corruption_is_declared_once_with_five_constants():
    assert set(cc.CIFAR_C) == set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    assert all(len(constants) == 5 for _, constants in cc.CIFAR_C.values())


# --- noise: the standard deviation / fraction on a flat grey image --------------------------------

GAUSSIAN_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_PHOTONS = (500, 250, 100, 75, 50)
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)
SPECKLE_SIGMA = (0.06, 0.1, 0.12, 0.16, 0.2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_noise_strength_on_a_flat_grey_image(severity):
    v, i = GREY / 255, severity - 1
    # Truncation to uint8 adds ~1/255/sqrt(12) of std: 0.3 % of the weakest noise. Neighbouring
    # severities differ by >= 11 %; 49,152 values per estimate: a 3 % tolerance.
    for name, want in (
        ("gaussian_noise", GAUSSIAN_SIGMA[i]),
        ("shot_noise", np.sqrt(v / SHOT_PHOTONS[i])),  # Poisson: var = v / photons
        ("speckle_noise", v * SPECKLE_SIGMA[i]),  # v + v N(0, sigma)
    ):
        got = (_runs(name, severity, _flat()) / 255).std()
        assert got == pytest.approx(want, rel=0.03), name
    hit = (_runs("impulse_noise", severity, _flat()) != GREY).mean()  # salt or pepper: 0 or 255
    assert hit == pytest.approx(IMPULSE_AMOUNT[i], abs=0.002)


def test_imagenet_c_keeps_its_own_constants():
    """The same maker without ``"cifar"``: imagecorruptions' sigma .08 at severity 1, twice CIFAR's."""
    out = np.stack([make_c.corrupt_image(_flat(), "gaussian_noise", 1, s) for s in range(16)])
    assert (out / 255).std() == pytest.approx(0.08, rel=0.03)


# --- blur: a step edge, a point ------------------------------------------------------------------


def _step() -> np.ndarray:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    return image


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_blur_sigma_on_a_step_edge(severity):
    sigmas = (0.4, 0.6, 0.7, 0.8, 1.0)

    def reference(sigma: float) -> np.ndarray:  # scipy, float64, as skimage's defaults
        return 255 * ndimage.gaussian_filter(_step() / 255.0, (sigma, sigma, 0), mode="nearest")

    got = _runs("gaussian_blur", severity, _step(), n=1)[0]
    assert np.abs(got - reference(sigmas[severity - 1])).max() <= 1.0  # truncation to uint8
    others = [s for s in sigmas if s != sigmas[severity - 1]]
    assert all(np.abs(got - reference(s)).max() > 2.0 for s in others)  # the edge tells them apart


@pytest.mark.parametrize("severity", SEVERITIES)
def test_defocus_kernel_is_the_published_disk(monkeypatch, severity):
    """A white point's image is the kernel: a disk of radius r (x^2 + y^2 <= r^2, normalised),
    smoothed by a 3x3 Gaussian of sigma ``alias``; built here by hand. (An alias sigma of 0.2
    against 0.3 moves the kernel by under one 8-bit level: the arguments are recorded too.)"""
    import imagecorruptions.corruptions as ic

    calls = _recording(monkeypatch, ic, "disk")
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    grid = np.arange(-8, 9)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2).astype(np.float64)
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias**2))
    kernel = ndimage.convolve(disk / disk.sum(), np.outer(g, g) / g.sum() ** 2, mode="constant")
    point = np.zeros((32, 32, 3), np.uint8)
    point[16, 16] = 255
    got = _runs("defocus_blur", severity, point, n=1)[0, 8:25, 8:25, 0]
    assert np.abs(got - 255 * kernel).max() <= 1.0
    assert calls == [{"radius": radius, "alias_blur": alias}]


def _recording(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records its keyword arguments."""
    calls: list[dict] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("severity", SEVERITIES)
def test_motion_blur_and_snow_kernels(monkeypatch, severity):
    import imagecorruptions.corruptions as ic

    calls = _recording(monkeypatch, ic, "_motion_blur")
    make_c.corrupt_image(natural_image(32), "motion_blur", severity, 0, "cifar")
    make_c.corrupt_image(natural_image(32), "snow", severity, 0, "cifar")
    motion = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[severity - 1]
    flakes = ((8, 3), (10, 4), (10, 4), (12, 6), (14, 12))[severity - 1]
    assert [(c["radius"], c["sigma"]) for c in calls] == [motion, flakes]
    assert -45 <= calls[0]["angle"] <= 45 and -135 <= calls[1]["angle"] <= -45


def test_zoom_blur_factors_are_the_official_aranges(monkeypatch):
    factors: list[float] = []
    original = cc._zoom_centre
    monkeypatch.setattr(cc, "_zoom_centre", lambda x, f: factors.append(f) or original(x, f))
    for severity, stop in zip(SEVERITIES, (1.06, 1.11, 1.16, 1.21, 1.26)):
        factors.clear()
        make_c.corrupt_image(natural_image(32), "zoom_blur", severity, 0, "cifar")
        # np.arange(1, 1.06, 0.01) has 7 entries (1.06 included by rounding), as in the official code
        assert factors == list(np.arange(1, stop, 0.01))
    assert len(np.arange(1, 1.06, 0.01)) == 7


@pytest.mark.parametrize("severity", SEVERITIES)
def test_glass_blur_sigma_and_shuffle(monkeypatch, severity):
    """Without the shuffle, glass blur is two Gaussian blurs of sigma with a uint8 step between."""
    import imagecorruptions.corruptions as ic

    sigma, delta, sweeps = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[
        severity - 1
    ]
    seen = []
    monkeypatch.setattr(
        ic, "_shuffle_pixels_njit_glass_blur", lambda d0, d1, x, c, seed: seen.append(c) or x
    )
    image = natural_image(32)
    blur = lambda x: ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest")  # noqa: E731
    want = 255 * blur(np.uint8(blur(image / 255.0) * 255) / 255.0)
    got = make_c.corrupt_image(image, "glass_blur", severity, 0, "cifar")
    assert np.abs(got - want).max() <= 1.0
    assert seen == [(sigma, delta, sweeps)]


# --- weather ------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", SEVERITIES)
def test_fog_thickness_darkens_the_fog_free_pixel(monkeypatch, severity):
    """Flat v: v + t p (p in [0, 1], min 0) scaled by v / (v + t): the darkest pixel is
    v^2 / (v + t), truncated to uint8; the fractal's roughness is recorded."""
    import imagecorruptions.corruptions as ic

    calls = _recording(monkeypatch, ic, "plasma_fractal")
    thickness, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    v = GREY / 255
    got = _runs("fog", severity, _flat(), n=1)[0]
    want = 255 * v * v / (v + thickness)
    assert want - 1 < got.min() <= want
    assert GREY - 1 <= got.max() <= GREY
    assert calls == [{"mapsize": 32, "wibbledecay": decay}]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_frost_weights(monkeypatch, severity):
    """On a constant frost picture (100) the output is a x image + b x 100, exactly."""
    a, b = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[severity - 1]
    picked = []
    monkeypatch.setattr(
        cc, "frost_picture", lambda i: picked.append(i) or np.full((64, 64, 3), 100)
    )
    for value in (0, 200):
        got = make_c.corrupt_image(_flat(value), "frost", severity, value, "cifar")
        assert np.all(got == np.uint8(min(255.0, a * value + b * 100)))
    assert all(0 <= i < 5 for i in picked)  # the official randint(5) over its six files


def test_frost_pictures_are_scaled_for_32_px():
    for i in range(6):
        picture = cc.frost_picture(i)
        assert picture.dtype == np.uint8 and picture.shape[2] == 3 and min(picture.shape[:2]) > 32
    assert cc.frost_picture(0).shape[:2] == (120, 180)  # 600 x 900 x 0.2


@pytest.mark.parametrize("severity", SEVERITIES)
def test_snow_brightens_the_flake_free_background(severity):
    """On black, x = blend 0 + (1 - blend) max(0, 1.5 grey + 0.5): (1 - blend) / 2 where no
    flake falls (most pixels)."""
    blend = (0.95, 0.9, 0.9, 0.85, 0.8)[severity - 1]
    got = _runs("snow", severity, _flat(0), n=4)
    values, counts = np.unique(got, return_counts=True)
    assert values[counts.argmax()] == np.floor(255 * (1 - blend) / 2)


@pytest.mark.parametrize("severity", (1, 2, 3))
def test_spatter_water_strength(severity):
    """Water drops add up to ``strength`` x pale turquoise (175, 238, 238): the brightest pixel
    of a black image (the drop layer is scaled to a maximum of 1)."""
    got = _runs("spatter", severity, _flat(0), n=4)
    assert got.reshape(-1, 3).max(axis=0).tolist() == [np.floor(0.5 * c) for c in (175, 238, 238)]


@pytest.mark.parametrize("severity", (4, 5))
def test_spatter_mud_colour(severity):
    """Mud replaces the image by mud brown (63, 42, 20) where its blurred mask reaches 1."""
    got = _runs("spatter", severity, _flat(255), n=8).reshape(-1, 3)
    darkest = got[got.sum(axis=1).argmin()]
    assert np.abs(darkest - [63, 42, 20]).max() <= 2


# --- digital ------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_brightness_saturate_on_flat_images(severity):
    i = severity - 1
    # contrast: a two-level image around its mean; the spread shrinks by the factor
    two = _flat(64)
    two[:, 16:] = 192  # mean 128
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[i]
    got = make_c.corrupt_image(two, "contrast", severity, 0, "cifar").astype(float)
    assert got[0, 31, 0] - got[0, 0, 0] == pytest.approx(128 * factor, abs=1.0)
    # brightness: grey has saturation 0, so HSV value + shift is every channel + shift
    shift = (0.05, 0.1, 0.15, 0.2, 0.3)[i]
    got = make_c.corrupt_image(_flat(100), "brightness", severity, 0, "cifar")
    assert np.all(got == np.uint8(255 * (100 / 255 + shift)))
    # saturate: (200, 150, 150) has V = 200/255, S = 0.25; S -> 0.25 a + b; min = V (1 - S)
    a, b = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[i]
    red = np.tile(np.uint8([200, 150, 150]), (32, 32, 1))
    s = 0.25 * a + b
    got = make_c.corrupt_image(red, "saturate", severity, 0, "cifar").astype(float)
    assert got[0, 0, 1] == pytest.approx(200 * (1 - s), abs=1.0) and got[0, 0, 0] == 200


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_quality_and_pixelate_factor(severity):
    from io import BytesIO

    image = natural_image(32, seed=severity)
    quality = (80, 65, 58, 50, 40)[severity - 1]
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    want = np.asarray(Image.open(buffer))
    assert np.array_equal(
        make_c.corrupt_image(image, "jpeg_compression", severity, 0, "cifar"), want
    )
    side = int(32 * (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1])  # 30, 28, 27, 24, 20 px
    small = Image.fromarray(image).resize((side, side), Image.BOX)
    want = np.asarray(small.resize((32, 32), Image.BOX))
    assert np.array_equal(make_c.corrupt_image(image, "pixelate", severity, 0, "cifar"), want)


def test_elastic_severity_1_is_an_affine_warp_only(monkeypatch):
    """alpha = sigma = 0 at severity 1: no displacement field, only the affine warp whose three
    points move up to 0.08 x 32 = 2.56 px."""
    draws = []
    original = np.random.uniform
    monkeypatch.setattr(
        np.random, "uniform", lambda *a, **k: draws.append((a, k)) or original(*a, **k)
    )
    make_c.corrupt_image(natural_image(32), "elastic_transform", 1, 0, "cifar")
    (low, high), kw = draws[0]
    assert (low, high) == pytest.approx((-2.56, 2.56)) and kw["size"] == (3, 2)


# --- the function bodies against imagecorruptions' at ImageNet-C constants -------------------------


@pytest.mark.parametrize(
    ("name", "function", "constant", "severity"),
    [
        ("gaussian_noise", cc.gaussian_noise, 0.08, 1),
        ("shot_noise", cc.shot_noise, 60, 1),
        ("speckle_noise", cc.speckle_noise, 0.15, 1),
        ("gaussian_blur", cc.gaussian_blur, 2, 2),
        ("defocus_blur", cc.defocus_blur, (4, 0.5), 2),
        ("fog", cc.fog, (1.5, 2), 1),
        ("spatter", cc.spatter, (0.65, 0.3, 4, 0.69, 0.6, 0), 1),
        ("spatter", cc.spatter, (0.67, 0.4, 1, 0.65, 1.5, 1), 5),
        ("contrast", cc.contrast, 0.3, 2),
        ("brightness", cc.brightness, 0.2, 2),
        ("saturate", cc.saturate, (5, 0.1), 4),
    ],
)
def test_functions_match_imagecorruptions_at_its_constants(name, function, constant, severity):
    import imagecorruptions

    image = natural_image(32, seed=3)
    np.random.seed(11)  # noqa: NPY002  (both draw from the global generator)
    want = imagecorruptions.corrupt(image, severity=severity, corruption_name=name)
    np.random.seed(11)  # noqa: NPY002
    got = np.uint8(function(image, constant))
    assert np.array_equal(got, want)


def test_corrupt_refuses_what_is_not_cifar():
    with pytest.raises(ValueError, match=r"uint8 \[32, 32, 3\] images, got uint8 \(64, 64, 3\)"):
        cc.corrupt(np.zeros((64, 64, 3), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        cc.corrupt(_flat(), "blur", 1)
    with pytest.raises(ValueError, match="severity must be 1..5, got 6"):
        cc.corrupt(_flat(), "fog", 6)
    with pytest.raises(ValueError, match="constants must be one of"):
        make_c.corrupt_image(_flat(), "fog", 1, 0, "tiny")
