"""The CIFAR networks: parameter counts against the published figures, shapes, and names."""

from __future__ import annotations

import pytest
import torch
import torchvision

from augmix_gpu.models import build_model, check_arch


def n_params(arch: str, num_classes: int = 10) -> int:
    with torch.device("meta"):  # counts only: no memory, no initialisation
        model = build_model(arch, num_classes)
    return sum(p.numel() for p in model.parameters())


# Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), parameter counts on CIFAR-10, in
# millions, as printed (one decimal): Tables 1, 4, 5 and 6 of arXiv:1605.07146.
PUBLISHED_WRN = {
    "wrn40_1": 0.6,
    "wrn40_2": 2.2,  # the AugMix paper's CIFAR network
    "wrn40_4": 8.9,
    "wrn40_8": 35.7,
    "wrn16_4": 2.7,
    "wrn16_8": 11.0,
    "wrn16_10": 17.1,
    "wrn22_8": 17.2,
    "wrn28_10": 36.5,
}


@pytest.mark.parametrize(("arch", "millions"), PUBLISHED_WRN.items())
def test_wide_resnet_parameter_counts_match_the_paper(arch, millions):
    assert round(n_params(arch) / 1e6, 1) == millions


def wrn_params_by_hand(depth: int, width: int, classes: int) -> int:
    """Counted from the architecture's description: bias-free convs, affine BatchNorms, a 1x1
    projection where the channels change, a final BN and a linear classifier."""
    n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 16 * 9  # stem
    for cin, cout in zip(ch[:-1], ch[1:]):
        total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout  # first block
        total += cin * cout if cin != cout else 0  # its projection
        total += (n - 1) * (2 * cout + 9 * cout * cout) * 2  # the other blocks
    return total + 2 * ch[3] + ch[3] * classes + classes


@pytest.mark.parametrize(("arch", "classes"), [("wrn40_2", 10), ("wrn40_2", 100), ("wrn16_1", 7)])
def test_wrn_exact_counts(arch, classes):
    depth, width = (int(v) for v in arch[3:].split("_"))
    assert n_params(arch, classes) == wrn_params_by_hand(depth, width, classes)
    assert wrn_params_by_hand(40, 2, 10) == 2_243_546  # WRN-40-2, CIFAR-10: the "2.2M"


def test_cifar_resnet18_is_torchvision_with_a_3x3_stem():
    # The CIFAR ResNet-18 of kuangliu/pytorch-cifar and later AugMix papers: 11,173,962
    # parameters for 10 classes, i.e. torchvision's minus the 7x7 stem's extra 64x3x(49-9).
    tv = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert n_params("resnet18_cifar") == tv - 64 * 3 * 40 == 11_173_962


def _last_stage_size(model: torch.nn.Module, stage: torch.nn.Module) -> tuple[int, int]:
    seen = []
    handle = stage.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-2:]))
    with torch.no_grad():
        model.eval()(torch.zeros(2, 3, 32, 32))
    handle.remove()
    return tuple(seen[0])


def test_32px_images_keep_spatial_extent():
    """The issue's bug: the ImageNet ResNet-18 leaves 1x1 maps before its last stage at 32 px."""
    tv = torchvision.models.resnet18(num_classes=10)
    assert _last_stage_size(tv, tv.layer3) == (2, 2) and _last_stage_size(tv, tv.layer4) == (1, 1)
    cifar = build_model("resnet18_cifar", 10)
    assert _last_stage_size(cifar, cifar.layer4) == (4, 4)
    wrn = build_model("wrn16_2", 100)
    assert _last_stage_size(wrn, wrn.groups[2]) == (8, 8)  # 32 -> 32 -> 16 -> 8
    assert wrn(torch.zeros(3, 3, 32, 32)).shape == (3, 100)


def test_wrn_block_structure():
    """Pre-activation blocks; a 1x1 projection only where the width or the stride changes."""
    wrn = build_model("wrn16_1", 10)  # n = 2 blocks per group, widths 16, 32, 64
    projections = [
        (g, i) for g, group in enumerate(wrn.groups) for i, b in enumerate(group) if b.shortcut
    ]
    assert projections == [(1, 0), (2, 0)]  # 16 -> 16 needs none at width 1
    assert [len(g) for g in build_model("wrn40_2", 10).groups] == [6, 6, 6]
    first = build_model("wrn40_2", 10).groups[0][0]
    assert first.shortcut is not None and first.shortcut.kernel_size == (1, 1)  # 16 -> 32


def test_wrn_names_are_validated():
    check_arch("wrn40_2")
    check_arch("wrn28_10")
    check_arch("resnet18_cifar")
    for bad in ("wrn41_2", "wrn4_2", "wrn40_0"):
        with pytest.raises(ValueError, match=rf"--arch '{bad}'.*depth = 6n \+ 4"):
            check_arch(bad)
    with pytest.raises(ValueError, match="unknown model.*wrn<depth>_<width>"):
        check_arch("wideresnet")


def test_local_weights_round_trip(tmp_path):
    model = build_model("wrn10_1", 10)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    again = build_model("wrn10_1", 10, pretrained=str(tmp_path / "w.pth"))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
