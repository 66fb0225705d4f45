"""``levels="official"`` (``--op_levels official``): the official AugMix ops, against PIL running
the official formulas (google-research/augmix ``augmentations.py``: ``int_parameter`` truncates
``level * max / 10``, ``float_parameter`` does not; every op's output is a uint8 PIL image).

Each op alone, at random levels and both signs, in every form: the chain's image is PIL's, exactly
for most ops, to one level on a bounded share of pixels where float and PIL's integer arithmetic
can part (``EXACT``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import natural_image
from PIL import Image, ImageEnhance, ImageOps

from augmix_gpu.augment.augmix import AugMixBatch, AugMixParams
from augmix_gpu.augment.execute import fused_unavailable
from augmix_gpu.augment.ops import AUGMENTATIONS_ALL, OPS
from augmix_gpu.augment.severity import LearnableSeverity

SIZE, SEVERITY = 32, 10.0
# The share of pixels equal to PIL's (the rest one level off) where our float arithmetic and PIL's
# integer arithmetic can part: the warps (PIL's bilinear sampler in double), autocontrast and
# brightness (float results truncated either way), color and sharpness (PIL's degenerate images:
# its integer grey L, its integer SMOOTH filter). Every other op is PIL's exactly.
EXACT = {"rotate": 0.995, "shear_x": 0.995, "shear_y": 0.995, "autocontrast": 0.97,
         "brightness": 0.97, "color": 0.75, "sharpness": 0.75}  # fmt: skip
FORMS = ["grouped", "static"] + (["fused"] if fused_unavailable("cpu") is None else [])


def int_parameter(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def float_parameter(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def official(name: str, img: Image.Image, level: float, sign: int) -> np.ndarray:
    """The official op at ``level`` (its random sign given), on a uint8 PIL image."""
    w, h = img.size
    affine = lambda data: img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR)  # noqa: E731
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}  # fmt: skip
    if name == "autocontrast":
        out = ImageOps.autocontrast(img)
    elif name == "equalize":
        out = ImageOps.equalize(img)
    elif name == "posterize":
        out = ImageOps.posterize(img, 4 - int_parameter(level, 4))
    elif name == "solarize":
        out = ImageOps.solarize(img, 256 - int_parameter(level, 256))
    elif name == "rotate":
        out = img.rotate(sign * int_parameter(level, 30), resample=Image.BILINEAR)
    elif name == "shear_x":
        out = affine((1, sign * float_parameter(level, 0.3), 0, 0, 1, 0))
    elif name == "shear_y":
        out = affine((1, 0, 0, sign * float_parameter(level, 0.3), 1, 0))
    elif name == "translate_x":
        out = affine((1, 0, sign * int_parameter(level, w / 3), 0, 1, 0))
    elif name == "translate_y":
        out = affine((1, 0, 0, 0, 1, sign * int_parameter(level, h / 3)))
    else:
        out = enhance[name](img).enhance(float_parameter(level, 1.8) + 0.1)
    return np.asarray(out).astype(np.float64)


def one_op_params(op: int, u: float, sign: float) -> AugMixParams:
    """One view whose first chain is the op alone (depth 1, weight 1, mix 1)."""
    return AugMixParams(
        ops=torch.full((1, 3, 3, 1), op),
        depth=torch.ones(1, 3, 1, dtype=torch.long),
        level_u=torch.full((1, 3, 3, 1), u),
        signs=torch.full((1, 3, 3, 1), sign),
        weights=torch.tensor([[[1.0, 0.0, 0.0]]]),
        mix=torch.ones(1, 1),
    )


def level_of(u: float) -> float:
    """The level the module computes from ``u`` (float32, as ``execute.op_parameters``)."""
    s, low = torch.tensor(SEVERITY), torch.tensor(0.1)
    return float(low + torch.tensor(u) * (s - low))


def random_levels(name: str, rng: np.random.Generator, n: int) -> list[float]:
    """``u`` draws whose level is not within 1e-3 of a truncation boundary (where float32 and
    Python's float64 may round to different sides)."""
    op, out = OPS[name], []
    while len(out) < n:
        u = float(np.float32(rng.uniform()))
        units = {"int": 1, "width": SIZE, "height": SIZE}.get(op.official)
        q = level_of(u) * (op.max_param or 0) / 10 * (units or 1)
        if units is None or 1e-3 < q % 1 < 1 - 1e-3:
            out.append(u)
    return out


def view_of(aug: AugMixBatch, x: torch.Tensor, params: AugMixParams) -> np.ndarray:
    """The view (here the chain's image) in 0..255, HWC."""
    return aug.apply(x, params, SEVERITY)[1][0].permute(1, 2, 0).numpy() * 255.0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", AUGMENTATIONS_ALL)
def test_each_official_op_is_pil_running_the_official_formula(name, form):
    aug = AugMixBatch(all_ops=True, normalize=False, strategy=form, severity=SEVERITY,
                      num_views=1, levels="official")  # fmt: skip
    img = natural_image(SIZE, 3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    rng = np.random.default_rng(AUGMENTATIONS_ALL.index(name))
    for u, sign in zip(random_levels(name, rng, 4), (1, -1, 1, -1)):
        ours = view_of(aug, x, one_op_params(AUGMENTATIONS_ALL.index(name), u, sign))
        ref = official(name, Image.fromarray(img), level_of(u), sign)
        assert np.array_equal(ours, np.round(ours)), "every op's output is on the uint8 grid"
        diff = np.abs(ours - ref)
        exact = EXACT.get(name, 1.0)
        assert diff.max() <= (0 if exact == 1.0 else 1) and np.mean(diff == 0) >= exact, (u, sign)


def test_official_magnitudes_are_truncated_to_whole_units():
    """int_parameter: posterize removes whole bits, rotate turns whole degrees, translate moves
    whole pixels (of its own side); float_parameter (shear, enhance) is not truncated."""
    level = torch.tensor([2.9, 7.5, 9.99])
    assert OPS["posterize"].official_parameter(level, 32, 48).tolist() == [1.0, 3.0, 3.0]
    assert OPS["rotate"].official_parameter(level, 32, 48).tolist() == [8.0, 22.0, 29.0]
    assert OPS["solarize"].official_parameter(level, 32, 48).tolist() == [74.0, 192.0, 255.0]
    px = OPS["translate_x"].official_parameter(level, 32, 48) * 48  # of the width, 48
    assert torch.allclose(px, torch.tensor([4.0, 12.0, 15.0]))
    py = OPS["translate_y"].official_parameter(level, 32, 48) * 32  # of the height, 32
    assert torch.allclose(py, torch.tensor([3.0, 8.0, 10.0]))
    assert torch.equal(
        OPS["shear_x"].official_parameter(level, 32, 48), OPS["shear_x"].parameter(level)
    )
    assert torch.equal(
        OPS["color"].official_parameter(level, 32, 48), OPS["color"].parameter(level)
    )


@pytest.mark.parametrize("form", FORMS)
def test_a_whole_official_call_stays_on_the_uint8_grid_and_agrees_across_forms(form):
    """Every chain image of a random call is on the uint8 grid; the forms agree on the same draws
    (the fused kernels compute each op in float32 before rounding: a level at most, rarely)."""
    kw = dict(all_ops=True, normalize=False, severity=3.0, levels="official")
    ref, aug = AugMixBatch(strategy="static", **kw), AugMixBatch(strategy=form, **kw)
    x = torch.from_numpy(np.stack([natural_image(SIZE, s) for s in range(4)])).permute(0, 3, 1, 2)
    params = ref.sample_params(4, generator=torch.Generator().manual_seed(5))
    chains = ref.chains(x, params, 3.0) * 255.0
    assert torch.equal(chains, torch.round(chains))
    for a, b in zip(ref.apply(x, params, 3.0), aug.apply(x, params, 3.0)):
        off = (a - b).abs() * 255.0
        assert float((off > 1e-3).float().mean()) <= 0.01 and float(off.max()) <= 1.0 + 1e-3


def test_continuous_is_the_default_and_official_refuses_a_learnable_severity():
    assert AugMixBatch().levels == "continuous"
    with pytest.raises(ValueError, match="levels='official' truncates magnitudes"):
        AugMixBatch(severity=LearnableSeverity(), levels="official")
    with pytest.raises(ValueError, match="levels: expected one of"):
        AugMixBatch(levels="paper")


def test_the_training_flag_reaches_the_augmenter_and_refuses_a_learnable_severity():
    from augmix_gpu.train.config import resolve_settings, validate_settings
    from augmix_gpu.train.run import build_augmenter

    s = resolve_settings(["--aug_type", "augmix_jsd", "--op_levels", "official"])
    validate_settings(s, world_size=1)
    assert build_augmenter(s.augment, s.severity).levels == "official"
    learnable = resolve_settings(["--op_levels", "official"])  # the default aug_type learns s
    with pytest.raises(ValueError, match="--op_levels 'official': truncated magnitudes carry no"):
        validate_settings(learnable, world_size=1)
