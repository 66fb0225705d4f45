"""Images/s for producing what the JSD loss needs (clean + two AugMix views), at equal threads.

    python benchmarks/bench_augment.py                 # 224 px, batch 64, 2 threads
    python benchmarks/bench_augment.py --quick         # a tiny run (seconds)

Rows (each: clean + 2 views, float32, ImageNet-normalised, for every image):
  a   torchvision.transforms.AugMix on PIL images, one at a time, in a DataLoader with
      ``--threads`` worker processes (what timm and most trainers run);
  a2  the official google-research/augmix algorithm (PIL ImageOps ops, mixing after
      ToTensor+Normalize), same DataLoader set-up: written here from its semantics;
  b   torchvision.transforms.v2.AugMix on a batched uint8 tensor (ONE op chain shared by the
      batch: faster, but not per-sample AugMix), ``--threads`` torch threads;
  c   AugMixBatch (ours) on the CPU, ``--threads`` torch threads, per-sample chains;
  d   AugMixBatch on CUDA, when a GPU is present (strategy auto = fused), d-static and d-grouped
      beside it;
  e   AugMixBatch with LearnableSeverity: forward + backward (issue 3's target: <= 1.5x row c);
  f   the library as a user meets it: a fresh Python process with no environment settings (no
      OMP_*, MALLOC_*, AUGMIX_GPU_* variables; only PATH, HOME and PYTHONPATH to find the package),
      one torch thread, AugMixBatch with its defaults against torchvision's AugMix on PIL images in
      the same process, one image at a time (and through a DataLoader with one worker), interleaved.
      Issue 16's goal: AugMixBatch >= 2x torchvision's PIL AugMix there.

Repeats are interleaved across rows (row a, b, c, ... then again), so a load change on a shared
machine hits all rows alike. Two process settings apply to every row and go into the JSON: glibc
keeps freed memory (``reuse_freed_memory``; ``--default-malloc`` to skip) and idle OpenMP threads
sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``; ``--omp-default`` to skip). Besides
wall-clock images/s, "CPU ms/img" counts the CPU time of all threads and DataLoader workers: the
comparison that load from other processes disturbs least.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads spin before they sleep (the ACTIVE wait). On a CPU shared with other
# processes the spinning takes the cores the working threads need: measured on the 2-core machine
# of this project, 10x fewer images/s for the multi-threaded torch rows. It must be set before torch
# loads OpenMP; OMP_WAIT_POLICY in the environment wins; --omp-default leaves it unset.
# Row f's child process (--plain-child) is a plain user script: it sets nothing.
if "--omp-default" not in sys.argv and "--plain-child" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment_info,
    markdown_table,
    photo_like,
    rate_summary,
    reuse_freed_memory,
    write_json,
)

from augmix_gpu.augment.augmix import IMAGENET_MEAN, IMAGENET_STD, AugMixBatch  # noqa: E402

ROWS = ("a", "a2", "b", "c", "d", "e", "f")
REPO = Path(__file__).resolve().parent.parent
# What row f's child process inherits: where to find programs and the package, nothing that tunes.
PLAIN_ENV = ("PATH", "HOME", "LANG", "TMPDIR")


# --- the official algorithm on PIL (row a2), from google-research/augmix's semantics -------------


class OfficialPILAugMix:
    """One AugMix view of a PIL image as the official code computes it: a normalised tensor."""

    def __init__(
        self,
        severity: float = 3.0,
        width: int = 3,
        depth: int = -1,
        alpha: float = 1.0,
        size: int = 224,
    ):
        from PIL import Image, ImageOps
        from torchvision import transforms as T

        self.severity, self.width, self.depth, self.alpha = severity, width, depth, alpha
        self.pre = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.rng = np.random.default_rng()
        bil = Image.BILINEAR

        def level() -> float:  # sample_level: U(0.1, severity)
            return float(self.rng.uniform(0.1, self.severity))

        def signed(v: float) -> float:
            return -v if self.rng.uniform() > 0.5 else v

        def affine(img, data):
            return img.transform(img.size, Image.AFFINE, data, resample=bil)

        self.ops = [  # the paper's 9 (all_ops=False), official int_parameter/float_parameter
            lambda im: ImageOps.autocontrast(im),
            lambda im: ImageOps.equalize(im),
            lambda im: ImageOps.posterize(im, max(1, 4 - int(level() * 4 / 10))),  # Pillow >= 10: bits >= 1
            lambda im: im.rotate(signed(int(level() * 30 / 10)), resample=bil),
            lambda im: ImageOps.solarize(im, 256 - int(level() * 256 / 10)),
            lambda im: affine(im, (1, signed(level() * 0.3 / 10), 0, 0, 1, 0)),
            lambda im: affine(im, (1, 0, 0, signed(level() * 0.3 / 10), 1, 0)),
            lambda im: affine(im, (1, 0, signed(int(level() * size / 3 / 10)), 0, 1, 0)),
            lambda im: affine(im, (1, 0, 0, 0, 1, signed(int(level() * size / 3 / 10)))),
        ]  # fmt: skip

    def __call__(self, image) -> torch.Tensor:
        ws = self.rng.dirichlet([self.alpha] * self.width).astype(np.float32)
        m = np.float32(self.rng.beta(self.alpha, self.alpha))
        mix = torch.zeros(3, image.height, image.width)
        for i in range(self.width):
            img = image.copy()
            depth = self.depth if self.depth > 0 else int(self.rng.integers(1, 4))
            for _ in range(depth):
                img = self.ops[int(self.rng.integers(len(self.ops)))](img)
            mix += float(ws[i]) * self.pre(img)
        return (1 - m) * self.pre(image) + m * mix


class _PILViews(torch.utils.data.Dataset):
    """PIL images in memory -> (clean, view1, view2) normalised tensors."""

    def __init__(self, images, view: Callable):
        from torchvision import transforms as T

        self.images, self.view = images, view
        self.pre = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        return self.pre(im), self.view(im), self.view(im)


def _seed_worker(worker_id: int) -> None:
    ds = torch.utils.data.get_worker_info().dataset
    if isinstance(ds.view, OfficialPILAugMix):
        ds.view.rng = np.random.default_rng(1000 + worker_id)


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loader_runner(images, view: Callable, batch: int, workers: int) -> Callable[[], int]:
    """Iterate a DataLoader once; ``run.cpu_s`` holds the last pass's worker CPU seconds."""
    loader = torch.utils.data.DataLoader(
        _PILViews(images, view),
        batch_size=batch,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )

    def workers_cpu() -> float | None:
        it = getattr(loader, "_iterator", None)  # persistent workers live on the iterator
        try:
            return sum(_proc_cpu_seconds(w.pid) for w in it._workers) if it is not None else None
        except (AttributeError, OSError, ValueError):
            return None

    def run() -> int:
        before = workers_cpu()
        n = sum(clean.shape[0] for clean, _, _ in loader)
        after = workers_cpu()
        run.cpu_s = after - before if before is not None and after is not None else None
        return n

    run.cpu_s = None
    return run


# --- rows ------------------------------------------------------------------------------------------


def build_rows(args, images_u8: torch.Tensor, notes: list[str]) -> dict[str, dict]:
    """name -> {label, device, run (returns #images), sync, in_process}."""
    from PIL import Image

    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images_u8]
    cpu_x = images_u8[: args.batch].contiguous()
    calls = max(1, len(images_u8) // args.batch)  # batched rows process as many images as a/a2
    return {**reference_rows(args, pil, cpu_x, calls), **our_rows(args, cpu_x, calls, notes)}


def reference_rows(args, pil: list, cpu_x: torch.Tensor, calls: int) -> dict[str, dict]:
    """Rows a, a2 (PIL per image, DataLoader workers) and b (torchvision v2 on a batch)."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    rows: dict[str, dict] = {}
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sev = args.severity
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    if "a" in args.rows:
        tv = T.AugMix(severity=int(sev), mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False)
        rows["a"] = {
            "label": "torchvision AugMix, PIL, per image (DataLoader workers)",
            "device": "cpu",
            "run": _loader_runner(pil, T.Compose([tv, normalize]), args.batch, args.threads),
            "in_process": False,
        }
    if "a2" in args.rows:
        official = OfficialPILAugMix(severity=sev, size=args.size)
        rows["a2"] = {
            "label": "official augmix algorithm, PIL ops, per image (DataLoader workers)",
            "device": "cpu",
            "run": _loader_runner(pil, official, args.batch, args.threads),
            "in_process": False,
        }
    if "b" in args.rows:
        tv2 = v2.AugMix(
            severity=int(sev), mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False
        )

        def run_b() -> int:
            for _ in range(calls):
                views = (cpu_x, tv2(cpu_x), tv2(cpu_x))
                _ = [(v.float().div_(255) - mean) / std for v in views]
            return calls * args.batch

        rows["b"] = {
            "label": "torchvision v2 AugMix, batched uint8 tensor (ops shared by the batch)",
            "device": "cpu",
            "run": run_b,
            "in_process": True,
        }
    return rows


def _ours(
    aug: AugMixBatch, x: torch.Tensor, calls: int, backward: bool = False
) -> Callable[[], int]:
    def run() -> int:
        for _ in range(calls):
            out = aug(x)
            if backward:
                sum(v.square().mean() for v in out[1:]).backward()
        return calls * x.shape[0]

    return run


def our_rows(args, cpu_x: torch.Tensor, calls: int, notes: list[str]) -> dict[str, dict]:
    """Rows c (CPU), d, d-static and d-grouped (CUDA) and e (learnable, forward + backward)."""
    rows: dict[str, dict] = {}
    sev = args.severity
    label = "AugMixBatch (ours), per-sample chains"
    if "c" in args.rows:
        rows["c"] = {"label": label, "device": "cpu", "run": _ours(AugMixBatch(severity=sev), cpu_x, calls), "in_process": True}  # fmt: skip
    if "d" in args.rows:
        if torch.cuda.is_available():  # auto = fused on CUDA; the other forms beside it
            for key, strategy in (("d", "auto"), ("d-static", "static"), ("d-grouped", "grouped")):
                run = _ours(
                    AugMixBatch(severity=sev, strategy=strategy).cuda(), cpu_x.cuda(), calls
                )
                rows[key] = {"label": f"{label}, strategy={strategy}", "device": "cuda", "run": run, "sync": torch.cuda.synchronize, "in_process": True}  # fmt: skip
        else:
            notes.append("row d (CUDA: auto = fused, static, grouped) skipped: no GPU here")
    if "e" in args.rows:
        try:
            from augmix_gpu.augment.severity import LearnableSeverity
        except ImportError as err:
            notes.append(
                f"row e (learnable) skipped: augmix_gpu.augment.severity.LearnableSeverity not importable ({err})"
            )
        else:
            aug = AugMixBatch(severity=LearnableSeverity(initial_aug_severity=sev))
            rows["e"] = {
                "label": "AugMixBatch + LearnableSeverity, forward + backward",
                "device": "cpu",
                "run": _ours(aug, cpu_x, calls, backward=True),
                "in_process": True,
            }
    return rows


# --- row f: a plain script in a fresh process ----------------------------------------------------


def plain_child(args) -> dict:
    """Row f's measurement, inside the fresh process: ours and PIL's, interleaved, one thread."""
    from PIL import Image
    from torchvision import transforms as T

    from augmix_gpu import runtime

    torch.set_num_threads(1)
    images_u8 = torch.stack(
        [torch.from_numpy(photo_like(args.size, s)).permute(2, 0, 1) for s in range(args.images)]
    ).contiguous()
    batches = images_u8.split(args.batch)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images_u8]
    tv = T.AugMix(severity=int(args.severity), mixture_width=3, chain_depth=-1, alpha=1.0)
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    aug = AugMixBatch(severity=args.severity)  # the library's defaults (strategy auto: grouped)

    def ours() -> int:
        for x in batches:
            aug(x)
        return len(images_u8)

    def pil_loop() -> int:
        for im in pil:
            normalize(im), normalize(tv(im)), normalize(tv(im))
        return len(pil)

    rows = {"ours": ours, "pil": pil_loop}
    if args.plain_loader:
        rows["pil_loader"] = _loader_runner(pil, T.Compose([tv, normalize]), args.batch, 1)
    for run in rows.values():
        run()  # warm-up (and the library's first-call CPU setting)
    times = {k: [] for k in rows}
    for _ in range(args.repeats):
        for key, run in rows.items():
            w0, c0 = time.perf_counter(), time.process_time()
            n = run()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            worker_cpu = getattr(run, "cpu_s", None)
            times[key].append((wall, cpu + worker_cpu if worker_cpu is not None else cpu, n))
    tuning = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MALLOC_", "AUGMIX_", "MKL_", "KMP_"))}  # fmt: skip
    return {"times": times, "env_tuning": tuning, "malloc_reuse_by_library": runtime._tuned,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def run_plain(args, notes: list[str]) -> list[dict]:
    """Row f: run ``plain_child`` in a fresh interpreter with a stripped environment."""
    env = {k: os.environ[k] for k in PLAIN_ENV if k in os.environ}
    env["PYTHONPATH"] = str(REPO)  # finds augmix_gpu and benchmarks/_common; tunes nothing
    if args.plain_opt_out:  # the library's own CPU setting off: what a plain script got before
        env["AUGMIX_GPU_DEFAULT_MALLOC"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-child", "--size", str(args.size),
           "--batch", str(args.batch), "--images", str(args.images), "--repeats", str(args.repeats),
           "--severity", str(args.severity)] + (["--plain-loader"] if args.plain_loader else [])  # fmt: skip
    print(f"row f: {' '.join(cmd[1:])} in a fresh process, env = {sorted(env)}", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        notes.append(f"row f failed: {done.stderr.strip().splitlines()[-1:]}")
        return []
    child = json.loads(done.stdout.strip().splitlines()[-1])
    labels = {
        "ours": "plain script, 1 thread: AugMixBatch (library defaults)"
        + (", AUGMIX_GPU_DEFAULT_MALLOC=1" if args.plain_opt_out else ""),
        "pil": "plain script, 1 thread: torchvision AugMix, PIL, per image, in process",
        "pil_loader": "plain script, 1 thread: torchvision AugMix, PIL, DataLoader(num_workers=1)",
    }
    results = []
    for key, t in child["times"].items():
        res = {"row": "f" if key == "ours" else f"f-{key}", "method": labels[key], "device": "cpu"}
        res.update({"threads": 1, "batch": args.batch, "size": args.size, "plain": True})
        res.update(rate_summary([w for w, _, _ in t], t[0][2], [c for _, c, _ in t]))
        results.append(res)
    by = {r["row"]: r for r in results}
    for ref in ("f-pil", "f-pil_loader"):
        if ref in by:
            for what, k in (("images_per_s_median", "wall"), ("cpu_ms_per_image_median", "cpu")):
                a, b = by["f"][what], by[ref][what]
                by["f"][f"speedup_vs_{ref}_{k}"] = a / b if k == "wall" else b / a
    by["f"]["env_tuning_seen_by_child"] = child["env_tuning"]
    by["f"]["malloc_reuse_by_library"] = child["malloc_reuse_by_library"]
    return results


def time_rows(rows: dict[str, dict], repeats: int, warmup: int) -> dict[str, list[tuple]]:
    """Warm-up, then ``repeats`` rounds in which every row runs once: (wall s, CPU s | None, images)."""
    print(f"warm-up ({warmup}x each) ...", flush=True)
    for row in rows.values():
        for _ in range(warmup):
            row["run"]()
        if row.get("sync"):
            row["sync"]()
    times: dict[str, list[tuple]] = {k: [] for k in rows}
    for r in range(repeats):
        for key, row in rows.items():
            w0, c0 = time.perf_counter(), time.process_time()
            n = row["run"]()
            if row.get("sync"):
                row["sync"]()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if not row["in_process"]:  # the work happens in the DataLoader workers
                worker_cpu = getattr(row["run"], "cpu_s", None)
                cpu = cpu + worker_cpu if worker_cpu is not None else None
            times[key].append((wall, cpu, n))
        done = ", ".join(f"{k} {t[-1][2] / t[-1][0]:.1f}/s" for k, t in times.items())
        print(f"round {r + 1}/{repeats}: {done}", flush=True)
    return times


def summarize(args, rows: dict[str, dict], times: dict[str, list[tuple]]) -> list[dict]:
    results = []
    for key, row in rows.items():
        wall = [t[0] for t in times[key]]
        cpu = [t[1] for t in times[key]] if all(t[1] is not None for t in times[key]) else None
        res = {"row": key, "method": row["label"], "device": row["device"], "threads": args.threads}
        res.update({"batch": args.batch, "size": args.size})
        res.update(rate_summary(wall, times[key][0][2], cpu))
        results.append(res)
    by = {r["row"]: r for r in results}
    ref = by.get("a", {}).get("images_per_s_median")
    ref_cpu = by.get("a", {}).get("cpu_ms_per_image_median")
    for r in results:
        r["speedup_vs_a"] = r["images_per_s_median"] / ref if ref else None
        cpu = r.get("cpu_ms_per_image_median")
        r["cpu_speedup_vs_a"] = ref_cpu / cpu if ref_cpu and cpu else None
    if "c" in by and "e" in by:
        by["e"]["cost_vs_fixed_forward"] = (
            by["c"]["images_per_s_median"] / by["e"]["images_per_s_median"]
        )
        if by["c"].get("cpu_ms_per_image_median") and by["e"].get("cpu_ms_per_image_median"):
            by["e"]["cpu_cost_vs_fixed_forward"] = (
                by["e"]["cpu_ms_per_image_median"] / by["c"]["cpu_ms_per_image_median"]
            )
    return results


def table(results: list[dict]) -> str:
    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v else "-"

    headers = ["row", "method", "device", "threads", "batch", "img/s (median)", "min-max",
               "CPU ms/img", "img/s vs a", "CPU vs a"]  # fmt: skip
    body = [
        [r["row"], r["method"], r["device"], r["threads"], r["batch"], f"{r['images_per_s_median']:.1f}",
         f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}",
         f"{r['cpu_ms_per_image_median']:.2f}" if r.get("cpu_ms_per_image_median") else "-",
         x(r["speedup_vs_a"]), x(r["cpu_speedup_vs_a"])]
        for r in results
    ]  # fmt: skip
    return markdown_table(headers, body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, ``--quick`` and ``--rows`` resolved, ``--images`` a multiple of the batch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument(
        "--batch", type=int, default=64, help="batch of the batched rows and the DataLoaders"
    )
    parser.add_argument(
        "--images", type=int, default=256, help="images per timed repeat (multiple of --batch)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads = DataLoader worker processes"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--severity", type=float, default=3.0)
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}"
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="do not ask glibc to keep freed memory"
    )
    parser.add_argument(
        "--omp-default", action="store_true", help="leave OMP_WAIT_POLICY unset (top of file)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run: 64 px, batch 8, 16 images, 2 repeats"
    )
    parser.add_argument(
        "--out", default="bench_augment.json", help="JSON (bare names: benchmarks/results/)"
    )
    parser.add_argument(
        "--plain-loader",
        action="store_true",
        help="row f also times PIL through a DataLoader with one worker",
    )
    parser.add_argument(
        "--plain-opt-out",
        action="store_true",
        help="row f with AUGMIX_GPU_DEFAULT_MALLOC=1 (the library's CPU malloc setting off)",
    )
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_child:  # row f's fresh process: main measures there, nothing else
        return args
    if args.quick:
        args.size, args.batch, args.images, args.repeats = 64, 8, 16, 2
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}, choose from {ROWS}")
    args.images = max(args.batch, args.images // args.batch * args.batch)
    return args


def report(args, results: list[dict], notes: list[str], malloc: bool) -> None:
    """Print the table, the learnable and plain-script ratios, the notes and the settings."""
    print()
    print(table(results))
    e = next((r for r in results if r["row"] == "e"), {})
    if "cost_vs_fixed_forward" in e:
        print(
            f"\nlearnable forward+backward: {e['cost_vs_fixed_forward']:.2f}x the fixed-severity forward's "
            f"wall time, {e.get('cpu_cost_vs_fixed_forward', float('nan')):.2f}x its CPU time (target <= 1.5x)"
        )
    f = next((r for r in results if r["row"] == "f"), {})
    for ref in ("f-pil", "f-pil_loader"):
        if f"speedup_vs_{ref}_wall" in f:
            print(
                f"\nplain script, one thread, fresh process: AugMixBatch is "
                f"{f[f'speedup_vs_{ref}_wall']:.2f}x ({f[f'speedup_vs_{ref}_cpu']:.2f}x in CPU time) "
                f"row {ref} (goal >= 2x); library's malloc setting: {f.get('malloc_reuse_by_library')}, "
                f"tuning variables seen: {f.get('env_tuning_seen_by_child') or 'none'}"
            )
    for n in notes:
        print(f"note: {n}")
    omp = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(
        f"({args.size} px, clean + 2 views per image, {args.threads} threads; glibc keeps freed memory: "
        f"{malloc}; OMP_WAIT_POLICY={omp}; CPU ms/img counts all threads and DataLoader workers)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plain_child:  # row f's fresh process: measure, print one JSON line, nothing else
        print(json.dumps(plain_child(args)))
        return
    malloc = False if args.default_malloc else reuse_freed_memory()  # before workers fork
    torch.set_num_threads(args.threads)
    images = torch.stack(
        [
            torch.from_numpy(photo_like(args.size, seed)).permute(2, 0, 1)
            for seed in range(args.images)
        ]
    ).contiguous()
    notes: list[str] = []
    plain = run_plain(args, notes) if "f" in args.rows else []
    rows = build_rows(args, images, notes)
    results = summarize(args, rows, time_rows(rows, args.repeats, args.warmup)) if rows else []
    for r in plain:
        r["speedup_vs_a"] = r["cpu_speedup_vs_a"] = None  # other threads, other process
    results += plain

    report(args, results, notes, malloc)
    path = write_json(
        args.out,
        {
            "benchmark": "augment",
            "command": "python benchmarks/bench_augment.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": vars(args),
            "environment": environment_info(),
            "results": results,
            "notes": notes,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
