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

CIFAR (`--cifar`): the preset's step (configs/augmix_cifar.toml: WRN-40-2, batch 128, AugMix +
JSD) fed by each CIFAR loader, the device-resident one and DALI, from a CIFAR-sized split (50,000
random 32 px images: the loaders' cost does not depend on the pixels). Per loader: the loader
alone (img/s over whole epochs), the step (img/s, AugMix share), the epoch time that rate gives
(390 steps) and, with `--cifar_epoch` (default on CUDA), one real epoch timed end to end.

    python benchmarks/bench_train_step.py --cifar --loader_only --repeats 5   # the loaders alone
    python benchmarks/bench_train_step.py --cifar --steps 2 --repeats 2      # CPU: ~0.5 min a step
    python benchmarks/bench_train_step.py --cifar                             # on a GPU
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
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402

from augmix_gpu.data import ResidentLoader, build_loader, make_synthetic_dataset  # noqa: E402
from augmix_gpu.distributed import DistEnv  # noqa: E402
from augmix_gpu.models import build_model  # noqa: E402
from augmix_gpu.runtime import amp_dtype  # noqa: E402
from augmix_gpu.train.config import Settings, resolve_settings  # noqa: E402
from augmix_gpu.train.heldout_severity import HeldoutSeverityUpdater  # noqa: E402
from augmix_gpu.train.run import build_augmenter  # noqa: E402
from augmix_gpu.train.schedule import build_optimizer  # noqa: E402
from augmix_gpu.train.step import AugmentedClassifier, StepContext, StopFlag, TrainState, train_step  # noqa: E402

MODES = ("none", "augmix_jsd", "learnable_augmix_jsd", "learnable_heldout")
CIFAR_LOADERS = ("resident", "dali")


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
    p.add_argument("--cifar", action="store_true", help="the CIFAR rows instead (see above)")
    p.add_argument("--cifar_loaders", nargs="+", default=list(CIFAR_LOADERS), choices=CIFAR_LOADERS)
    p.add_argument("--cifar_epoch", action=argparse.BooleanOptionalAction, default=cuda,
                   help="also time one whole training epoch per loader")  # fmt: skip
    p.add_argument("--loader_only", action="store_true", help="CIFAR: the loaders alone")
    p.add_argument("--out", default=None, help="JSON (default results/train_step[_cifar].json)")
    args = p.parse_args()
    name = "train_step.json"
    if args.cifar:
        name = "train_step_cifar_loaders.json" if args.loader_only else "train_step_cifar.json"
    args.out = args.out or str(Path(__file__).resolve().parent / "results" / name)
    return args


def _forever(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_parts(model, config: Settings, args: argparse.Namespace, device: torch.device):
    """The network with its augmenter (channels_last), its optimizer and its loss scaler: what
    every benchmarked step is made of."""
    net = AugmentedClassifier(
        model.to(memory_format=torch.channels_last),
        config.augment.aug_type,
        build_augmenter(config.augment, config.severity),
        amp_dtype=amp_dtype(args.precision),
        channels_last=True,
    ).to(device)
    opt = build_optimizer(net, config.optim, args.batch, config.severity.severity_lr_mult)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16")
    return net, opt, scaler


def timed_steps(net, ctx, state, batches, args, device) -> tuple[list[float], list[float]]:
    """Warm-up, then ``repeats`` x ``steps`` train steps: (img/s, AugMix share) per repeat."""
    rates, shares = [], []
    for i in range(args.warmup + args.steps * args.repeats):
        if i >= args.warmup and (i - args.warmup) % args.steps == 0:
            net.time_augment, net.augment_seconds = True, 0.0
            _sync(device)
            start = time.perf_counter()
        images, labels, _ = next(batches)
        train_step(ctx, state, images, labels)
        state.global_step += 1
        if i >= args.warmup and (i - args.warmup) % args.steps == args.steps - 1:
            _sync(device)
            elapsed = time.perf_counter() - start
            rates.append(args.steps * args.batch / elapsed)
            shares.append(net.augment_seconds / elapsed)
    net.time_augment = False
    return rates, shares


def bench_mode(mode: str, args: argparse.Namespace, data: Path, device: torch.device) -> dict:
    env = DistEnv(0, 0, 1, device, None)
    heldout = mode == "learnable_heldout"
    config = resolve_settings(
        [*(["--severity_objective", "heldout"] if heldout else []), "--dataset", "imagenet",
         "--aug_type", "learnable_augmix_jsd" if heldout else mode, "--batch", str(args.batch),
         "--precision", args.precision, "--arch", args.arch, "--channels_last"]
    )  # fmt: skip
    loader = build_loader(
        data / "train",
        "train",
        batch_size=args.batch,
        device="gpu" if device.type == "cuda" else "cpu",
        crop_size=args.size,
        num_threads=args.threads,
    )
    net, opt, scaler = step_parts(build_model(args.arch, len(loader.classes)), config, args, device)
    gen = torch.Generator(device).manual_seed(0)
    updater, steps = None, args.steps
    if heldout:
        every = config.severity.severity_update_every
        held = build_loader(data / "val", "corrupted", classes=loader.classes, batch_size=args.batch,
                            device="gpu" if device.type == "cuda" else "cpu", crop_size=args.size,
                            num_threads=args.threads)  # fmt: skip
        updater = HeldoutSeverityUpdater(net, held, env, every=every, lr=0.05, beta_jsd=12.0)
        steps = -(-args.steps // every) * every  # whole update cycles per timed window
    ctx = StepContext(net, net, opt, scaler, config, env, gen, len(loader), StopFlag(), updater)
    timing = argparse.Namespace(**{**vars(args), "steps": steps})
    rates, shares = timed_steps(net, ctx, TrainState(), _forever(loader), timing, device)
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


CIFAR_TRAIN_SIZE = 50_000  # CIFAR-10/100 training images


def cifar_loader(kind: str, arrays, batch: int, device: torch.device, threads: int):
    if kind == "resident":
        return ResidentLoader(arrays, "train", batch_size=batch, device=device)
    dali_device = "gpu" if device.type == "cuda" else "cpu"
    return build_loader(arrays, "train", batch_size=batch, device=dali_device, num_threads=threads)


def bench_cifar(kind: str, args: argparse.Namespace, arrays, device: torch.device) -> dict:
    """The preset's training step fed by one CIFAR loader, and that loader alone."""
    loader = cifar_loader(kind, arrays, args.batch, device, args.threads)
    # The loader alone: whole epochs (the first one warms up), synchronised at the end; process
    # CPU time counts every thread (DALI's workers too): steadier than wall time on a busy host.
    epoch_rates, cpu_ms = [], []
    for epoch in range(1 + args.repeats):
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in loader.epoch(epoch):
            pass
        _sync(device)
        if epoch:
            epoch_rates.append(len(loader) * args.batch / (time.perf_counter() - start))
            cpu_ms.append(1000 * (time.process_time() - cpu) / len(loader))
    loader_row = {
        "loader": kind,
        "device": str(device),
        "batch": args.batch,
        "loader_images_per_s_median": statistics.median(epoch_rates),
        "loader_images_per_s_min": min(epoch_rates),
        "loader_images_per_s_max": max(epoch_rates),
        "loader_cpu_ms_per_batch_median": statistics.median(cpu_ms),
    }
    if args.loader_only:
        return loader_row
    env = DistEnv(0, 0, 1, device, None)
    config = resolve_settings(["--config", "augmix_cifar.toml", "--precision", args.precision])
    model = build_model(config.model.arch, len(arrays.classes))
    net, opt, scaler = step_parts(model, config, args, device)
    gen = torch.Generator(device).manual_seed(0)
    ctx = StepContext(net, net, opt, scaler, config, env, gen, len(loader), StopFlag())
    state = TrainState()
    rates, shares = timed_steps(net, ctx, state, _forever(loader), args, device)
    epoch_s = None
    if args.cifar_epoch:  # one real epoch, end to end, after the steps above warmed everything
        _sync(device)
        start = time.perf_counter()
        for images, labels, _ in loader.epoch(10_000):
            train_step(ctx, state, images, labels)
            state.global_step += 1
        _sync(device)
        epoch_s = time.perf_counter() - start
    step_rate = statistics.median(rates)
    return {
        **loader_row,
        "arch": config.model.arch,
        "precision": args.precision,
        "mode": config.augment.aug_type,
        "images_per_s_median": step_rate,
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "augmix_share_median": statistics.median(shares),
        "epoch_s_from_rate": len(loader) * args.batch / step_rate,
        "epoch_s_measured": epoch_s,
        "steps_per_epoch": len(loader),
        "repeats": len(rates),
    }


def main_cifar(args: argparse.Namespace, device: torch.device) -> None:
    from augmix_gpu.data import CifarArrays

    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch = 1, 1, 1, 8
    rng = np.random.default_rng(0)
    n = CIFAR_TRAIN_SIZE if not args.quick else 64
    arrays = CifarArrays(
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 100, n),
        [f"class{k}" for k in range(100)],
    )
    rows = []
    for kind in args.cifar_loaders:
        rows.append(bench_cifar(kind, args, arrays, device))
        r = rows[-1]
        line = (
            f"{kind:>9} {r['device']:>5}: loader {r['loader_images_per_s_median']:.0f} img/s, "
            f"{r['loader_cpu_ms_per_batch_median']:.2f} CPU ms/batch"
        )
        if not args.loader_only:
            line += (
                f"; step {r['images_per_s_median']:.1f} img/s, AugMix "
                f"{100 * r['augmix_share_median']:.1f}%, epoch {r['epoch_s_from_rate']:.0f} s"
            )
        print(line, flush=True)
    loader_table = markdown_table(
        ["loader", "device", "batch", "loader alone img/s (median)", "min-max", "CPU ms/batch"],
        [
            [r["loader"], r["device"], r["batch"], f"{r['loader_images_per_s_median']:.0f}",
             f"{r['loader_images_per_s_min']:.0f}-{r['loader_images_per_s_max']:.0f}",
             f"{r['loader_cpu_ms_per_batch_median']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    print(loader_table)
    results = {"benchmark": "train_step_cifar", "args": vars(args),
               "environment": environment_info(), "results": rows}  # fmt: skip
    if args.loader_only:
        write_json(args.out, results)
        return

    def minutes(r: dict) -> str:
        epoch = r["epoch_s_measured"] or r["epoch_s_from_rate"]
        return f"{100 * epoch / 60:.0f}"

    table = markdown_table(
        ["loader", "device", "arch", "batch", "precision", "step img/s (median)", "min-max",
         "AugMix share", "epoch s (from rate)", "epoch s (measured)", "100 epochs, min"],
        [
            [r["loader"], r["device"], r["arch"], r["batch"], r["precision"],
             f"{r['images_per_s_median']:.1f}", f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}",
             f"{100 * r['augmix_share_median']:.1f}%", f"{r['epoch_s_from_rate']:.0f}",
             f"{r['epoch_s_measured']:.0f}" if r["epoch_s_measured"] else "–", minutes(r)]
            for r in rows
        ],
    )  # fmt: skip
    print(table)
    write_json(args.out, results)


def main() -> None:
    args = parse()
    if args.quick and not args.cifar:
        args.steps, args.warmup, args.repeats, args.batch, args.size = 2, 1, 1, 4, 64
    if args.cifar and "--batch" not in sys.argv:
        args.batch = 128  # the preset's
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        devices = [torch.device("cuda")]  # the CPU figures come from a CPU machine
    if args.cifar:
        return main_cifar(args, devices[0])
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
