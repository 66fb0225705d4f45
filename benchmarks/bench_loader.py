"""Images/s of the train recipe: our DALI loader vs torchvision ImageFolder + DataLoader, same files.

Both do decode -> random-resized crop (area [0.08, 1], aspect [3/4, 4/3]) -> 224 px -> flip ->
uint8 CHW batches, at equal parallelism (DALI `num_threads` == DataLoader `num_workers`, one
pair per `--threads` value: DALI's worker threads sleep while its executor and the Python thread
schedule, so on a small CPU it gains from one thread more than cores, where extra DataLoader
processes do not; the sweep shows both at each count). The JPEGs are generated once per run at ImageNet-like sizes (~500x375, ~100 kB).
An "epoch" is one pass over them; the first of each loader is a warm-up (worker start, DALI
build); then `--repeats` epochs per loader, interleaved so both see the same machine load.
A third loader per count is DALI with the train resize's antialiasing off (`antialias=False`,
`--no_train_antialias`): torchvision's PIL crop always antialiases, so only the first pair is
like for like. GPU rows (DALI `mixed` decoder; DataLoader + `.cuda()`) are added when a GPU is
present.

    python benchmarks/bench_loader.py                      # --threads 2 3 --images 768 --batch 64
    python benchmarks/bench_loader.py --threads 8 --images 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, write_json  # noqa: E402

from augmix_gpu.data import build_loader  # noqa: E402

SIZES = (
    (500, 375),
    (375, 500),
    (500, 333),
    (480, 360),
    (500, 400),
    (333, 500),
)  # (W, H), ImageNet-like


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0) -> int:
    """`n` photo-like JPEGs (smooth structure + fine texture, quality 90); returns total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"class{i % classes}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        total += path.stat().st_size
    return total


def torchvision_loader(root: Path, batch: int, threads: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    return DataLoader(
        datasets.ImageFolder(str(root), transform=tf), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=threads, persistent_workers=threads > 0, prefetch_factor=2 if threads > 0 else None,
    )  # fmt: skip


def cpu_seconds() -> float:
    """CPU time of this process (all its threads: DALI's) plus its live children (DataLoader workers).

    Robust to other load on a shared machine, unlike wall time: the cost per image, whoever waits.
    """
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid; utime and stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def time_epoch(name: str, loader, epoch: int, device: torch.device) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and images of one pass; batches are touched on `device`."""
    n = 0
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    batches = loader.epoch(epoch) if name.startswith("dali") else loader
    for batch in batches:
        x = batch[0]
        if x.device != device:
            x = x.to(device, non_blocking=True)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 3],
        help="one pair of loaders per value: DALI num_threads = DataLoader num_workers",
    )
    p.add_argument("--images", type=int, default=768, help="JPEGs generated (one epoch)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per loader")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch_queue_depth")
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "loader.json")
    )
    args = p.parse_args()
    if min(args.threads) < 1:
        p.error(f"--threads: expected values >= 1, got {args.threads}")
    torch.set_num_threads(1)  # the main process only collects batches; workers do the work

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        nbytes = make_jpegs(root, args.images)
        print(f"{args.images} JPEGs, mean {nbytes / args.images / 1024:.0f} kB", flush=True)
        for device in devices:
            kind = "gpu" if device.type == "cuda" else "cpu"
            loaders = {}  # (name, threads) -> loader; every pair at equal threads
            for threads in args.threads:
                for antialias, suffix in ((True, ""), (False, "-no-antialias")):
                    loaders[(f"dali-{kind}{suffix}", threads)] = build_loader(
                        root, "train", batch_size=args.batch, device=kind, num_threads=threads,
                        prefetch=args.prefetch, crop_size=224, antialias=antialias,
                    )  # fmt: skip
                loaders[(f"torchvision-{kind}", threads)] = torchvision_loader(
                    root, args.batch, threads
                )
            rates: dict[tuple, list[float]] = {key: [] for key in loaders}
            cpu_ms: dict[tuple, list[float]] = {key: [] for key in loaders}
            for (name, _), loader in loaders.items():
                time_epoch(name, loader, 0, device)  # warm-up: workers, pipeline, page cache
            for rep in range(args.repeats):
                for (name, threads), loader in loaders.items():  # interleaved: same load for all
                    seconds, cpu, n = time_epoch(name, loader, rep + 1, device)
                    rates[(name, threads)].append(n / seconds)
                    cpu_ms[(name, threads)].append(1000 * cpu / n)
            for (name, threads), r in rates.items():
                ref = statistics.median(rates[(f"torchvision-{kind}", threads)])
                rows.append({
                    "loader": name, "device": kind, "threads": threads, "batch": args.batch,
                    "images_per_s_median": statistics.median(r), "images_per_s_min": min(r),
                    "images_per_s_max": max(r), "images_per_s_all": r,
                    "cpu_ms_per_image_median": statistics.median(cpu_ms[(name, threads)]),
                    "speedup_vs_torchvision": statistics.median(r) / ref,
                })  # fmt: skip
                print(
                    f"{name:>24} x{threads}: {statistics.median(r):7.1f} img/s "
                    f"({min(r):.1f}-{max(r):.1f}), {statistics.median(cpu_ms[(name, threads)]):.2f} "
                    "CPU ms/img",
                    flush=True,
                )
    rows.sort(key=lambda r: (r["device"], r["threads"], r["loader"]))
    table = markdown_table(
        ["loader", "device", "threads", "batch", "img/s (median)", "min-max", "x torchvision", "CPU ms/img"],
        [[r["loader"], r["device"], r["threads"], r["batch"], f"{r['images_per_s_median']:.1f}",
          f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}", f"{r['speedup_vs_torchvision']:.2f}",
          f"{r['cpu_ms_per_image_median']:.2f}"]
         for r in rows],
    )  # fmt: skip
    print(table)
    write_json(
        args.out,
        {
            "benchmark": "loader",
            "command": "python benchmarks/bench_loader.py " + " ".join(sys.argv[1:]),
            "args": vars(args),
            "environment": environment_info(),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
