"""`make gpu-check`: the GPU path in one command (about 10 minutes on one GPU).

1. `pytest -m cuda`: the mixed decoder against the CPU decoder on every recipe, AugMix on CUDA
   against the CPU with the same draws, AMP (bf16/fp16) and channels_last with the learnable
   severity, host reads per step, NCCL with 2 ranks where 2 GPUs exist.
2. The GPU rows of the three benchmarks (AugMix, loader, training step; the CIFAR step and epoch
   per CIFAR loader), each writing its JSON.
3. A 200-step ResNet-50 `learnable_augmix_jsd` run at 224 px (bf16, channels_last) from generated
   224-px JPEGs through DALI's mixed decoder: images/s, AugMix's share of the step, the share of
   the step spent waiting for data, host syncs per step (`torch.cuda.set_sync_debug_mode`), peak
   GPU memory.
4. A -C evaluation of that model through the mixed decoder: images/s.

Writes `benchmarks/results/gpu_check.json`, prints one table, exits non-zero if any part failed.
On a machine without CUDA it prints one line and exits 0 (CI does not run it).

    python benchmarks/gpu_check.py [--steps 200] [--batch 128] [--skip tests benchmarks]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import RESULTS_DIR, environment_info, markdown_table, write_json  # noqa: E402

PARTS = ("tests", "benchmarks", "run", "c_eval")


def _subprocess(name: str, cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return {
        "part": name,
        "ok": proc.returncode == 0,
        "seconds": time.perf_counter() - start,
        "command": " ".join(cmd),
        "tail": (proc.stdout + proc.stderr)[-3000:],
    }


def run_tests() -> list[dict]:
    return [
        _subprocess(
            "pytest -m cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs"], 600
        )
    ]


def run_benchmarks(batch: int) -> list[dict]:
    py = sys.executable
    return [
        _subprocess(
            "bench_augment (GPU row d)",
            [
                py,
                str(HERE / "bench_augment.py"),
                "--rows",
                "b,c,d",
                "--batch",
                str(batch),
                "--images",
                str(4 * batch),
                "--repeats",
                "3",
                "--out",
                "gpu_check_augment.json",
            ],
            600,
        ),  # fmt: skip
        _subprocess(
            "bench_loader (GPU rows)",
            [
                py,
                str(HERE / "bench_loader.py"),
                "--sections",
                "throughput",
                "upsampling",
                "--threads",
                "4",
                "--repeats",
                "3",
                "--out",
                str(RESULTS_DIR / "gpu_check_loader.json"),
            ],
            600,
        ),  # fmt: skip
        _subprocess(
            "bench_train_step (ResNet-50, 224 px, bf16)",
            [
                py,
                str(HERE / "bench_train_step.py"),
                "--out",
                str(RESULTS_DIR / "gpu_check_train_step.json"),
            ],
            900,
        ),  # fmt: skip
        _subprocess(
            "bench_train_step --cifar (WRN-40-2, batch 128, JSD, fp32; one epoch per loader)",
            [
                py,
                str(HERE / "bench_train_step.py"),
                "--cifar",
                "--cifar_epoch",
                "--out",
                str(RESULTS_DIR / "gpu_check_train_step_cifar.json"),
            ],
            600,
        ),  # fmt: skip
    ]


def _count_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn`` (set_sync_debug_mode warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def training_run(args, tmp: Path) -> tuple[dict, object, object, Path]:
    """The 200-step run, measured in phases: throughput and data wait, AugMix share, syncs."""
    from augmix_gpu.data import build_loader, make_synthetic_dataset
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.models import build_model
    from augmix_gpu.runtime import amp_dtype
    from augmix_gpu.train.config import resolve_settings
    from augmix_gpu.train.run import build_augmenter
    from augmix_gpu.train.schedule import build_optimizer
    from augmix_gpu.train.step import (
        AugmentedClassifier,
        StepContext,
        StopFlag,
        TrainState,
        train_step,
    )

    data = make_synthetic_dataset(tmp / "syn224", num_classes=10, train_per_class=args.per_class,
                                  val_per_class=100, size=224, seed=0, progress=False)  # fmt: skip
    device = torch.device("cuda")
    env = DistEnv(0, 0, 1, device, None)
    config = resolve_settings(["--data", str(data), "--precision", "bf16", "--channels_last",
                             "--batch", str(args.batch), "--aug_type", "learnable_augmix_jsd",
                             "--optimizer", "sgd", "--lr", "0.1"])  # fmt: skip
    torch.backends.cudnn.benchmark = True
    loader = build_loader(data / "train", "train", batch_size=args.batch, device="gpu",
                          num_threads=args.threads, seed=0)  # fmt: skip
    net = AugmentedClassifier(build_model("resnet50", len(loader.classes)), config.augment.aug_type,
                              build_augmenter(config.augment, config.severity), amp_dtype=amp_dtype("bf16"),
                              channels_last=True).to(device)  # fmt: skip
    net.model.to(memory_format=torch.channels_last)
    opt = build_optimizer(net, config.optim, args.batch, config.severity.severity_lr_mult)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ctx = StepContext(net, net, opt, scaler, config, env, torch.Generator(device).manual_seed(0),
                      len(loader), StopFlag())  # fmt: skip
    state = TrainState()

    def batches():
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    it = batches()
    torch.cuda.reset_peak_memory_stats()

    def steps(n: int, time_augment: bool = False) -> tuple[float, float, float]:
        net.time_augment, net.augment_seconds = time_augment, 0.0
        torch.cuda.synchronize()
        wait, start = 0.0, time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            images, labels, _ = next(it)
            wait += time.perf_counter() - t0
            train_step(ctx, state, images, labels)
            state.global_step += 1
        torch.cuda.synchronize()
        return time.perf_counter() - start, wait, net.augment_seconds

    warm = 20
    steps(warm)  # cuDNN autotuning, DALI warm-up, allocator
    timed = args.steps - warm - 20 - 10
    seconds, wait, _ = steps(timed)
    aug_seconds_total, _, aug_seconds = steps(20, time_augment=True)
    syncs = _count_syncs(lambda: steps(10))  # includes one --log_every read (every 10 steps)
    out = {
        "steps": args.steps,
        "batch": args.batch,
        "images_per_s": timed * args.batch / seconds,
        "augmix_share": aug_seconds / aug_seconds_total,
        "data_wait_share": wait / seconds,
        "host_syncs_per_step": syncs / 10,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "augmix_strategy": net.augmenter.strategy_for(device),
    }
    return out, net, loader.classes, data


def c_evaluation(net, classes, data: Path, tmp: Path, args) -> dict:
    from augmix_gpu.data import make_corrupted_dataset
    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.eval.run import evaluate_model
    from augmix_gpu.eval.settings import DataSettings, EvalSettings, RunSettings

    c_root = make_corrupted_dataset(data / "val", tmp / "c", severities=(3,),
                                    workers=os.cpu_count() or 4, progress=False)  # fmt: skip
    env = DistEnv(0, 0, 1, torch.device("cuda"), None)
    net.model.eval()
    start = time.perf_counter()
    settings = EvalSettings(
        data=DataSettings(val=data / "val", severities=[3], crop_size=224, resize_size=256),
        run=RunSettings(batch=256, device="cuda", workers=args.threads, precision="bf16",
                        channels_last=True, no_progress=True),
        roots={"imagenet_c": c_root},
    )  # fmt: skip
    res = evaluate_model(net.model, env, classes=classes, settings=settings)
    seconds = time.perf_counter() - start
    images = 16 * res["clean"]["n"]  # the val images, clean and under 15 corruptions
    return {"images_per_s": images / seconds, "seconds": seconds,
            "mean_corruption_error": res.get("imagenet_c", {}).get("mean_corruption_error")}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128, help="images per step (one GPU)")
    p.add_argument("--threads", type=int, default=8, help="DALI CPU threads")
    p.add_argument("--per_class", type=int, default=300, help="generated 224-px JPEGs per class")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--out", default=str(RESULTS_DIR / "gpu_check.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "nothing to check here, run `make gpu-check` on a GPU machine")  # fmt: skip
        return 0
    parts: list[dict] = []
    if "tests" not in args.skip:
        parts += run_tests()
    if "benchmarks" not in args.skip:
        parts += run_benchmarks(args.batch)
    run, c_eval = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in (("run", training_run), ("c_eval", c_evaluation)):
            if name in args.skip or (name == "c_eval" and not run):
                continue
            start = time.perf_counter()
            try:
                if name == "run":
                    run, net, classes, data = fn(args, tmp)
                else:
                    c_eval = fn(net, classes, data, tmp, args)
                parts.append({"part": name, "ok": True, "seconds": time.perf_counter() - start})
            except Exception:  # recorded and reported: the check goes on with the next part
                parts.append({"part": name, "ok": False, "seconds": time.perf_counter() - start,
                              "tail": traceback.format_exc()[-3000:]})  # fmt: skip
    gpu = torch.cuda.get_device_name(0)
    rows = [[x["part"], "ok" if x["ok"] else "FAILED", f"{x['seconds']:.0f}"] for x in parts]
    print(markdown_table(["part", "result", "s"], rows))
    if run:
        figures = [
            ["training images/s (ResNet-50, 224 px, bf16, JSD: 3 views)", f"{run['images_per_s']:.0f}"],
            ["AugMix share of the step", f"{100 * run['augmix_share']:.1f} %"],
            ["data wait share of the step", f"{100 * run['data_wait_share']:.1f} %"],
            ["host syncs per step (10 steps, one log read)", f"{run['host_syncs_per_step']:.1f}"],
            ["peak GPU memory", f"{run['peak_gpu_memory_gib']:.1f} GiB"],
        ]  # fmt: skip
        if c_eval:
            figures.append(
                ["-C evaluation images/s (mixed decoder)", f"{c_eval['images_per_s']:.0f}"]
            )
        print(f"\n{gpu}, batch {args.batch}:")
        print(markdown_table(["figure", "value"], figures))
    for x in parts:
        if not x["ok"]:
            print(f"\n--- {x['part']} failed:\n{x.get('tail', '')}")
    write_json(args.out, {"benchmark": "gpu_check", "gpu": gpu, "args": vars(args),
                          "environment": environment_info(), "parts": parts, "run": run,
                          "c_eval": c_eval})  # fmt: skip
    return 0 if all(x["ok"] for x in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
