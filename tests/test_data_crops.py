"""Host-drawn random-resized-crop windows against torchvision's RandomResizedCrop.get_params."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from augmix_gpu.data.crops import encoded_size, jpeg_size, random_resized_crops
from augmix_gpu.data.pipeline import RANDOM_AREA, RANDOM_ASPECT

SIZES = [(375, 500), (500, 333), (64, 64), (36, 70)]  # (height, width)


def _ours(size, n, area=RANDOM_AREA, ratio=RANDOM_ASPECT, seed=0) -> np.ndarray:
    return random_resized_crops(np.tile(size, (n, 1)), np.random.default_rng(seed), area, ratio)


def _torchvision(size, n, area=RANDOM_AREA, ratio=RANDOM_ASPECT) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.empty(3, *size)  # get_params only reads the size
    out = [RandomResizedCrop.get_params(img, list(area), list(ratio)) for _ in range(n)]
    return np.array([(j, i, w, h) for i, j, h, w in out])  # -> (x, y, w, h)


@pytest.mark.parametrize("size", SIZES)
def test_windows_fit_and_follow_torchvisions_distribution(size):
    h_img, w_img = size
    ours, ref = _ours(size, 4000), _torchvision(size, 4000)
    x, y, w, h = ours.T
    assert (w > 0).all() and (h > 0).all() and (x >= 0).all() and (y >= 0).all()
    assert (x + w <= w_img).all() and (y + h <= h_img).all()

    def stats(win: np.ndarray) -> np.ndarray:
        x, y, w, h = win.T.astype(float)
        frac, aspect = w * h / (h_img * w_img), np.log(w / h)
        centre = (x + w / 2) / w_img
        return np.array(
            [*np.quantile(frac, [0.1, 0.5, 0.9]), aspect.mean(), aspect.std(), centre.mean()]
        )

    # Quantiles of the area fraction, log-aspect mean/spread and horizontal centre: sampling
    # noise at n=4000 is ~0.01-0.02; a different algorithm (e.g. uniform aspect, no retries, no
    # rounding) moves some of them by more.
    np.testing.assert_allclose(stats(ours), stats(ref), atol=0.03)


def test_fallback_is_torchvisions_centre_crop_exactly():
    # A 20x400 strip with area >= 99%: no attempt fits, both fall back to the clamped centre crop.
    size, area = (20, 400), (0.99, 1.0)
    ours, ref = _ours(size, 5, area=area), _torchvision(size, 5, area=area)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[0], [186, 0, 27, 20])  # w = round(20 * 4/3), centred


def test_same_rng_same_windows_and_area_range_is_honoured():
    a, b = _ours((375, 500), 64, seed=3), _ours((375, 500), 64, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _ours((375, 500), 64, seed=4))
    win = _ours((375, 500), 500, area=(0.5, 0.6))
    frac = win[:, 2] * win[:, 3] / (375 * 500)
    assert frac.min() > 0.49 and frac.max() < 0.61


def test_encoded_size_reads_the_header():
    buf = io.BytesIO()
    Image.new("RGB", (70, 36)).save(buf, format="JPEG")
    assert encoded_size(np.frombuffer(buf.getvalue(), dtype=np.uint8)) == (36, 70)
    assert encoded_size(np.zeros(10, dtype=np.uint8)) is None  # the loader names the file


def _encode(mode: str, size=(70, 36), **save) -> np.ndarray:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(buf, **{"format": "JPEG", **save})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def test_jpeg_size_parser_agrees_with_pil_on_real_variants():
    """The fast start-of-frame parser sizes every train file; PIL is the reference."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated (sizes stay the stored, unrotated ones)
    variants = {
        "baseline": _encode("RGB"),
        "progressive": _encode("RGB", progressive=True),
        "cmyk": _encode("CMYK"),
        "greyscale": _encode("L"),
        "exif": _encode("RGB", exif=exif),
        "icc_and_comment": _encode("RGB", icc_profile=b"\0" * 3000, comment=b"hello"),
        "restart_markers": _encode("RGB", size=(333, 500), restart_marker_blocks=1),
        "4:4:4": _encode("RGB", size=(17, 9), subsampling=0),
    }
    # Fill bytes (0xFF padding) before a marker are legal.
    base = variants["baseline"].tobytes()
    variants["fill_bytes"] = np.frombuffer(base[:2] + b"\xff\xff\xff" + base[2:], dtype=np.uint8)
    for name, data in variants.items():
        with Image.open(io.BytesIO(data.tobytes())) as im:
            ref = im.size[::-1]
        assert jpeg_size(data) == ref, name
        assert encoded_size(data) == ref, name
    png = io.BytesIO()
    Image.new("RGB", (70, 36)).save(png, format="PNG")
    png = np.frombuffer(png.getvalue(), dtype=np.uint8)
    assert jpeg_size(png) is None and encoded_size(png) == (36, 70)  # PIL for anything else
    truncated = variants["baseline"][:150]  # cut inside the headers, before the frame
    assert jpeg_size(truncated) is None
    assert jpeg_size(np.zeros(0, dtype=np.uint8)) is None
