"""Model construction: any torchvision classifier by name, a tiny ResNet for CPU runs, and the
CIFAR networks of the AugMix literature (WRN-d-k, a CIFAR ResNet-18).

Pretrained weights cannot be downloaded at run time on every machine, so ``pretrained`` is a
local file (a torchvision state dict, an official AugMix checkpoint or a checkpoint of this
project: ``weights.load_weights`` reads them all) or a torchvision weights name that is already in
the torch hub cache; anything else fails with a message that says how to get the file.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .weights import Weights, load_weights

# Project-local architectures, for CPU demos and tests on small images, and CIFAR's (32 px).
# `wrn<depth>_<width>` names any Wide ResNet; wrn40_2 is listed as the AugMix paper's CIFAR net.
LOCAL_ARCHS = ("tiny_resnet", "resnet18_cifar", "wrn40_2")
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a projection shortcut when the shape changes (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A small ResNet (~0.3 M parameters) that learns the synthetic task on 2 CPU cores in minutes.

    Stride-2 stem, then one basic block per width with a 2x2 max-pool (not a stride-2 conv)
    before each later block: 56 px -> 28 -> 14 -> 7 -> 3. Why max-pools: on the embedded shapes
    task, with the demo's budget (~100-200 steps of 64 images), the stride-2-conv version stayed
    at chance for the first epochs while this one took off after ~2 epochs (experiments in the
    commit message: 4 epochs on an easy variant, 27% vs 60% val; the 1x1 stride-2 shortcut drops
    3/4 of the positions, a max-pool keeps the strongest edge response, cheap translation
    invariance for a shape label). Works from 32 px up (32 -> 16 -> 8 -> 4 -> 2).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                blocks.append(nn.MaxPool2d(2))
            blocks.append(_BasicBlock(cin, w, stride=1))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice plus a shortcut: the pre-activation block of Wide ResNets.

    Where the width or the stride changes, the shortcut is a 1x1 conv of the *activated* input
    (the tensor the first conv reads), as in the Wide ResNet code the AugMix authors ship;
    elsewhere it is the raw input itself.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = float(dropout)
        self.shortcut = (
            None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        out = torch.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = nn.functional.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016): the AugMix paper's CIFAR network (WRN-40-2).

    A 3x3 conv to 16 channels, then three groups of n = (depth - 4) / 6 pre-activation blocks
    with 16·width, 32·width and 64·width channels at strides 1, 2, 2 (32 -> 16 -> 8 px on
    CIFAR), BN-ReLU, global average pooling, a linear classifier. Initialisation as in the
    official AugMix code: Kaiming-normal (fan-out) convs, BN weight 1 / bias 0, zero linear bias.
    """

    def __init__(self, depth: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ValueError(
                f"Wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...) and "
                f"width >= 1, got depth={depth}, width={width}"
            )
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        groups: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            cin, cout = channels[g], channels[g + 1]
            blocks = [_PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                      for i in range(n)]  # fmt: skip
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.groups(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _torchvision_models():
    """torchvision.models, imported on first use: it costs ~3 s per process here (it pulls in
    torch._dynamo through torchvision.ops), which a process that never builds a torchvision model
    need not pay (train.py refusing a bad flag, evaluating the project's own networks). A training
    process imports torch._dynamo anyway: torch's optimisers do at construction."""
    import torchvision.models

    return torchvision.models


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 32 px images: torchvision's, with a 3x3 stride-1 stem and no max-pool.

    The ImageNet stem (7x7 stride 2, then a max-pool) divides 32 px by 4 before the first block,
    so the last stage sees 1x1 maps; this stem keeps 32 px into the first stage and 4x4 maps at
    the end. It is the CIFAR ResNet-18 later robustness papers compare with (11.2 M parameters
    for 10 classes); the rest of the network, its names and its initialisation are torchvision's.
    """
    model = _torchvision_models().resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _parse_wrn(arch: str) -> tuple[int, int] | None:
    """(depth, width) for a `wrn<depth>_<width>` name, None for any other name."""
    match = _WRN_NAME.fullmatch(arch)
    return (int(match[1]), int(match[2])) if match else None


def _build_local(arch: str, num_classes: int) -> nn.Module:
    if arch == "tiny_resnet":
        return TinyResNet(num_classes)
    if arch == "resnet18_cifar":
        return cifar_resnet18(num_classes)
    depth, width = _parse_wrn(arch)  # check_arch has vetted the name
    return WideResNet(depth, width, num_classes)


def available_archs() -> list[str]:
    models = _torchvision_models()
    return sorted(models.list_models(module=models)) + list(LOCAL_ARCHS)


def check_arch(arch: str) -> None:
    """ValueError naming the closest known names when ``arch`` is not a model we can build."""
    if arch in LOCAL_ARCHS or arch in available_archs():
        return
    wrn = _parse_wrn(arch)
    if wrn is not None:
        depth, width = wrn
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ValueError(
                f"--arch {arch!r}: a Wide ResNet wrn<depth>_<width> needs depth = 6n + 4 "
                f"(10, 16, 22, 28, 40, ...) and width >= 1, e.g. wrn40_2 or wrn28_10"
            )
        return
    close = difflib.get_close_matches(arch, available_archs(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"--arch {arch!r}: unknown model; expected a torchvision classification model or one of "
        f"{LOCAL_ARCHS} (or any wrn<depth>_<width>).{hint}"
    )


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The final linear layer of a torchvision classifier, by attribute path."""
    for name in (
        "fc",
        "head",
        "heads.head",
        "classifier.6",
        "classifier.3",
        "classifier.2",
        "classifier.1",
        "classifier",
    ):
        module = model
        try:
            for part in name.split("."):
                module = getattr(module, part) if not part.isdigit() else module[int(part)]
        except (AttributeError, IndexError, TypeError):
            continue
        if isinstance(module, nn.Linear):
            return name, module
    raise ValueError(f"cannot find the final linear layer of {type(model).__name__} to resize it")


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part) if not part.isdigit() else owner[int(part)]
    if last.isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


def _weights_file(arch: str, pretrained: str) -> Path:
    """Resolve ``pretrained`` to a local file, or explain how to get one."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if os.sep in pretrained or pretrained.endswith((".pth", ".pt", ".ckpt")):
        raise FileNotFoundError(f"--pretrained {pretrained!r}: no such file")
    try:
        weights = (
            _torchvision_models().get_model_weights(arch)[pretrained]
            if pretrained != "DEFAULT"
            else None
        )
        weights = weights or _torchvision_models().get_model_weights(arch).DEFAULT
    except (KeyError, ValueError):
        raise ValueError(
            f"--pretrained {pretrained!r} is neither a file nor a weights name of {arch!r}"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"--pretrained {pretrained}: weights {weights} are not in the local cache ({cached}) and this "
        f"machine cannot download them. Fetch {weights.url} on a machine with internet access and pass "
        f"--pretrained /path/to/{Path(weights.url).name} (or copy it to {cached.parent})."
    )


def pretrained_weights(arch: str | None, pretrained: str) -> Weights:
    """``--pretrained`` (a file, or a cached torchvision weights name of ``arch``, resnet50 if
    None) read for ``arch`` (None: whatever the file holds)."""
    return load_weights(_weights_file(arch or "resnet50", pretrained), arch)


def _new_model(arch: str, num_classes: int) -> nn.Module:
    if arch in LOCAL_ARCHS or _parse_wrn(arch) is not None:
        return _build_local(arch, num_classes)
    return _torchvision_models().get_model(arch, num_classes=num_classes)


def build_model(arch: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """``arch`` by name with ``num_classes`` outputs; ``pretrained`` weights loaded from disk.

    When the pretrained head has another number of classes (ImageNet's 1000 vs a smaller task),
    the head is replaced by a fresh one of the right size and the rest of the weights are kept.
    """
    check_arch(arch)
    model = _new_model(arch, num_classes)
    if not pretrained:
        return model
    state = pretrained_weights(arch, pretrained).state
    head_name, head = _classifier(model)
    pretrained_classes = state.get(f"{head_name}.weight", head.weight).shape[0]
    if pretrained_classes != num_classes:
        _set_module(model, head_name, nn.Linear(head.in_features, pretrained_classes))
    model.load_state_dict(state)
    if pretrained_classes != num_classes:
        _set_module(model, head_name, nn.Linear(head.in_features, num_classes))
    return model
