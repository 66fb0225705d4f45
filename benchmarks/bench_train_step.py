"""Images/s of a full training step and the share of it spent in AugMix, per mode.

A step is: the DALI train recipe (decode + random-resized crop + flip), AugMix on the tensors,
forward/backward of the network on 1 or 3 views, the optimizer. Modes: none, augmix_jsd,
learnable_augmix_jsd (the severity trained through the views, ``minimize``) and
learnable_heldout (the held-out hypergradient every ``--severity_update_every`` steps, timed over
whole update cycles; the val images stand in for the held-out set, same size). The AugMix share
is measured inside the step (synchronised on CUDA); "vs augmix_jsd" is the time per step over
the fixed-severity JSD step's.

    python benchmarks/bench_train_step.py                       # CPU defaults: resnet18, 128 px
    python benchmarks/bench_train_step.py --arch resnet50 --size 224 --batch 128   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from augmix_gpu.runtime import prefer_passive_openmp, reuse_freed_memory

prefer_passive_openmp()  # before torch loads OpenMP (see augmix_gpu/runtime.py)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402

from augmix_gpu.config import resolve_config  # noqa: E402
from augmix_gpu.data import build_loader, make_synthetic_dataset  # noqa: E402
from augmix_gpu.distributed import DistEnv  # noqa: E402
from augmix_gpu.engine import (  # noqa: E402
    AMP_DTYPES,
    AugmentedClassifier,
    StepContext,
    StopFlag,
    TrainState,
    build_optimizer,
    train_step,
)
from augmix_gpu.hypergradient import HeldoutSeverityUpdater  # noqa: E402
from augmix_gpu.models import build_model  # noqa: E402
from augmix_gpu.training import build_augmenter  # noqa: E402

MODES = ("none", "augmix_jsd", "learnable_augmix_jsd", "learnable_heldout")


def parse() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="resnet50" if cuda else "resnet18")
    p.add_argument("--size", type=int, default=224 if cuda else 128, help="crop size (px)")
    p.add_argument("--batch", type=int, default=128 if cuda else 16)
    p.add_argument("--steps", type=int, default=20 if cuda else 4, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads = DALI threads")
    p.add_argument("--precision", default="bf16" if cuda else "32", choices=("32", "16", "bf16"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--quick", action="store_true", help="tiny run (CI smoke test)")
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json")
    )
    return p.parse_args()


def bench_mode(mode: str, args: argparse.Namespace, data: Path, device: torch.device) -> dict:
    env = DistEnv(0, 0, 1, device, None)
    heldout = mode == "learnable_heldout"
    config = resolve_config(
        [
            *(["--severity_objective", "heldout"] if heldout else []),
            "--dataset",
            "imagenet",
            "--aug_type",
            "learnable_augmix_jsd" if heldout else mode,
            "--batch",
            str(args.batch),
            "--precision",
            args.precision,
            "--arch",
            args.arch,
            "--channels_last",
        ]
    )
    loader = build_loader(
        data / "train",
        "train",
        batch_size=args.batch,
        device="gpu" if device.type == "cuda" else "cpu",
        crop_size=args.size,
        num_threads=args.threads,
    )
    model = build_model(args.arch, len(loader.classes))
    net = AugmentedClassifier(
        model,
        config["aug_type"],
        build_augmenter(config),
        amp_dtype=AMP_DTYPES[args.precision],
        channels_last=True,
    ).to(device)
    net.model.to(memory_format=torch.channels_last)
    opt = build_optimizer(net, config, args.batch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16")
    gen = torch.Generator(device).manual_seed(0)
    updater, steps = None, args.steps
    if heldout:
        every = config["severity_update_every"]
        held = build_loader(data / "val", "corrupted", classes=loader.classes, batch_size=args.batch,
                            device="gpu" if device.type == "cuda" else "cpu", crop_size=args.size,
                            num_threads=args.threads)  # fmt: skip
        updater = HeldoutSeverityUpdater(net, held, env, every=every, lr=0.05, beta_jsd=12.0)
        steps = -(-args.steps // every) * every  # whole update cycles per timed window
    ctx = StepContext(
        net, net, opt, scaler, config, env, gen, len(loader), StopFlag(), frozenset(), updater
    )
    state = TrainState()
    need = args.warmup + steps * args.repeats
    batches, epoch = [], 0
    rates, shares = [], []

    def next_batch():
        nonlocal batches, epoch
        if not batches:
            batches = iter(loader.epoch(epoch))
            epoch += 1
        try:
            return next(batches)
        except StopIteration:
            batches = []
            return next_batch()

    for i in range(need):
        if i >= args.warmup and (i - args.warmup) % steps == 0:
            net.time_augment, net.augment_seconds = True, 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, labels, _ = next_batch()
        train_step(ctx, state, images, labels)
        state.global_step += 1
        if i >= args.warmup and (i - args.warmup) % steps == steps - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            rates.append(steps * args.batch / elapsed)
            shares.append(net.augment_seconds / elapsed)
    return {
        "mode": mode,
        "device": str(device),
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "images_per_s_median": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "augmix_share_median": statistics.median(shares),
        "repeats": len(rates),
    }


def main() -> None:
    args = parse()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch, args.size = 2, 1, 1, 4, 64
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        devices = [torch.device("cuda")]  # the CPU figures come from a CPU machine
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(4, (args.batch * (args.warmup + args.steps * args.repeats)) // 10 // 2)
        data = make_synthetic_dataset(
            Path(tmp) / "data",
            num_classes=10,
            train_per_class=per_class,
            val_per_class=max(2, args.batch // 10 + 1),
            size=max(args.size + args.size // 7, 64),
            progress=False,
        )
        for device in devices:
            for mode in args.modes:
                rows.append(bench_mode(mode, args, data, device))
                r = rows[-1]
                print(
                    f"{mode:>22} {r['device']:>5}: {r['images_per_s_median']:.1f} img/s, "
                    f"AugMix {100 * r['augmix_share_median']:.1f}% of the step",
                    flush=True,
                )
    jsd = {r["device"]: r["images_per_s_median"] for r in rows if r["mode"] == "augmix_jsd"}
    for r in rows:  # time per step relative to the fixed-severity JSD step's
        r["vs_augmix_jsd"] = (
            jsd[r["device"]] / r["images_per_s_median"] if r["device"] in jsd else None
        )
    table = markdown_table(
        [
            "mode",
            "device",
            "arch",
            "px",
            "batch",
            "img/s (median)",
            "min-max",
            "AugMix share",
            "vs augmix_jsd",
        ],  # fmt: skip
        [
            [
                r["mode"],
                r["device"],
                r["arch"],
                r["size"],
                r["batch"],
                f"{r['images_per_s_median']:.1f}",
                f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}",
                f"{100 * r['augmix_share_median']:.1f}%",
                "–" if r["vs_augmix_jsd"] is None else f"{r['vs_augmix_jsd']:.2f}×",
            ]
            for r in rows
        ],
    )
    print(table)
    write_json(
        args.out,
        {
            "benchmark": "train_step",
            "args": vars(args),
            "environment": environment_info(),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
