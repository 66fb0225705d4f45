"""`make gpu-check`: every GPU path in stages, within a time budget (8 minutes by default).

Stages, most important first (benchmarks/_gpu_stages.py): `environment` (GPU, driver, CUDA,
torch, DALI, Triton), `data` (224-px JPEGs, a -C and a -P set, made once and cached),
`cuda_tests` (`pytest -m cuda`), `train` (train.py: ResNet-50 `learnable_augmix_jsd`, 200 steps,
bf16, channels_last, under torchrun), `evaluate` (evaluate.py: clean, -C, -P), `sigterm_resume`,
`augmix_forms` (benchmarks/augmix_share.py --quick), `loader` (the loader benchmark's rows),
`compile` (train.py --compile).

Each stage's row is printed and written to `benchmarks/results/gpu_check.json` as soon as it
ends; a stage that fails or runs past its time gets its row and the next stage runs. A stage is
not started when its estimate would take the check past `--budget`; the JSON says where it
stopped, and `--only` runs the rest later (the data is cached). Exit 1 if a stage failed.

Without a GPU it prints one line and exits 0. Where a GPU is visible (`/dev/nvidia<N>`, or
`nvidia-smi` lists one) but torch cannot use CUDA, it exits 1 and says why (a driver older than
torch's CUDA build needs, most often).

    python benchmarks/gpu_check.py [--only train evaluate] [--budget 480] [--out FILE]
"""

from __future__ import annotations

import argparse
import glob
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import RESULTS_DIR, environment_info, write_json  # noqa: E402
from _gpu_stages import TAIL, Context, Stage, stages  # noqa: E402

from augmix_gpu.distributed import _cuda_usable  # noqa: E402

BUDGET_S = 480.0  # one lent GPU often comes for ten minutes
# The oldest driver each CUDA major of torch's wheels runs on (CUDA minor version compatibility:
# docs.nvidia.com/deploy/cuda-compatibility): 13.x needs the r580 drivers, 12.x r525.
MIN_DRIVER = {"13": 580, "12": 525}


# --- is there a GPU, and can torch use it? -----------------------------------------------------


def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi, else /proc), or "unknown"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        return found.group(1) if found else "unknown"
    except OSError:
        return "unknown"


def gpu_visible() -> str | None:
    """Why this machine has an NVIDIA GPU (a /dev/nvidia<N> device, nvidia-smi), or None."""
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if devices:
        return f"{devices[0]} exists"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    listed = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU")]
    return f"nvidia-smi lists {listed[0]}" if out.returncode == 0 and listed else None


def cuda_unusable(seen: str, why: str, driver: str) -> str:
    """The one line for a GPU torch cannot use: torch's CUDA build against the driver."""
    reason = why or "no reason given"
    head = f"gpu-check: a GPU is visible ({seen}) but torch cannot use CUDA ({reason})"
    built = torch.version.cuda
    if built is None:
        return f"{head}: torch {torch.__version__} is a CPU-only build (docs/gpu.md: the wheels)"
    need = MIN_DRIVER.get(built.split(".")[0])
    major = re.match(r"\d+", driver)
    old = need is not None and major is not None and int(major.group()) < need
    verdict = f"too old: CUDA {built} needs >= {need}" if old else f"CUDA {built} needs >= {need}"
    return (f"{head}: torch {torch.__version__} is built for CUDA {built}, this machine's NVIDIA "
            f"driver is {driver} ({verdict}); update the driver (docs/gpu.md) or check "
            "CUDA_VISIBLE_DEVICES")  # fmt: skip


# --- running the stages ------------------------------------------------------------------------


def run_stage(stage: Stage, ctx: Context) -> dict:
    """One stage's row: ok / failed / timeout / what the stage says, its seconds and findings."""
    start = time.perf_counter()
    try:
        row = dict(stage.run(ctx) or {})
        status = row.pop("status", "ok")
    except subprocess.TimeoutExpired as e:
        cmd = shlex.join(e.cmd) if isinstance(e.cmd, list) else str(e.cmd)
        output = e.output if isinstance(e.output, str) else ""
        status, row = "timeout", {"summary": f"past {e.timeout:.0f} s", "tail": f"{cmd}\n{output}"}
    except Exception as e:  # noqa: BLE001 - recorded in the row; the next stage runs
        status, row = "failed", {"summary": f"{type(e).__name__}: {e}"[:200],
                                 "tail": traceback.format_exc()[-TAIL:]}  # fmt: skip
    return {"stage": stage.name, "status": status, "seconds": round(time.perf_counter() - start, 1),
            **row}  # fmt: skip


def select(all_stages: Sequence[Stage], only: Sequence[str]) -> list[Stage]:
    """The stages ``--only`` names, with those they need, in the check's order (all if empty)."""
    if not only:
        return list(all_stages)
    wanted = set(only)
    for stage in all_stages:
        if stage.name in wanted:
            wanted.update(stage.needs)
    return [s for s in all_stages if s.name in wanted]


def run_stages(chosen: Sequence[Stage], ctx: Context, report: dict, out: Path, *,
               budget: float | None, clock: Callable[[], float] = time.monotonic,
               emit: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run ``chosen`` in order, writing ``report`` to ``out`` and emitting a row after each.

    A stage starts only if its estimate fits in what is left of ``budget`` (None: no limit), and
    its subprocesses get at most that much time; the first that does not fit stops the check.
    """
    start = clock()
    report.update(budget_s=budget, stages=[], stopped=None)
    for i, stage in enumerate(chosen):
        used = clock() - start
        left = None if budget is None else budget - used
        if left is not None and stage.estimate_s > left:
            report["stopped"] = (f"budget: {used:.0f} s of {budget:.0f} s used; {stage.name} "
                                 f"needs ~{stage.estimate_s:.0f} s; not started: "
                                 f"{', '.join(s.name for s in chosen[i:])}")  # fmt: skip
            write_json(out, report)
            emit(f"stopped ({report['stopped']}); run them with --only")
            break
        ctx.timeout_s = stage.timeout_s if left is None else min(stage.timeout_s, left)
        row = run_stage(stage, ctx)
        report["stages"].append(row)
        write_json(out, report)
        emit(
            f"| {row['stage']} | {row['status']} | {row['seconds']:.0f} | {row.get('summary', '')} "
            "|"
        )
    return report


def parse_args(argv: Sequence[str] | None, names: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=[], choices=names, metavar="STAGE",
                   help=f"run these (and the data they need): {', '.join(names)}")  # fmt: skip
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds; a stage is not started past it (0: no limit)")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS_DIR / "gpu_check.json"))
    p.add_argument("--work", default=None, help="data cache and runs (default: $AUGMIX_GPU_CACHE)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    all_stages = stages(driver_version)
    args = parse_args(argv, [s.name for s in all_stages])
    usable, why = _cuda_usable()
    if not usable:
        seen = gpu_visible()
        if seen is None:
            print("gpu-check: no GPU on this machine (no /dev/nvidia<N>, no nvidia-smi): nothing "
                  "to check here; run `make gpu-check` where there is one")  # fmt: skip
            return 0
        print(cuda_unusable(seen, why, driver_version()), file=sys.stderr)
        return 1
    from augmix_gpu.train.data import cache_root

    work = Path(args.work) if args.work else cache_root()
    ctx = Context(data=work / "gpu-check", scratch=work / "gpu-check-runs", results=RESULTS_DIR)
    report = {"benchmark": "gpu_check", "gpu_run": True,
              "command": shlex.join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "environment": environment_info()}  # fmt: skip
    print(f"gpu-check on {torch.cuda.get_device_name(0)}; rows in {args.out}\n"
          "| stage | result | s | what |\n|---|---|---|---|", flush=True)  # fmt: skip
    report = run_stages(select(all_stages, args.only), ctx, report, Path(args.out),
                        budget=args.budget or None,
                        emit=lambda line: print(line, flush=True))  # fmt: skip
    bad = [r for r in report["stages"] if r["status"] in ("failed", "timeout")]
    for row in bad:
        print(f"\n--- {row['stage']} {row['status']}:\n{row.get('tail', '')}")
    print(f"\ngpu-check: {len(report['stages']) - len(bad)} stages ok or not applicable, "
          f"{len(bad)} failed; {args.out}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
