"""CIFAR-10-C / CIFAR-100-C's 19 corruptions, with the constants the published sets were made with.

Hendrycks & Dietterich (ICLR 2019) re-tuned every corruption for 32 px images: CIFAR-C is much
milder than ImageNet-C (gaussian noise sigma .04-.10 against .08-.38). The numbers below are the
official generator's, hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``, read
corruption by corruption; the code is ours. ImageNet-C keeps the ``imagecorruptions`` package's
own constants and code (``make_c.py``).

Each corruption is one declaration: ``@corruption(name, (severity 1, ..., severity 5))`` holds
its five constants and the function below it takes one of them. Building blocks are reused from
``imagecorruptions`` where they take parameters: ``disk`` (the defocus kernel), ``plasma_fractal``
(fog), ``clipped_zoom``, the glass-blur pixel shuffle, the frost pictures, and ``_motion_blur``,
its NumPy re-implementation of the ImageMagick motion blur the official code calls through Wand
(motion blur and snow: the same kernel up to ImageMagick's own rounding, not bit-identical).

Randomness: every draw comes from NumPy's global generator, which ``make_c.corrupt_image`` seeds
per image (the seeds scikit-image and numba need are drawn from it too), as the official code
draws from it unseeded.
"""

# ruff: noqa: NPY002  (the global generator on purpose: see the module docstring)

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from io import BytesIO
from typing import Any

import numpy as np

SIZE = 32  # the official code is written for 32 x 32 images (loops, crops and sizes use it)
Corruption = Callable[[np.ndarray, Any], np.ndarray]
CIFAR_C: dict[str, tuple[Corruption, tuple]] = {}  # name -> (function, five constants)


def corruption(name: str, constants: tuple) -> Callable[[Corruption], Corruption]:
    """Register ``function(image uint8 [32, 32, 3], constant) -> [32, 32, 3] in 0..255``."""
    if len(constants) != 5:
        raise ValueError(f"{name}: expected 5 constants (severities 1-5), got {len(constants)}")

    def register(function: Corruption) -> Corruption:
        CIFAR_C[name] = (function, tuple(constants))
        return function

    return register


def corrupt(image: np.ndarray, name: str, severity: int) -> np.ndarray:
    """``image`` (uint8 ``[32, 32, 3]``) corrupted by ``name`` at ``severity`` (1-5), as uint8.

    Truncated to uint8 as the official ``np.uint8(corruption(img))`` does (not rounded)."""
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"CIFAR-C corruptions take uint8 [32, 32, 3] images, got {image.dtype} {image.shape}"
        )
    if name not in CIFAR_C:
        raise ValueError(f"unknown corruption {name!r}: choose from {', '.join(CIFAR_C)}")
    if int(severity) not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity!r}")
    function, constants = CIFAR_C[name]
    return np.uint8(function(image, constants[int(severity) - 1]))


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / 255.0


def _to255(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1) * 255


def _seed() -> int:
    """A seed for scikit-image / numba, drawn from the (seeded) global generator."""
    return int(np.random.randint(2**31 - 1))


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's Gaussian filter per channel (the official ``multichannel=True``)."""
    from skimage.filters import gaussian

    return gaussian(x, sigma=sigma, channel_axis=-1 if x.ndim == 3 else None)


def _zoom_centre(image: np.ndarray, factor: float) -> np.ndarray:
    """The centre ``1/factor`` of ``image`` zoomed back to its size (bilinear), centre-trimmed."""
    from imagecorruptions.corruptions import clipped_zoom

    h, w = image.shape[:2]
    zoomed = clipped_zoom(image, factor)  # may overshoot the size by a pixel
    top, left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[top : top + h, left : left + w]


# --- noise ---------------------------------------------------------------------------------------


@corruption("gaussian_noise", (0.04, 0.06, 0.08, 0.09, 0.10))
def gaussian_noise(x: np.ndarray, sigma: float) -> np.ndarray:
    """Additive N(0, sigma) noise on [0, 1] values."""
    x = _unit(x)
    return _to255(x + np.random.normal(size=x.shape, scale=sigma))


@corruption("shot_noise", (500, 250, 100, 75, 50))
def shot_noise(x: np.ndarray, photons: float) -> np.ndarray:
    """Poisson counts at ``photons`` per unit intensity: std sqrt(v / photons) at value v."""
    return _to255(np.random.poisson(_unit(x) * photons) / photons)


@corruption("impulse_noise", (0.01, 0.02, 0.03, 0.05, 0.07))
def impulse_noise(x: np.ndarray, amount: float) -> np.ndarray:
    """Salt and pepper: a fraction ``amount`` of the values (per channel) set to 0 or 1."""
    from skimage.util import random_noise

    return _to255(random_noise(_unit(x), mode="s&p", rng=_seed(), amount=amount))


@corruption("speckle_noise", (0.06, 0.1, 0.12, 0.16, 0.2))
def speckle_noise(x: np.ndarray, sigma: float) -> np.ndarray:
    """Multiplicative noise: v + v N(0, sigma)."""
    x = _unit(x)
    return _to255(x + x * np.random.normal(size=x.shape, scale=sigma))


# --- blur ----------------------------------------------------------------------------------------


@corruption("gaussian_blur", (0.4, 0.6, 0.7, 0.8, 1.0))
def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return _to255(_gaussian(_unit(x), sigma))


@corruption("defocus_blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)))
def defocus_blur(x: np.ndarray, c: tuple[float, float]) -> np.ndarray:
    """A disk of ``radius`` pixels, anti-aliased by a 3x3 Gaussian of sigma ``alias``."""
    import cv2
    from imagecorruptions.corruptions import disk

    radius, alias = c
    kernel = disk(radius=radius, alias_blur=alias)
    x = _unit(x)
    return _to255(np.stack([cv2.filter2D(x[..., d], -1, kernel) for d in range(3)], axis=-1))


@corruption("glass_blur", ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)))
def glass_blur(x: np.ndarray, c: tuple[float, int, int]) -> np.ndarray:
    """Blur (sigma), swap every pixel with one up to ``max_delta`` away (``sweeps`` times), blur."""
    from imagecorruptions.corruptions import _shuffle_pixels_njit_glass_blur as shuffle

    sigma, max_delta, sweeps = c
    x = np.uint8(_gaussian(_unit(x), sigma) * 255)
    x = shuffle(x.shape[0], x.shape[1], x, (float(sigma), int(max_delta), int(sweeps)), _seed())
    return _to255(_gaussian(x / 255.0, sigma))


@corruption("motion_blur", ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)))
def motion_blur(x: np.ndarray, c: tuple[float, float]) -> np.ndarray:
    """ImageMagick's motion blur (``radius``, ``sigma``) at an angle uniform in [-45, 45] deg."""
    from imagecorruptions.corruptions import _motion_blur

    radius, sigma = c
    angle = np.random.uniform(-45, 45)
    return np.clip(_motion_blur(np.asarray(x), radius=radius, sigma=sigma, angle=angle), 0, 255)


@corruption("zoom_blur", (1.06, 1.11, 1.16, 1.21, 1.26))
def zoom_blur(x: np.ndarray, stop: float) -> np.ndarray:
    """The mean of the image and its centre zoomed by each of ``np.arange(1, stop, 0.01)``."""
    x = _unit(x).astype(np.float32)
    factors = np.arange(1, stop, 0.01)
    out = np.zeros_like(x)
    for factor in factors:
        out += _zoom_centre(x, factor)
    return _to255((x + out) / (len(factors) + 1))


# --- weather -------------------------------------------------------------------------------------


@corruption("snow", (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
))  # fmt: skip
def snow(x: np.ndarray, c: tuple) -> np.ndarray:
    """Flakes N(loc, scale) zoomed by ``zoom``, kept above ``threshold``, motion-blurred (radius,
    sigma) downwards at a random angle, added twice (once turned 180 degrees) to the image
    brightened towards 1.5 x its grey level + 0.5 by ``1 - blend``."""
    import cv2
    from imagecorruptions.corruptions import _motion_blur

    loc, scale, zoom, threshold, radius, sigma, blend = c
    x = _unit(x).astype(np.float32)
    layer = _zoom_centre(np.random.normal(size=x.shape[:2], loc=loc, scale=scale)[..., None], zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)  # blurred as an 8-bit picture
    layer = _motion_blur(layer, radius=radius, sigma=sigma, angle=np.random.uniform(-135, -45))
    layer = np.clip(np.round(layer), 0, 255)[..., None] / 255.0
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return _to255(x + layer + np.rot90(layer, k=2))


@functools.cache
def frost_picture(index: int) -> np.ndarray:
    """Frost picture ``index`` (0-5; ``imagecorruptions``' copies of the official files), RGB,
    scaled by 0.2 as ``make_cifar_c.py`` scales them for 32 px."""
    import cv2

    name = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
    ref = importlib.resources.files("imagecorruptions") / "frost" / name[index]
    with importlib.resources.as_file(ref) as path:
        bgr = cv2.imread(str(path))
    return np.ascontiguousarray(cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)[..., ::-1])


@corruption("frost", ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)))
def frost(x: np.ndarray, c: tuple[float, float]) -> np.ndarray:
    """``image_weight`` x image + ``frost_weight`` x a random crop of a frost picture (one of
    the first five: the official code draws ``randint(5)`` over its six files)."""
    image_weight, frost_weight = c
    picture = frost_picture(np.random.randint(5))
    h, w = x.shape[:2]
    top = np.random.randint(0, picture.shape[0] - h)
    left = np.random.randint(0, picture.shape[1] - w)
    crop = picture[top : top + h, left : left + w]
    return np.clip(image_weight * np.asarray(x, np.float64) + frost_weight * crop, 0, 255)


@corruption("fog", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)))
def fog(x: np.ndarray, c: tuple[float, float]) -> np.ndarray:
    """Add ``thickness`` x a plasma fractal in [0, 1] (roughness ``decay``), then scale by
    max / (max + thickness): a pixel under no fog darkens to v max / (max + thickness)."""
    from imagecorruptions.corruptions import plasma_fractal

    thickness, decay = c
    x = _unit(x)
    top = x.max()
    x = x + thickness * plasma_fractal(mapsize=SIZE, wibbledecay=decay)[:SIZE, :SIZE, None]
    return _to255(x * top / (top + thickness))


@corruption("spatter", (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
))  # fmt: skip
def spatter(x: np.ndarray, c: tuple) -> np.ndarray:
    """A liquid layer N(loc, scale), blurred (sigma), kept above ``threshold``: water drops
    (``mud`` 0, strength ``strength``) or mud splashes (``mud`` 1, edges blurred by it)."""
    loc, scale, sigma, threshold, strength, mud = c
    x = _unit(x).astype(np.float32)
    liquid = _gaussian(np.random.normal(size=x.shape[:2], loc=loc, scale=scale), sigma)
    liquid[liquid < threshold] = 0
    return _to255(_mud(x, liquid, threshold, strength) if mud else _water(x, liquid, strength))


WATER = np.array([175, 238, 238], np.float32) / 255  # pale turquoise


def drop_shading(liquid: np.ndarray) -> np.ndarray:
    """Spatter's water drops: the liquid layer (in [0, 1]) as 8 bits times an embossed,
    equalised distance to the drops' edges (the official spatter's, ImageNet-C's and CIFAR-C's);
    float32, unnormalised. Also the -P maker's spatter frames (``make_p.py``)."""
    import cv2

    liquid = (liquid * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
    return (liquid * dist).astype(np.float32)


def _water(x: np.ndarray, liquid: np.ndarray, strength: float) -> np.ndarray:
    """Pale turquoise drops shaded by the distance to their edges, at most ``strength``."""
    m = drop_shading(liquid)
    # The official code divides by the maximum unguarded (NaN without drops); no drops: no water.
    m = m / m.max() * strength if m.max() > 0 else m
    return x + m[..., None] * WATER


def _mud(x: np.ndarray, liquid: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Mud brown (63, 42, 20) where the blurred mask of the liquid layer is >= 0.8."""
    m = _gaussian((liquid > threshold).astype(np.float32), sigma)
    m[m < 0.8] = 0
    colour = np.array([63, 42, 20], np.float32) / 255
    return x * (1 - m[..., None]) + m[..., None] * colour


# --- digital -------------------------------------------------------------------------------------


def _hsv_channel(x: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    """HSV channel ``channel`` (1: saturation, 2: value) -> clip(scale x it + shift, 0, 1)."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(_unit(x))
    hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
    return _to255(hsv2rgb(hsv))


@corruption("brightness", (0.05, 0.1, 0.15, 0.2, 0.3))
def brightness(x: np.ndarray, shift: float) -> np.ndarray:
    """HSV value + ``shift``."""
    return _hsv_channel(x, 2, 1.0, shift)


@corruption("saturate", ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)))
def saturate(x: np.ndarray, c: tuple[float, float]) -> np.ndarray:
    """HSV saturation x ``scale`` + ``shift``."""
    return _hsv_channel(x, 1, *c)


@corruption("contrast", (0.75, 0.5, 0.4, 0.3, 0.15))
def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Each channel's distance to its image mean x ``factor``."""
    x = _unit(x)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to255((x - mean) * factor + mean)


@corruption("elastic_transform", (
    (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03),
))  # fmt: skip
def elastic_transform(image: np.ndarray, c: tuple[float, float, float]) -> np.ndarray:
    """A random affine warp (three points moved up to ``affine``), then a smooth random
    displacement (uniform noise blurred by ``sigma``, times ``alpha``); bilinear, mirrored
    edges. The constants are fractions of the 32 px side (the official code multiplies them by
    it)."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, affine = (v * SIZE for v in c)
    x = np.asarray(image, dtype=np.float32) / 255.0
    shape = x.shape
    centre, side = np.float32(shape[:2]) // 2, min(shape[:2]) // 3
    src = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst = src + np.random.uniform(-affine, affine, size=src.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), shape[1::-1],
                       borderMode=cv2.BORDER_REFLECT_101)  # fmt: skip
    dx, dy = (
        (gaussian(np.random.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3)
         * alpha).astype(np.float32)[..., None]
        for _ in range(2)
    )  # fmt: skip
    rows, cols, chans = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    where = (rows + dy).reshape(-1, 1), (cols + dx).reshape(-1, 1), chans.reshape(-1, 1)
    return _to255(map_coordinates(x, where, order=1, mode="reflect").reshape(shape))


@corruption("pixelate", (0.95, 0.9, 0.85, 0.75, 0.65))
def pixelate(x: np.ndarray, factor: float) -> np.ndarray:
    """Box-downsample to ``int(32 x factor)`` px, box-upsample back."""
    from PIL import Image

    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((int(w * factor), int(h * factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


@corruption("jpeg_compression", (80, 65, 58, 50, 40))
def jpeg_compression(x: np.ndarray, quality: int) -> np.ndarray:
    """Saved and read back as a JPEG of ``quality`` (PIL)."""
    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))
