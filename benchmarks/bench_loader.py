"""The loader, side by side with its peers, in four sections (`--sections`, all by default):

`throughput`: images/s of the train recipe, our DALI loader vs torchvision ImageFolder +
DataLoader, same files. Both do decode -> random-resized crop (area [0.08, 1], aspect [3/4, 4/3])
-> 224 px -> flip -> uint8 CHW batches, at equal parallelism (DALI `num_threads` == DataLoader
`num_workers`, one pair per `--threads` value: DALI's worker threads sleep while its executor and
the Python thread schedule, so on a small CPU it gains from one thread more than cores, where
extra DataLoader processes do not; the sweep shows both at each count). The JPEGs are generated
once per run at ImageNet-like sizes (~500x375, ~100 kB). An "epoch" is one pass over them; the
first of each loader is a warm-up (worker start, DALI build); then `--repeats` epochs per loader,
interleaved so both see the same machine load. A third loader per count is DALI with the train
resize's antialiasing off (`antialias=False`, `--no_train_antialias`): torchvision's PIL crop
always antialiases, so only the first pair is like for like. GPU rows (DALI `mixed` decoder;
DataLoader + `.cuda()`) are added when a GPU is present.

`startup`: seconds until the train loader of one rank is ready, on a generated tree of
`--startup_files` files (hard links to a few JPEGs, in ImageNet's 1,281 files per class), against
the previous startup (the same listing plus a 12-byte header read and a size check per file),
interleaved, extrapolated linearly to ImageNet's 1.28M training files and ImageNet-C's 3.75M.

`overlap`: whether the training thread waits on files. The loader alone, then the loader feeding
a consumer of fixed cost per batch (a sleep: a GPU step leaves the Python thread idle the same
way), with reads inline on the training thread (1 reader thread, no read-ahead: the previous
behaviour) and on our reader threads (`--read_threads`, 2 batches ahead), on the page cache and
on a simulated network filesystem (`--latency_ms` per file, a sleep in the read). Reported: img/s
and, after the first `--warmup_batches` of each epoch, the consumer's wait per batch and the part
of it spent waiting on file reads.

`upsampling`: how far nvJPEG's default chroma upsampling is from libjpeg-turbo's (the CPU path,
PIL): the mixed decoder's `jpeg_fancy_upsampling` off vs on. On a GPU both are decoded; on the
CPU the non-fancy decode is emulated exactly: the native chroma samples (libjpeg's 1/2-scale
decode leaves 4:2:0 chroma unscaled) replicated 2x2 (libjpeg's non-fancy path, nvJPEG's default),
converted to RGB like the fancy ones (checked against DALI's own output). Differences at decode
size and after the val recipe (resize 256, centre crop 224).

    python benchmarks/bench_loader.py                      # all sections
    python benchmarks/bench_loader.py --sections startup overlap --startup_files 200000
    python benchmarks/bench_loader.py --sections throughput --threads 8 --images 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, photo_like, write_json  # noqa: E402

from augmix_gpu.data import build_loader  # noqa: E402
from augmix_gpu.data.folders import list_images  # noqa: E402
from augmix_gpu.data.reading import read_bytes  # noqa: E402

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


def throughput_section(args, root: Path) -> tuple[list[dict], str]:
    """DALI (with and without train antialiasing) vs torchvision at equal threads, interleaved."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
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
    return rows, table


# --- startup ---------------------------------------------------------------------------------

IMAGENET_TRAIN_FILES = 1_281_167
IMAGENET_C_FILES = 3_750_000  # 15 corruptions x 5 severities x 50,000
PER_CLASS = 1281  # ImageNet's training files per class (most classes)


def make_link_tree(root: Path, sources: list[Path], files: int) -> int:
    """`files` names in ImageNet's layout, hard links to a copy of one source per class (ext4
    allows 65,000 links per inode). Returns the number of files made."""
    made, c = 0, 0
    while made < files:
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        source = root.parent / f"source{c}.JPEG"
        shutil.copyfile(sources[c % len(sources)], source)
        for i in range(min(PER_CLASS, files - made)):
            os.link(source, d / f"n{c:08d}_{i}.JPEG")
        made += min(PER_CLASS, files - made)
        c += 1
    return made


def previous_startup(root: Path) -> int:
    """What startup did before: the same listing, plus a size check and a 12-byte magic read per
    file (the removed `folders._header_ok`), every rank, before the first step."""
    paths, _ = list_images(root)
    for path in paths:
        if os.path.getsize(path) == 0:
            raise RuntimeError(path)
        with open(path, "rb") as f:
            if f.read(12)[:3] != b"\xff\xd8\xff":
                raise RuntimeError(path)
    return len(paths)


def startup_section(args, tmp: Path, sources: list[Path]) -> tuple[list[dict], str]:
    """Loader ready (listing + sharding) vs the previous header-reading startup, interleaved."""
    root = tmp / "startup" / "train"
    t0 = time.perf_counter()
    n = make_link_tree(root, sources, args.startup_files)
    print(f"startup tree: {n} files in {time.perf_counter() - t0:.0f} s", flush=True)

    def ours() -> int:
        loader = build_loader(
            root, "train", batch_size=args.batch, device="cpu", rank=0, world_size=8
        )
        return loader._n

    peers = {"ours: list names, size at batch time": ours, "previous: + header read per file": (
        lambda: previous_startup(root))}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in peers}
    for fn in peers.values():
        fn()  # warm-up: the directory entries in the kernel's cache, as on a warm disk
    for _ in range(args.repeats):
        for name, fn in peers.items():
            t0 = time.perf_counter()
            assert fn() == n
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({
            "startup": name, "files": n, "seconds_median": med, "seconds_all": t,
            "us_per_file": 1e6 * med / n,
            "extrapolated_imagenet_train_s": med * IMAGENET_TRAIN_FILES / n,
            "extrapolated_imagenet_c_s": med * IMAGENET_C_FILES / n,
        })  # fmt: skip
        print(f"{name:>40}: {med:.2f} s for {n} files ({1e6 * med / n:.2f} us/file)", flush=True)
    ref = rows[1]["seconds_median"]
    table = markdown_table(
        ["startup of one rank", "files", "s (median)", "min-max", "us/file", "1.28M train (s)",
         "3.75M ImageNet-C (s)", "x previous"],
        [[r["startup"], r["files"], f"{r['seconds_median']:.2f}",
          f"{min(r['seconds_all']):.2f}-{max(r['seconds_all']):.2f}", f"{r['us_per_file']:.2f}",
          f"{r['extrapolated_imagenet_train_s']:.1f}", f"{r['extrapolated_imagenet_c_s']:.1f}",
          f"{ref / r['seconds_median']:.1f}"] for r in rows],
    )  # fmt: skip
    shutil.rmtree(root.parent)
    return rows, table


# --- overlap -----------------------------------------------------------------------------------


def slow_read(latency_s: float):
    """A file read that first waits `latency_s` (a network filesystem's round trip; the GIL is
    released, as in a real read)."""

    def read(path: str) -> np.ndarray:
        time.sleep(latency_s)
        return read_bytes(path)

    return read


def run_epoch(loader, epoch: int, consumer_s: float, warmup: int) -> dict[str, float]:
    """One epoch; with `consumer_s` > 0 each batch is followed by that much idle "GPU" time.
    Returns img/s and, past the first `warmup` batches, the consumer's wait per batch and the
    part of it the loader spent waiting on file reads."""
    waits, n = [], 0
    t0 = time.perf_counter()
    it = iter(loader.epoch(epoch))
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        waits.append(time.perf_counter() - t)
        if batch is None:
            break
        n += batch[0].shape[0]
        if consumer_s:
            time.sleep(consumer_s)
    seconds = time.perf_counter() - t0
    # The callback reading batch k runs inside the `next()` that returns batch k - (prefetch - 1)
    # (the first call runs the first `prefetch`): align both windows on those calls.
    reads = loader.read_waits[warmup + loader._opts["prefetch"] - 1 :]
    return {
        "images_per_s": n / seconds,
        "wait_ms_per_batch": 1000 * statistics.mean(waits[warmup:-1]),
        "read_wait_ms_per_batch": 1000 * sum(reads) / max(len(waits) - 1 - warmup, 1),
    }


def overlap_section(args, root: Path) -> tuple[list[dict], str]:
    """Inline reads vs reader threads, page cache vs a slow filesystem, alone and with a consumer."""
    modes = {"inline (previous)": (1, 0), f"{args.read_threads} reader threads (ours)": (
        args.read_threads, 2)}  # fmt: skip
    storages = {"page cache": 0.0, f"+{args.latency_ms:g} ms/file": args.latency_ms / 1000}
    loaders = {}
    for storage, latency in storages.items():
        for mode, (threads, ahead) in modes.items():
            loader = build_loader(
                root, "train", batch_size=args.batch, device="cpu", num_threads=max(args.threads),
                prefetch=args.prefetch, read_threads=threads, read_ahead=ahead,
            )  # fmt: skip
            loader._read = slow_read(latency)  # the loader's one read function
            loaders[(storage, mode)] = loader
    for loader in loaders.values():
        run_epoch(loader, 0, 0.0, args.warmup_batches)  # warm-up: DALI, page cache
    # The consumer's cost: 1.25x a batch of our loader alone on the page cache, so that a
    # loader that keeps up never makes it wait.
    ours_local = loaders[("page cache", list(modes)[1])]
    alone = statistics.median(
        [run_epoch(ours_local, 1 + r, 0.0, args.warmup_batches)["images_per_s"] for r in range(3)]
    )
    consumer_s = 1.25 * args.batch / alone
    print(f"consumer: {1000 * consumer_s:.0f} ms per batch of {args.batch}", flush=True)
    results: dict[tuple, list[dict]] = {(k, c): [] for k in loaders for c in (False, True)}
    for rep in range(args.repeats):
        for key, loader in loaders.items():  # interleaved: the same machine load for all
            for with_consumer in (False, True):
                out = run_epoch(loader, 10 + rep, consumer_s if with_consumer else 0.0,
                                args.warmup_batches)  # fmt: skip
                results[(key, with_consumer)].append(out)
    rows = []
    for ((storage, mode), with_consumer), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({
            "storage": storage, "reads": mode, "consumer_ms": 1000 * consumer_s if with_consumer
            else 0.0, **{f"{k}_median": v for k, v in med.items()}, "runs": runs,
        })  # fmt: skip
        print(f"{storage:>14} | {mode:>26} | consumer {with_consumer!s:>5}: "
              f"{med['images_per_s']:.0f} img/s, waits {med['wait_ms_per_batch']:.1f} ms/batch, "
              f"on reads {med['read_wait_ms_per_batch']:.1f}", flush=True)  # fmt: skip
    table = markdown_table(
        ["storage", "file reads", "consumer", "img/s (median)", "consumer waits, ms/batch",
         "of which file reads, ms/batch"],
        [[r["storage"], r["reads"], f"{r['consumer_ms']:.0f} ms/batch" if r["consumer_ms"]
          else "none (loader alone)", f"{r['images_per_s_median']:.0f}",
          f"{r['wait_ms_per_batch_median']:.1f}", f"{r['read_wait_ms_per_batch_median']:.1f}"]
         for r in rows],
    )  # fmt: skip
    return rows, table


# --- chroma upsampling ---------------------------------------------------------------------------

# JFIF YCbCr -> RGB (ITU-R BT.601 full range), as libjpeg-turbo converts.
_YCC = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def _ycc_to_rgb(ycc: np.ndarray) -> np.ndarray:
    centred = ycc.astype(np.float64) - np.array([0.0, 128.0, 128.0])
    return np.clip(np.rint(centred @ _YCC.T), 0, 255)


def cpu_chroma_variants(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(fancy, nearest) RGB of a 4:2:0 JPEG: libjpeg-turbo's full decode in YCbCr, and the same
    luma with the native chroma samples (from the 1/2-scale decode, where 4:2:0 chroma is not
    rescaled) replicated 2x2."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("YCbCr", im.size)
        full = np.asarray(im.convert("YCbCr"))
    with Image.open(path) as im:
        w, h = im.size
        im.draft("YCbCr", ((w + 1) // 2, (h + 1) // 2))
        half = np.asarray(im.convert("YCbCr"))
    chroma = half[..., 1:].repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    nearest = np.concatenate([full[..., :1], chroma], axis=-1)
    return _ycc_to_rgb(full), _ycc_to_rgb(nearest)


def dali_decode(files: list[np.ndarray], device: str, fancy: bool) -> list[np.ndarray]:
    """Decoded RGB arrays (HWC uint8) from the CPU ('cpu') or the GPU ('mixed') decoder."""
    from nvidia import dali
    from nvidia.dali import fn, types

    pipe = dali.Pipeline(
        batch_size=len(files), num_threads=1, device_id=None if device == "cpu" else 0
    )
    with pipe:
        enc = fn.external_source(source=lambda i: files, batch=True, dtype=types.UINT8)
        pipe.set_outputs(
            fn.decoders.image(
                enc, device=device, output_type=types.RGB, jpeg_fancy_upsampling=fancy
            )  # fmt: skip
        )
    pipe.build()
    (out,) = pipe.run()
    if device != "cpu":
        out = out.as_cpu()
    return [np.array(out.at(i)) for i in range(len(files))]


def _val_recipe(rgb: np.ndarray) -> np.ndarray:
    """Resize the shorter side to 256 (bilinear, antialiased), centre crop 224: as evaluated."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    size = (256, round(w * 256 / h)) if h <= w else (round(h * 256 / w), 256)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return x[0, :, top : top + 224, left : left + 224].round().clamp(0, 255).numpy()


def _diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((d**2).mean())
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
            "psnr_db": 10 * math.log10(255**2 / mse) if mse else float("inf")}  # fmt: skip


def upsampling_section(args, tmp: Path) -> tuple[list[dict], str]:
    """nvJPEG's default chroma (nearest) vs fancy (libjpeg-turbo, PIL): what the flag changes."""
    from PIL import Image

    paths = []
    for i in range(args.upsampling_images):
        path = tmp / "upsampling" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = photo_like(448, seed=i)[:, : 448 - 112 * (i % 2)]  # landscape and portrait-ish
        Image.fromarray(img).save(path, quality=90)  # PIL's default subsampling: 4:2:0
        paths.append(path)
    files = [np.fromfile(p, dtype=np.uint8) for p in paths]
    cpu = dali_decode(files, "cpu", True)
    rows = []
    pairs = {"decoded": [], "val recipe (256 -> 224)": []}
    check = []
    if torch.cuda.is_available():  # the real thing: the mixed decoder both ways
        source = "GPU: mixed decoder, jpeg_fancy_upsampling False vs True"
        fancy, nearest = dali_decode(files, "mixed", True), dali_decode(files, "mixed", False)
        check = [_diff(f, c)["max_abs"] for f, c in zip(fancy, cpu)]
    else:
        source = "CPU emulation: native chroma replicated 2x2 vs libjpeg-turbo's fancy"
        fancy, nearest = zip(*(cpu_chroma_variants(p) for p in paths))
        check = [_diff(f, c)["max_abs"] for f, c in zip(fancy, cpu)]
    for f, n in zip(fancy, nearest):
        pairs["decoded"].append(_diff(f, n))
        pairs["val recipe (256 -> 224)"].append(_diff(_val_recipe(f), _val_recipe(n)))
    for where, diffs in pairs.items():
        rows.append({
            "source": source, "where": where, "images": len(paths),
            **{k: statistics.mean(d[k] for d in diffs) for k in ("mean_abs", "psnr_db")},
            "max_abs": max(d["max_abs"] for d in diffs),
            "fancy_vs_dali_cpu_max_abs": max(check),
        })  # fmt: skip
    table = markdown_table(
        ["jpeg_fancy_upsampling off vs on", "compared", "images", "mean abs diff (levels)",
         "max abs diff (any image)", "PSNR (dB, mean)"],
        [[r["source"], r["where"], r["images"], f"{r['mean_abs']:.2f}", f"{r['max_abs']:.0f}",
          f"{r['psnr_db']:.1f}"] for r in rows],
    )  # fmt: skip
    print(f"fancy reference vs DALI CPU decode: max abs diff {max(check):.0f}", flush=True)
    return rows, table


SECTIONS = ("throughput", "startup", "overlap", "upsampling")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
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
    p.add_argument("--startup_files", type=int, default=200_000, help="files in the startup tree")
    p.add_argument("--read_threads", type=int, default=16, help="overlap: our reader threads")
    p.add_argument("--latency_ms", type=float, default=2.0, help="overlap: simulated per-file")
    p.add_argument("--warmup_batches", type=int, default=3, help="overlap: not counted per epoch")
    p.add_argument("--upsampling_images", type=int, default=16)
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "loader.json")
    )
    args = p.parse_args()
    if min(args.threads) < 1:
        p.error(f"--threads: expected values >= 1, got {args.threads}")
    torch.set_num_threads(1)  # the main process only collects batches; workers do the work

    report: dict = {
        "benchmark": "loader",
        "command": "python benchmarks/bench_loader.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "environment": environment_info(),
    }
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "train"
        if {"throughput", "overlap"} & set(args.sections):
            nbytes = make_jpegs(root, args.images)
            print(f"{args.images} JPEGs, mean {nbytes / args.images / 1024:.0f} kB", flush=True)
        if "throughput" in args.sections:
            report["results"], table = throughput_section(args, root)
            tables.append(table)
        if "startup" in args.sections:
            sources = make_sources(tmp / "sources")
            report["startup"], table = startup_section(args, tmp, sources)
            tables.append(table)
        if "overlap" in args.sections:
            report["overlap"], table = overlap_section(args, root)
            tables.append(table)
        if "upsampling" in args.sections:
            report["upsampling"], table = upsampling_section(args, tmp)
            tables.append(table)
    print("\n\n".join(tables))
    write_json(args.out, report)


def make_sources(folder: Path, n: int = 4) -> list[Path]:
    """A few ImageNet-sized JPEGs for the startup tree's links."""
    make_jpegs(folder, n, classes=1)
    return sorted(folder.rglob("*.JPEG"))


if __name__ == "__main__":
    main()
