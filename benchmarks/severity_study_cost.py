"""What the held-out objective's update costs, in CPU seconds of one thread (a figure that does not
depend on what else the machine runs, unlike bench_train_step.py's images per second).

Timed, minimum over ``--repeats`` after a warm-up: a fixed-severity AugMix + JSD training step
(views drawn without a gradient to s, forward/backward on [clean; view1; view2], AdamW), and a
step that ends with a severity update (views drawn with that gradient, the same step, then
``severity_hypergradient``: the held-out gradient, the mixed derivative, the backward through
AugMix). Also its parts, and two other ways to the mixed derivative (double backward, and the
DARTS finite difference the trainer used before). From these, the cost of a run's steps at an
update interval N: ((N - 1) step + update step) / (N step).

    python benchmarks/severity_study_cost.py   # -> results/severity_study_cost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import write_table  # noqa: E402
from severity_study_estimators import finite_difference  # noqa: E402

from augmix_gpu.augment.augmix import AugMixBatch, normalize_images  # noqa: E402
from augmix_gpu.augment.losses import augmix_objective  # noqa: E402
from augmix_gpu.augment.severity import LearnableSeverity  # noqa: E402
from augmix_gpu.distributed import DistEnv  # noqa: E402
from augmix_gpu.models import TinyResNet  # noqa: E402
from augmix_gpu.train import lookahead as hs  # noqa: E402
from augmix_gpu.train.hyper_passes import HeldoutBatch  # noqa: E402
from augmix_gpu.train.step import AugmentedClassifier  # noqa: E402

ENV = DistEnv(0, 0, 1, torch.device("cpu"), None)
CASES = {  # name -> (network, crop px, batch): bench_train_step's CPU default, the studies' run
    "resnet18, 128 px, batch 16": (lambda: torchvision.models.resnet18(num_classes=10), 128, 16),
    "tiny_resnet, 56 px, batch 64": (lambda: TinyResNet(10), 56, 64),
}
INTERVALS = (5, 10, 20)


def cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def measure(make, size: int, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    sev = LearnableSeverity(3.0, objective="heldout")
    net = AugmentedClassifier(make(), "learnable_augmix_jsd", AugMixBatch(severity=sev))
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.arange(batch) % 10
    held = normalize_images(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8))
    heldout = HeldoutBatch(held, y, torch.ones(batch, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)

    def step(views: torch.Tensor) -> None:
        opt.zero_grad()
        augmix_objective(net.classify(views.detach()), y, jsd=True, beta_jsd=12.0).total.backward()
        opt.step()

    def update_step() -> None:
        views = net.views(x, g, severity_grad=True)
        step(views)
        hs.severity_hypergradient(net, opt, views, y, heldout, ENV, beta_jsd=12.0)

    named = list(net.model.named_parameters())
    params = [p for _, p in named]
    update_step()  # gradients and Adam state in place for the parts below
    v, _ = hs.heldout_gradient(net, params, heldout, ENV)
    c = hs.lookahead_direction(opt, params, v)
    views = net.views(x, g).detach()
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in c)))
    return {
        "step": cpu_seconds(lambda: step(net.views(x, g)), repeats),
        "update step": cpu_seconds(update_step, repeats),
        "held-out gradient": cpu_seconds(
            lambda: hs.heldout_gradient(net, params, heldout, ENV), repeats
        ),
        "mixed derivative (forward over reverse)": cpu_seconds(
            lambda: hs.mixed_derivative(net, named, c, views, y, 12.0), repeats
        ),
        "mixed derivative (double backward)": cpu_seconds(
            lambda: _double_backward(net, params, c, views, y), repeats
        ),
        "DARTS finite difference": cpu_seconds(
            lambda: finite_difference(net, c, 0.01 / norm, views, y, amp=False), repeats
        ),
    }


def _double_backward(net, params, c, views, y) -> torch.Tensor:
    """The same mixed derivative twice in reverse mode (what the trainer's first exact form did)."""
    x = views.detach().requires_grad_(True)
    buffers = {n: b.clone() for n, b in net.model.named_buffers()}
    logits = torch.func.functional_call(net.model, buffers, (x,))
    loss = augmix_objective(logits, y, jsd=True, beta_jsd=12.0).total
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(sum((gr * t).sum() for gr, t in zip(grads, c)), x)[0]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "severity_study_cost.json")
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    record, rows = {}, []
    for name, (make, size, batch) in CASES.items():
        t = measure(make, size, batch, args.repeats)
        ratios = {n: ((n - 1) * t["step"] + t["update step"]) / (n * t["step"]) for n in INTERVALS}
        record[name] = {"cpu_seconds": t, "steps": {k: v / t["step"] for k, v in t.items()},
                        "run cost at interval": ratios}  # fmt: skip
        rows.append([name, f"{t['step']:.2f}", f"{t['update step'] / t['step']:.2f}",
                     *(f"{t[k] / t['step']:.2f}" for k in list(t)[2:]),
                     *(f"{ratios[n]:.2f}×" for n in INTERVALS)])  # fmt: skip
        print(rows[-1], flush=True)
    headers = ["network", "step (CPU s)", "update step (steps)", "held-out gradient",
               "mixed: fwd over rev", "mixed: double backward", "DARTS fd",
               *(f"run cost, every {n}" for n in INTERVALS)]  # fmt: skip
    write_table(args.out, "severity_study_cost", args, headers, rows, cases=record)


if __name__ == "__main__":
    main()
