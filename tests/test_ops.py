"""The op table against PIL (the official AugMix ops) and its documented deviations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import natural_batch, natural_image
from PIL import Image, ImageEnhance, ImageOps

from augmix_gpu.augment import ops
from augmix_gpu.augment.augmix import AugMixBatch, AugMixParams
from augmix_gpu.augment.ops import AUGMENTATIONS, AUGMENTATIONS_ALL, OPS, get_ops, warp_affine

SIZE = 64
SEEDS = (0, 1)


def ours(name: str, img: np.ndarray, param: float) -> np.ndarray:
    """Apply our op to a uint8 HWC image; return float HWC in 0..255 (no rounding)."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
    y = OPS[name].apply(x, torch.tensor([param], dtype=torch.float64))
    return y[0].permute(1, 2, 0).numpy() * 255.0


def psnr_interior(a: np.ndarray, b: np.ndarray, margin: int = 2) -> float:
    a = a[margin:-margin, margin:-margin].astype(np.float64)
    b = b[margin:-margin, margin:-margin].astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def frac_within_one_level(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b.astype(np.float64)) <= 1.0 + 1e-6))


def pil_affine(img: Image.Image, data: tuple[float, ...]) -> np.ndarray:
    return np.asarray(img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR))


# --- the table ---------------------------------------------------------------------------------


def test_table_matches_the_official_lists_and_constants():
    assert AUGMENTATIONS == (
        "autocontrast", "equalize", "posterize", "rotate", "solarize",
        "shear_x", "shear_y", "translate_x", "translate_y",
    )  # fmt: skip
    assert AUGMENTATIONS_ALL == AUGMENTATIONS + ("color", "contrast", "brightness", "sharpness")
    assert [op.name for op in get_ops()] == list(AUGMENTATIONS)
    assert [op.name for op in get_ops(all_ops=True)] == list(AUGMENTATIONS_ALL)
    maxima = {n: OPS[n].max_param for n in AUGMENTATIONS_ALL}
    assert maxima["rotate"] == 30 and maxima["shear_x"] == maxima["shear_y"] == 0.3
    assert maxima["posterize"] == 4 and maxima["solarize"] == 256
    assert maxima["translate_x"] == pytest.approx(1 / 3) and maxima["autocontrast"] is None
    assert {n for n, op in OPS.items() if op.signed} == {
        "rotate",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    }
    assert {n for n, op in OPS.items() if op.affine is not None} == {
        "rotate",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    }
    assert {n: op.gradient for n, op in OPS.items() if op.gradient != "exact"} == {
        "autocontrast": "none", "equalize": "none",
        "posterize": "straight_through", "solarize": "straight_through",
    }  # fmt: skip


def test_parameter_is_the_official_mapping_without_truncation():
    level = torch.tensor([0.1, 2.5, 3.0, 10.0])
    # float_parameter(l, max) = l * max / 10; int_parameter truncates that, we do not.
    assert torch.allclose(OPS["rotate"].parameter(level), level * 3.0)
    assert torch.allclose(OPS["posterize"].parameter(level), level * 0.4)
    assert torch.allclose(OPS["solarize"].parameter(level), level * 25.6)
    # enhance factor = float_parameter(l, 1.8) + 0.1, in [0.1, 1.9]
    assert torch.allclose(OPS["color"].parameter(level), level * 0.18 + 0.1)
    assert torch.equal(OPS["equalize"].parameter(level), torch.zeros(4))
    # at a level where the official int_parameter is exact, both agree
    assert float(OPS["rotate"].parameter(torch.tensor(3.0))) == int(3.0 * 30 / 10)


# --- parity with PIL -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_posterize_matches_pil(seed, bits):
    img = natural_image(SIZE, seed)
    ref = np.asarray(ImageOps.posterize(Image.fromarray(img), bits))
    assert frac_within_one_level(ours("posterize", img, 4 - bits), ref) >= 0.99


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [0, 64, 128, 200, 256])
def test_solarize_matches_pil(seed, threshold):
    img = natural_image(SIZE, seed)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(img), threshold))
    assert frac_within_one_level(ours("solarize", img, 256 - threshold), ref) >= 0.99


@pytest.mark.parametrize("seed", SEEDS + (2, 3))
@pytest.mark.parametrize("name", ["autocontrast", "equalize"])
def test_autocontrast_and_equalize_match_pil(seed, name):
    img = natural_image(SIZE, seed)
    ref = np.asarray(getattr(ImageOps, name)(Image.fromarray(img)))
    assert frac_within_one_level(ours(name, img, 0.0), ref) >= 0.99


def test_equalize_matches_pil_on_a_low_contrast_image():
    img = (natural_image(SIZE, 5) // 4 + 60).astype(np.uint8)  # ~55 levels used
    ref = np.asarray(ImageOps.equalize(Image.fromarray(img)))
    assert frac_within_one_level(ours("equalize", img, 0.0), ref) >= 0.99


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("degrees", [-30.0, -17.0, 5.0, 12.5, 30.0])
def test_rotate_matches_pil(seed, degrees):
    img = natural_image(SIZE, seed)
    ref = np.asarray(Image.fromarray(img).rotate(degrees, resample=Image.BILINEAR))
    assert psnr_interior(ours("rotate", img, degrees), ref) >= 30.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shear", [-0.3, -0.05, 0.17, 0.3])
def test_shear_matches_pil(seed, shear):
    img = natural_image(SIZE, seed)
    pil = Image.fromarray(img)
    assert psnr_interior(ours("shear_x", img, shear), pil_affine(pil, (1, shear, 0, 0, 1, 0))) >= 30
    assert psnr_interior(ours("shear_y", img, shear), pil_affine(pil, (1, 0, 0, shear, 1, 0))) >= 30


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pixels", [-21, -4, 7, 21])
def test_translate_matches_pil(seed, pixels):
    img = natural_image(SIZE, seed)
    pil = Image.fromarray(img)
    tx = ours("translate_x", img, pixels / SIZE)
    ty = ours("translate_y", img, pixels / SIZE)
    assert psnr_interior(tx, pil_affine(pil, (1, 0, pixels, 0, 1, 0))) >= 30.0
    assert psnr_interior(ty, pil_affine(pil, (1, 0, 0, 0, 1, pixels))) >= 30.0


def test_geometric_ops_on_a_non_square_image():
    """Centre (W/2, H/2) and translate by W for x, H for y."""
    img = natural_image((40, 72), 3)  # H=40, W=72
    pil = Image.fromarray(img)
    ref = np.asarray(pil.rotate(23.0, resample=Image.BILINEAR))
    assert psnr_interior(ours("rotate", img, 23.0), ref) >= 30.0
    assert (
        psnr_interior(ours("translate_x", img, 18 / 72), pil_affine(pil, (1, 0, 18, 0, 1, 0))) >= 30
    )
    assert (
        psnr_interior(ours("translate_y", img, -10 / 40), pil_affine(pil, (1, 0, 0, 0, 1, -10)))
        >= 30
    )


_ENHANCE = {
    "color": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness,
    "sharpness": ImageEnhance.Sharpness,
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.45, 1.9])
@pytest.mark.parametrize("name", list(_ENHANCE))
def test_enhance_ops_match_pil(seed, factor, name):
    img = natural_image(SIZE, seed)
    ref = np.asarray(_ENHANCE[name](Image.fromarray(img)).enhance(factor))
    assert psnr_interior(ours(name, img, factor), ref, margin=1) >= 30.0


# --- parity through AugMixBatch, in both of its forms -------------------------------------------

# At severity 7.5 (u = 1, so level 7.5) every op's parameter is one PIL takes exactly on a 64 px
# image: posterize keeps 1 bit, solarize at 64, rotate 22.5 deg, shear 0.225, translate 16 px.
_PIL_AT_7_5 = {
    "autocontrast": lambda im: ImageOps.autocontrast(im),
    "equalize": lambda im: ImageOps.equalize(im),
    "posterize": lambda im: ImageOps.posterize(im, 1),
    "solarize": lambda im: ImageOps.solarize(im, 64),
    "rotate": lambda im: im.rotate(-22.5, resample=Image.BILINEAR),  # sign -1 below
    "shear_x": lambda im: im.transform(
        im.size, Image.AFFINE, (1, -0.225, 0, 0, 1, 0), Image.BILINEAR
    ),
    "shear_y": lambda im: im.transform(
        im.size, Image.AFFINE, (1, 0, 0, -0.225, 1, 0), Image.BILINEAR
    ),
    "translate_x": lambda im: im.transform(
        im.size, Image.AFFINE, (1, 0, -16, 0, 1, 0), Image.BILINEAR
    ),
    "translate_y": lambda im: im.transform(
        im.size, Image.AFFINE, (1, 0, 0, 0, 1, -16), Image.BILINEAR
    ),
}


@pytest.mark.parametrize("strategy", ["grouped", "static"])
@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_an_augmix_view_of_one_op_matches_pil(name, strategy):
    """A view whose chains are the one op (weight 1, mix 1, no normalisation) is PIL's op."""
    aug = AugMixBatch(normalize=False, strategy=strategy)
    op = torch.tensor(AUGMENTATIONS.index(name))
    params = AugMixParams(
        ops=op.expand(2, 3, 3, 1).clone(),
        depth=torch.ones(2, 3, 1, dtype=torch.long),
        level_u=torch.ones(2, 3, 3, 1),
        signs=-torch.ones(2, 3, 3, 1),
        weights=torch.tensor([1.0, 0.0, 0.0]).expand(2, 1, 3).clone(),
        mix=torch.ones(2, 1),
    )
    img = natural_image(SIZE, 1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    view = aug.apply(x, params, 7.5)[1][0].permute(1, 2, 0).numpy() * 255.0
    ref = np.asarray(_PIL_AT_7_5[name](Image.fromarray(img)))
    if OPS[name].affine is not None:
        assert psnr_interior(view, ref) >= 30.0
    else:
        assert frac_within_one_level(view, ref) >= 0.99


# --- batching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUGMENTATIONS_ALL)
def test_a_batch_with_per_sample_params_equals_one_image_at_a_time(name):
    x = natural_batch(4, 32, seed=10).float() / 255.0
    level = torch.tensor([0.5, 3.0, 7.5, 10.0])
    param = OPS[name].parameter(level) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    if not OPS[name].signed:
        param = param.abs()
    batched = OPS[name].apply(x, param)
    for i in range(4):
        single = OPS[name].apply(x[i : i + 1], param[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=0)
    assert batched.shape == x.shape and batched.min() >= 0 and batched.max() <= 1


@pytest.mark.parametrize("name", AUGMENTATIONS_ALL)
def test_ops_accept_an_empty_group(name):
    """AugMixBatch visits every op each step, also with no sample in it."""
    out = OPS[name].apply(torch.rand(0, 3, 8, 8), torch.zeros(0))
    assert out.shape == (0, 3, 8, 8)


def test_warp_of_the_identity_matrix_is_exact():
    x = natural_batch(2, 24).double() / 255
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64).expand(2, 2, 3)
    torch.testing.assert_close(warp_affine(x, eye), x, atol=1e-12, rtol=0)


# --- deviations from PIL, each pinned on purpose -------------------------------------------------


def test_deviation_autocontrast_is_not_truncated_to_integer_levels():
    """PIL truncates (v - lo) * 255 / (hi - lo); we keep the fraction: 0 <= ours - PIL <= 1 level.

    (PIL computes ``ix * scale + offset`` in floating point, so an exact integer can truncate one
    level low: hence <= 1, not < 1.)
    """
    img = natural_image(SIZE, 4)
    ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img))).astype(np.float64)
    diff = ours("autocontrast", img, 0.0) - ref
    assert diff.min() >= -1e-6 and diff.max() <= 1.0 + 1e-6
    assert diff.max() > 0.5  # the fraction is really kept


def test_deviation_posterize_bits_are_continuous():
    """Between integer bits the step is 2**(4 + param) levels; PIL only knows integer bits."""
    img = natural_image(SIZE, 0)
    out = ours("posterize", img, 1.5)  # 2.5 bits kept: step 2**5.5 = 45.25 levels
    step = 2.0**5.5
    assert np.allclose(out / step, np.round(out / step), atol=1e-6)
    assert np.all(out <= img + 1e-6) and np.all(img - out < step)
    # 0 bits (param 4, level 10) is black, as older PIL gave; Pillow >= 10 refuses bits=0.
    assert np.all(ours("posterize", img, 4.0) == 0)


def test_deviation_solarize_threshold_is_continuous():
    img = natural_image(SIZE, 1)
    out = ours("solarize", img, 256 - 100.5)  # threshold 100.5: 100 stays, 101 inverts
    expected = np.where(img < 100.5, img, 255 - img.astype(np.float64))
    assert np.allclose(out, expected, atol=1e-6)


def test_deviation_translate_is_a_fraction_of_each_side():
    """Official: IMAGE_SIZE/3 pixels for both axes; ours: W/3 along x, H/3 along y."""
    assert OPS["translate_x"].max_param == pytest.approx(1 / 3)
    m_x = OPS["translate_x"].affine(torch.tensor([1 / 3]), 30, 60)
    m_y = OPS["translate_y"].affine(torch.tensor([1 / 3]), 30, 60)
    assert float(m_x[0, 0, 2]) == pytest.approx(20.0) and float(m_y[0, 1, 2]) == pytest.approx(10.0)


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,param",
    [("rotate", 11.0), ("shear_x", 0.13), ("shear_y", -0.21), ("translate_x", 0.087),
     ("translate_y", -0.11), ("color", 0.7), ("contrast", 1.3), ("brightness", 0.8),
     ("sharpness", 1.6)],
)  # fmt: skip
def test_exact_gradients_agree_with_finite_differences(name, param):
    x = (natural_batch(1, 10, seed=7).double() / 255.0).requires_grad_(False)
    p = torch.tensor([param], dtype=torch.float64, requires_grad=True)
    assert OPS[name].gradient == "exact"
    assert torch.autograd.gradcheck(lambda q: OPS[name].apply(x, q), (p,), eps=1e-6, atol=1e-5)


def test_posterize_straight_through_gradient():
    """d out / d param of the surrogate x - step/2: -(1/2) * step * ln 2 / 255 per pixel."""
    x = natural_batch(1, 16).float() / 255
    p = torch.tensor([1.0], requires_grad=True)
    OPS["posterize"].apply(x, p).sum().backward()
    per_pixel = float(p.grad) / x.numel()
    assert per_pixel == pytest.approx(-0.5 * 2.0**5 * np.log(2) / 255, rel=1e-4)
    # and the finite difference of the hard op over a wide step has the same sign
    with torch.no_grad():
        fd = OPS["posterize"].apply(x, torch.tensor([2.0])) - OPS["posterize"].apply(
            x, torch.tensor([0.0])
        )
    assert float(fd.sum()) < 0


def test_solarize_straight_through_gradient_has_the_sign_of_the_finite_difference():
    x = natural_batch(2, 24).float() / 255
    p = torch.tensor([120.0, 60.0], requires_grad=True)  # thresholds 136, 196
    OPS["solarize"].apply(x, p).sum().backward()
    with torch.no_grad():
        hi = OPS["solarize"].apply(x, p + 20.0).sum(dim=(1, 2, 3))
        lo = OPS["solarize"].apply(x, p - 20.0).sum(dim=(1, 2, 3))
    assert torch.isfinite(p.grad).all()
    assert torch.equal(torch.sign(p.grad), torch.sign(hi - lo))


@pytest.mark.parametrize("name", ["equalize", "posterize", "solarize", "autocontrast"])
def test_lookup_ops_pass_a_gradient_to_their_input(name):
    """So a chain keeps the severity gradient of the ops before them."""
    x = (natural_batch(1, 16).float() / 255).requires_grad_(True)
    OPS[name].apply(x, torch.tensor([1.0])).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_no_autograd_graph_without_grad():
    x = natural_batch(1, 16).float() / 255
    for op in get_ops(all_ops=True):
        assert not op.apply(x, op.parameter(torch.tensor([5.0]))).requires_grad


def test_solarize_temperature_is_a_few_levels():
    assert 1.0 <= ops.SOLARIZE_TEMPERATURE <= 8.0
