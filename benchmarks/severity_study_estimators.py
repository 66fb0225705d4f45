"""Why the held-out hypergradient is exact: the DARTS finite difference against the double backward.

The held-out objective needs the mixed derivative ``c^T d(grad_w L_train)/dx`` at the step's views.
DARTS estimates it by a central finite difference of the input gradient between the weights
``w +- eps c`` (``eps = scale / |c|``, DARTS: scale 0.01); the trainer now computes it exactly by
double backward (``train/lookahead.py``). This script measures both, carried through AugMix
to ``dL_val/dmu``, over ``--draws`` AugMix draws of one batch of the embedded task, on a network
after ``--steps`` AdamW steps:
- ``tiny_resnet`` (ReLU + max-pool, the studies' network) and a smooth one of the same shape
  (SiLU + average pool), in fp32;
- the smooth one with the finite difference under bf16 autocast (what a bf16 run would compute).
Per finite-difference scale: its spread over the draws relative to the exact value's, their
correlation, how often their signs agree, and the range of their ratio.

    python benchmarks/severity_study_estimators.py   # -> results/severity_study_estimators.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402

from augmix_gpu.augment.augmix import AugMixBatch, normalize_images  # noqa: E402
from augmix_gpu.augment.losses import augmix_objective  # noqa: E402
from augmix_gpu.augment.severity import LearnableSeverity  # noqa: E402
from augmix_gpu.data.synthetic import render  # noqa: E402
from augmix_gpu.distributed import DistEnv  # noqa: E402
from augmix_gpu.models import TinyResNet  # noqa: E402
from augmix_gpu.train import lookahead as hs  # noqa: E402
from augmix_gpu.train.hyper_passes import HeldoutBatch  # noqa: E402
from augmix_gpu.train.step import AugmentedClassifier  # noqa: E402

SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # DARTS: 0.01
ENV = DistEnv(0, 0, 1, torch.device("cpu"), None)


def smooth_net(classes: int = 10) -> nn.Module:
    """tiny_resnet's shape without kinks: SiLU for ReLU, average pools for max-pools."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]

    layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(), *block(16, 16)]
    for cin, cout in ((16, 32), (32, 64), (64, 128)):
        layers += [nn.AvgPool2d(2), *block(cin, cout)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    images = [
        render(int(y), size, np.random.default_rng([seed, 9, i])) for i, y in enumerate(labels)
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels


def trained(
    model: nn.Module, steps: int, args
) -> tuple[AugmentedClassifier, torch.optim.Optimizer]:
    torch.manual_seed(0)
    sev = LearnableSeverity(3.0, objective="heldout")
    net = AugmentedClassifier(model, "learnable_augmix_jsd", AugMixBatch(severity=sev))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 1):  # the last step is the one the lookahead looks at
        x, y = batch(args.batch, args.size, seed=step)
        opt.zero_grad()
        loss = augmix_objective(net(x, g), y, jsd=True, beta_jsd=12.0).total
        loss.backward()
        opt.step()
    return net, opt


def finite_difference(net, c, eps, views, labels, amp: bool) -> torch.Tensor:
    """The DARTS estimator: [grad_x L(w + eps c) - grad_x L(w - eps c)] / (2 eps), the network
    under bf16 autocast when ``amp`` (BatchNorm on copies of its buffers)."""
    model, x = net.model, views.detach().requires_grad_(True)

    def input_grad(sign: float) -> torch.Tensor:
        state = {n: p.detach() + sign * eps * t for (n, p), t in zip(model.named_parameters(), c)}
        state.update({n: b.clone() for n, b in model.named_buffers()})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = functional_call(model, state, (x,))
        loss = augmix_objective(logits.float(), labels, jsd=True, beta_jsd=12.0).total
        return torch.autograd.grad(loss, x)[0]

    return (input_grad(1.0) - input_grad(-1.0)) / (2.0 * eps)


def draws(net, opt, args, amp: bool) -> dict[str, list[float]]:
    """dL_val/dmu per AugMix draw: exact, and the finite difference at each scale."""
    x, y = batch(args.batch, args.size, seed=args.steps)
    xh, yh = batch(args.batch, args.size, seed=10_000)
    named = list(net.model.named_parameters())
    params = [p for _, p in named]
    heldout = HeldoutBatch(normalize_images(xh), yh, torch.ones(len(yh), dtype=torch.bool))
    v, _ = hs.heldout_gradient(net, params, heldout, ENV)
    c = hs.lookahead_direction(opt, params, v)
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in c)))
    sev = [net.severity.log_severity_mu]
    out: dict[str, list[float]] = {"exact": [], **{f"fd {s:g}": [] for s in SCALES}}

    def to_mu(draw: int, estimate) -> float:
        """An estimate of dL/dx at the views of ``draw``, carried through AugMix to mu."""
        views = net.views(x, torch.Generator().manual_seed(draw), severity_grad=True)
        return float(torch.autograd.grad(views, sev, estimate(views))[0])

    for d in range(args.draws):
        out["exact"].append(to_mu(d, lambda v: hs.mixed_derivative(net, named, c, v, y, 12.0)))
        for s in SCALES:
            fd = lambda v, s=s: finite_difference(net, c, s / norm, v, y, amp)  # noqa: E731
            out[f"fd {s:g}"].append(to_mu(d, fd))
    return out


def agreement(values: dict[str, list[float]]) -> list[list[str]]:
    exact = np.array(values["exact"])
    rows = []
    for key, fd in values.items():
        if key == "exact":
            continue
        fd = np.array(fd)
        ratio = fd / exact
        rows.append([key.removeprefix("fd "), f"{fd.std() / exact.std():.2f}",
                     f"{np.corrcoef(fd, exact)[0, 1]:.2f}", f"{np.mean(np.sign(fd) == np.sign(exact)):.2f}",
                     f"{ratio.min():+.2f} .. {ratio.max():+.2f}"])  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=56)
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "severity_study_estimators.json")
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    cases = {"tiny_resnet (ReLU, max-pool), fp32": (TinyResNet, False),
             "smooth (SiLU, avg-pool), fp32": (smooth_net, False),
             "smooth (SiLU, avg-pool), finite difference in bf16": (smooth_net, True)}  # fmt: skip
    record, text = {}, []
    for name, (make, amp) in cases.items():
        net, opt = trained(make(), args.steps, args)
        values = draws(net, opt, args, amp)
        rows = agreement(values)
        record[name] = {"values": values, "rows": rows}
        table = markdown_table(
            ["fd scale", "spread / exact's", "correlation", "same sign", "ratio fd/exact"], rows
        )
        text.append(f"{name}:\n\n{table}")
        print(text[-1], flush=True)
    write_json(args.out, {"benchmark": "severity_study_estimators", "args": vars(args),
                          "environment": environment_info(), "cases": record, "table": "\n\n".join(text)})  # fmt: skip


if __name__ == "__main__":
    main()
