"""Published weight files load with the source model's logits: the official AugMix checkpoints
(imagenet.py's ResNet-50, cifar.py's Wide ResNets), torchvision state dicts, our checkpoints.

Each file is built here in its released format: the official cifar.py Wide ResNet is written out
below from its published definition (google-research/augmix
``third_party/WideResNet_pytorch/wideresnet.py``: the module names and forward pass are what
matter), wrapped in ``nn.DataParallel`` as both official scripts do, saved with the entries they
save (``epoch``, ``model``, ``state_dict``, ``best_acc(1)``, ``optimizer``; cifar.py adds
``dataset``) in torch 1.2's legacy (non-zip) format, with random weights and BatchNorm statistics.
The loaded model's float64 logits must equal the source model's up to rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from augmix_gpu.models import build_model
from augmix_gpu.weights import load_weights

# ----------------------------------------------------------------- the official cifar.py network


class OfficialBlock(nn.Module):
    """wideresnet.py's BasicBlock: BN-ReLU first; a 1x1 ``convShortcut`` of the activated input
    where the width changes (``equalInOut`` False)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class OfficialGroup(nn.Module):
    """wideresnet.py's NetworkBlock: the blocks in ``self.layer`` (an ``nn.Sequential``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                OfficialBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class OfficialWideResNet(nn.Module):
    """wideresnet.py's WideResNet(depth, num_classes, widen_factor): conv1, block1-3, bn1, fc;
    ``F.avg_pool2d(out, 8)`` (32 px inputs)."""

    def __init__(self, depth: int, num_classes: int, widen: int) -> None:
        super().__init__()
        c = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = OfficialGroup(n, c[0], c[1], 1)
        self.block2 = OfficialGroup(n, c[1], c[2], 2)
        self.block3 = OfficialGroup(n, c[2], c[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU()
        self.fc = nn.Linear(c[3], num_classes)
        self.channels = c[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics: eval-mode BN does real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else 0.1 * noise)
    return model.eval()


def _official_checkpoint(net: nn.Module, path, **entries) -> None:
    """What imagenet.py / cifar.py save: DataParallel's state dict and their other entries."""
    wrapped = nn.DataParallel(net)
    optimizer = torch.optim.SGD(wrapped.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
    ckpt = {"epoch": 99, "state_dict": wrapped.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save({**ckpt, **entries}, path, _use_new_zipfile_serialization=False)  # torch 1.2


def _same_logits(source: nn.Module, loaded: nn.Module, size: int, n: int = 4) -> None:
    x = torch.rand(
        n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        want, got = source.double().eval()(x), loaded.double().eval()(x)
    assert want.abs().max() > 0.1  # a real function of the input, not a constant
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------- tests


def test_official_cifar_py_wrn_checkpoints_load_with_the_same_logits(tmp_path):
    for depth, widen, classes in ((40, 2, 100), (10, 1, 10)):
        source = _randomise(OfficialWideResNet(depth, classes, widen), seed=depth)
        path = tmp_path / f"wrn{depth}.pth.tar"
        _official_checkpoint(source, path, dataset=f"cifar{classes}", model="wrn", best_acc=0.7)
        weights = load_weights(path)
        assert (weights.format, weights.arch) == (
            "AugMix cifar.py checkpoint",
            f"wrn{depth}_{widen}",
        )
        assert weights.normalization == "half"  # cifar.py: Normalize([0.5] * 3, [0.5] * 3)
        loaded = build_model(f"wrn{depth}_{widen}", classes, pretrained=str(path))
        _same_logits(source, loaded, size=32)


def test_official_imagenet_py_resnet50_checkpoint(tmp_path):
    source = _randomise(torchvision.models.resnet50(), seed=0)
    path = tmp_path / "checkpoint.pth.tar"
    _official_checkpoint(source, path, model="resnet50", best_acc1=0.7753)
    weights = load_weights(path, "resnet50")
    assert (weights.format, weights.arch, weights.normalization) == (
        "AugMix imagenet.py checkpoint", "resnet50", "imagenet")  # fmt: skip
    assert all(not k.startswith("module.") for k in weights.state)
    _same_logits(source, build_model("resnet50", 1000, pretrained=str(path)), size=64, n=2)


def test_torchvision_state_dict_and_our_checkpoint(tmp_path):
    from augmix_gpu.checkpoint import save_atomic

    source = _randomise(torchvision.models.resnet18(num_classes=7), seed=3)
    old_style = {k: v for k, v in source.state_dict().items() if "num_batches" not in k}
    torch.save(old_style, tmp_path / "r18.pth")  # old torchvision files: no num_batches_tracked
    assert load_weights(tmp_path / "r18.pth").format == "state dict"
    _same_logits(source, build_model("resnet18", 7, pretrained=str(tmp_path / "r18.pth")), 48)

    tiny = _randomise(build_model("tiny_resnet", 3), seed=4)
    save_atomic({"model": tiny.state_dict(), "classes": ["a", "b", "c"],
                 "config": {"arch": "tiny_resnet", "normalization": "half"},
                 "rng": [torch.random.get_rng_state()]}, tmp_path / "last.ckpt")  # fmt: skip
    weights = load_weights(tmp_path / "last.ckpt")
    assert (weights.format, weights.arch, weights.normalization) == (
        "augmix-gpu checkpoint", "tiny_resnet", "half")  # fmt: skip
    _same_logits(tiny, build_model("tiny_resnet", 3, pretrained=str(tmp_path / "last.ckpt")), 32)


def test_evaluate_py_reads_a_cifar_py_checkpoint_with_its_normalisation(tmp_path):
    """evaluate.py --pretrained on cifar.py's file: arch from its keys, classes from --cifar,
    inputs normalised 0.5 / 0.5 as cifar.py's preprocess does (the NLL tells it from ImageNet's)."""
    from augmix_gpu.data import load_cifar, synthetic
    from augmix_gpu.eval.cli import main

    root = synthetic.make_synthetic_cifar(
        tmp_path / "c10", train_per_class=1, test_per_class=3, progress=False
    )
    source = _randomise(OfficialWideResNet(10, 10, 1), seed=5)
    _official_checkpoint(source, tmp_path / "c.tar", dataset="cifar10", model="wrn", best_acc=0.1)
    args = ["--pretrained", str(tmp_path / "c.tar"), "--cifar", str(root), "--device", "cpu"]
    assert main([*args, "--no_progress", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    test = load_cifar(root, train=False)
    x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = source.double()(x)
    labels = torch.from_numpy(test.labels)
    assert res["clean"]["n"] == len(test) == 30
    assert res["clean"]["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean())
    assert res["clean"]["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert (
        res["model"]["arch"] == "wrn10_1" and res["model"]["format"] == "AugMix cifar.py checkpoint"
    )
    assert res["preprocessing"]["normalization"].startswith("half")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the pickled class, refused
def test_what_cannot_load_says_why(tmp_path):
    import pickle

    source = OfficialWideResNet(16, 10, 2)
    _official_checkpoint(source, tmp_path / "w.tar", dataset="cifar10", model="wrn", best_acc=0.5)
    with pytest.raises(
        ValueError, match=r"holds a wrn16_2 \(AugMix cifar.py checkpoint\), not --arch wrn40_2"
    ):
        load_weights(tmp_path / "w.tar", "wrn40_2")
    _official_checkpoint(nn.Linear(2, 2), tmp_path / "a.tar", dataset="cifar10", model="allconv")
    with pytest.raises(ValueError, match="'allconv' network: of cifar.py's networks only"):
        load_weights(tmp_path / "a.tar")
    (tmp_path / "obj.pth").write_bytes(pickle.dumps(OfficialBlock))  # code, not weights
    with pytest.raises(ValueError, match="cannot be read as weights with weights_only=True"):
        load_weights(tmp_path / "obj.pth")
    torch.save({"fc.weight": torch.ones(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="'epoch' is not a tensor"):
        load_weights(tmp_path / "mixed.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "nope.pth")
