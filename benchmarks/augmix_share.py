"""AugMix's measured share of a ResNet-50 JSD training step on one GPU, beside the byte model's.

    python benchmarks/augmix_share.py            # B 128 per GPU, 224 px, bf16, channels_last
    python benchmarks/augmix_share.py --quick    # fewer repeats: < 60 s on one H100

CUDA only: without a CUDA device it prints one line and exits 0; any failure exits 1 (the GPU
check runs it as a stage). In one run, each timed with CUDA events after a warm-up (median of
the repeats): every AugMixBatch form (``fused``, ``static``, ``grouped``) making the network's
input as the trainer asks for it (``network_input``, bf16, channels_last; fixed severity 3, and
``LearnableSeverity`` forward + backward), torchvision v2's AugMix on the same uint8 batch (clean
+ 2 views, normalised, bf16), and a ResNet-50 JSD step (autocast bf16, channels_last, SGD) on a
prepared ``[3B, 3, H, W]`` input. AugMix's share of the step is ``t_aug / (t_aug + t_step)``;
the prediction beside it is ``benchmarks/count_bytes.py``'s (``results/bytes.json``, priced for
an H100 SXM) for the same row. JSON: ``benchmarks/results/augmix_share.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment_info, markdown_table, photo_like, write_json  # noqa: E402

FORMS = ("fused", "static", "grouped")


def cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call, CUDA events around each call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def augmix_call(form: str, x: torch.Tensor, learnable: bool) -> Callable[[], object]:
    """One trainer-style call of a form: the network's input, and the backward if learnable."""
    from augmix_gpu.augment.augmix import AugMixBatch
    from augmix_gpu.augment.severity import LearnableSeverity

    sev = LearnableSeverity(initial_aug_severity=3.0) if learnable else 3.0
    aug = AugMixBatch(severity=sev, strategy=form).to(x.device)
    kw = {"dtype": torch.bfloat16, "channels_last": True}
    grad = torch.ones_like(aug.network_input(x, **kw))

    def run() -> None:
        out = aug.network_input(x, **kw)
        if learnable:
            out.backward(grad)

    return run


def torchvision_call(x: torch.Tensor) -> Callable[[], object]:
    """bench_augment's row b on the GPU: one op chain shared by the batch, per view."""
    from torchvision.transforms import v2

    from augmix_gpu.augment.augmix import normalize_images

    tv2 = v2.AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1.0)
    return lambda: torch.cat([normalize_images(v) for v in (x, tv2(x), tv2(x))]).bfloat16()


def network_step(batch: int, size: int, device: torch.device) -> Callable[[], object]:
    """A ResNet-50 JSD step on a prepared input: autocast bf16, channels_last, SGD."""
    from torchvision.models import resnet50

    from augmix_gpu.augment.losses import augmix_objective

    model = resnet50().to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inp = torch.randn(3 * batch, 3, size, size, device=device).to(
        torch.bfloat16, memory_format=torch.channels_last
    )
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inp)
        augmix_objective(logits.float(), labels, jsd=True).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def predictions() -> dict[tuple[str, str], float]:
    """The byte model's MLPerf-anchored shares from results/bytes.json, by (form, call)."""
    path = RESULTS_DIR / "bytes.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(r["form"], r["mode"]): r["share_mlperf"] for r in rows}


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    x = torch.stack([torch.from_numpy(photo_like(args.size, s)).permute(2, 0, 1) for s in range(8)])
    x = x.repeat(args.batch // 8 + 1, 1, 1, 1)[: args.batch].contiguous().to(device)
    step_ms = statistics.median(
        cuda_ms(network_step(args.batch, args.size, device), args.warmup, args.repeats)
    )
    calls = [("torchvision v2 AugMix", "forward", torchvision_call(x))]
    for form in FORMS:
        calls.append((form, "network input", augmix_call(form, x, learnable=False)))
        calls.append((form, "learnable fwd+bwd", augmix_call(form, x, learnable=True)))
    predicted = predictions()
    rows = []
    for form, mode, fn in calls:
        times = cuda_ms(fn, args.warmup, args.repeats)
        ms = statistics.median(times)
        rows.append({"form": form, "mode": mode, "augmix_ms": ms, "min_ms": min(times),
                     "max_ms": max(times), "step_ms": step_ms, "share": ms / (ms + step_ms),
                     "predicted_share_mlperf": predicted.get((form, mode))})  # fmt: skip
        print(f"{form}, {mode}: {ms:.2f} ms (step {step_ms:.1f} ms)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    headers = ["form", "call", "AugMix ms", "step ms", "measured share", "predicted (bytes model)"]
    body = [
        [r["form"], r["mode"], f"{r['augmix_ms']:.2f}", f"{r['step_ms']:.1f}",
         f"{100 * r['share']:.1f} %",
         "—" if r["predicted_share_mlperf"] is None else f"{100 * r['predicted_share_mlperf']:.1f} %"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="source images per GPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 warm-up calls, 5 repeats")
    parser.add_argument("--out", default="augmix_share.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 2, 5
    if not torch.cuda.is_available():
        print("augmix_share: no CUDA device here: nothing to time (run it on a GPU machine)")
        return 0
    try:
        rows = measure(args)
    except Exception as err:  # the GPU check reads the exit code
        print(f"augmix_share: failed: {type(err).__name__}: {err}")
        return 1
    print()
    print(table(rows))
    path = write_json(args.out, {
        "benchmark": "augmix_share", "command": "python benchmarks/augmix_share.py "
        + " ".join(argv if argv is not None else sys.argv[1:]), "args": vars(args),
        "rows": rows, "environment": environment_info(),
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
