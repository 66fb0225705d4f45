"""Model construction: any torchvision classifier by name, plus a tiny ResNet for CPU runs.

Pretrained weights cannot be downloaded at run time on every machine, so ``pretrained`` is a
local file (a state dict or a checkpoint of this project) or a torchvision weights name that is
already in the torch hub cache; anything else fails with a message that says how to get the file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

# Project-local architectures, for CPU demos and tests on small images.
LOCAL_ARCHS = ("tiny_resnet",)


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


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models)) + list(LOCAL_ARCHS)


def check_arch(arch: str) -> None:
    """ValueError naming the closest known names when ``arch`` is not a model we can build."""
    if arch in available_archs():
        return
    close = difflib.get_close_matches(arch, available_archs(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"--arch {arch!r}: unknown model; expected a torchvision classification model or one of "
        f"{LOCAL_ARCHS}.{hint}"
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
            torchvision.models.get_model_weights(arch)[pretrained]
            if pretrained != "DEFAULT"
            else None
        )
        weights = weights or torchvision.models.get_model_weights(arch).DEFAULT
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


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the bare model inside a checkpoint of this project."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_model(arch: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """``arch`` by name with ``num_classes`` outputs; ``pretrained`` weights loaded from disk.

    When the pretrained head has another number of classes (ImageNet's 1000 vs a smaller task),
    the head is replaced by a fresh one of the right size and the rest of the weights are kept.
    """
    if arch == "tiny_resnet":
        model: nn.Module = TinyResNet(num_classes)
        if pretrained:
            model.load_state_dict(load_state_dict_file(_weights_file(arch, pretrained)))
        return model
    check_arch(arch)
    if not pretrained:
        return torchvision.models.get_model(arch, num_classes=num_classes)
    model = torchvision.models.get_model(arch)
    state = load_state_dict_file(_weights_file(arch, pretrained))
    head_name, head = _classifier(model)
    pretrained_classes = state.get(f"{head_name}.weight", head.weight).shape[0]
    if pretrained_classes != head.out_features:
        _set_module(model, head_name, nn.Linear(head.in_features, pretrained_classes))
    model.load_state_dict(state)
    if pretrained_classes != num_classes:
        _set_module(model, head_name, nn.Linear(head.in_features, num_classes))
    return model
