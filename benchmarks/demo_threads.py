"""`make demo` against the seed and the intra-op thread count: clean accuracy and wall time.

Each run is `python train.py` (the embedded demo, `configs/demo.toml`) in a fresh process with
`OMP_NUM_THREADS=T`, one at a time, from an empty cache (`AUGMIX_GPU_CACHE` = a new temporary
folder, so the data generation is timed too); the clean val top-1 of its last epoch is read from
its results.json. A first run should not depend on the thread count: two thread counts sum in
another order, so a run that ends mid-way out of the task's initial plateau ends far apart.

    python benchmarks/demo_threads.py                                   # seeds 0 1 2 x threads 1 2
    python benchmarks/demo_threads.py --seeds 0 --threads 2 --cache /tmp/c -- --epochs 12
                                             # a variant (flags after --), data generated once

Writes `benchmarks/results/demo_threads.json` (`--out`) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment_info, markdown_table, results_path, write_json

REPO = Path(__file__).resolve().parent.parent


def run_demo(seed: int, threads: int, cache: str | None, extra: list[str]) -> dict:
    """One `python train.py` run; its last epoch's clean accuracy, its curve and wall time."""
    with tempfile.TemporaryDirectory(prefix="demo-threads-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "AUGMIX_GPU_CACHE": cache or tmp,
               "PYTHONPATH": str(REPO)}  # fmt: skip
        cmd = [sys.executable, str(REPO / "train.py"), "--seed", str(seed), "--no_progress",
               "--wandb", "disabled", "--ckpt_dir_base", f"{tmp}/runs", *extra]  # fmt: skip
        start, cpu = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
        if proc.returncode:
            raise RuntimeError(f"seed {seed}, {threads} threads failed:\n{proc.stderr[-2000:]}")
        (results,) = Path(tmp, "runs").glob("*/results.json")
        history = json.loads(results.read_text())["history"]
    took = re.search(r"robustness evaluation took (\d+) s", proc.stdout + proc.stderr)
    return {
        "seed": seed, "threads": threads, "top1": history[-1]["val_top1"],
        "curve": [round(h["val_top1"], 2) for h in history], "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1), "evaluation_seconds": int(took[1]) if took else None,
    }  # fmt: skip


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (and theirs): the work a run
    did, which other jobs on a shared machine do not inflate as they inflate its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cache", help="reuse this data cache (times then leave generation out)")
    p.add_argument("--out", default="demo_threads.json")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in --out (made with the same flags) and add these: "
                        "one thread count on a busy machine, the timed one on an idle one")  # fmt: skip
    p.add_argument("extra", nargs="*", help="train.py flags after --, e.g. -- --epochs 12")
    a = p.parse_args()
    runs, commands = [], [" ".join(sys.argv)]
    if a.append:
        before = json.loads(results_path(a.out).read_text())
        if before["train_flags"] != a.extra:
            p.error(f"--append: {a.out} was made with train.py flags {before['train_flags']}")
        runs, commands = before["runs"], [*before["commands"], *commands]
    for seed in a.seeds:
        for threads in a.threads:
            runs.append(run_demo(seed, threads, a.cache, a.extra))
            print(json.dumps(runs[-1]), flush=True)
    top1 = [r["top1"] for r in runs]
    summary = {"top1_min": min(top1), "top1_max": max(top1), "top1_spread": max(top1) - min(top1),
               "top1_mean": statistics.mean(top1), "seconds_max": max(r["seconds"] for r in runs),
               "seconds_max_by_threads": {t: max(r["seconds"] for r in runs if r["threads"] == t)
                                          for t in sorted({r["threads"] for r in runs})},
               "empty_cache": a.cache is None}  # fmt: skip
    path = write_json(a.out, {"commands": commands, "train_flags": a.extra,
                              "runs": runs, "summary": summary,
                              "environment": environment_info()})  # fmt: skip
    rows = [[r["seed"], r["threads"], f"{r['top1']:.1f}", f"{r['seconds']:.0f}",
             f"{r['cpu_seconds']:.0f}"] for r in runs]  # fmt: skip
    print(markdown_table(["seed", "threads", "clean top-1 %", "wall s", "CPU s"], rows))
    print(json.dumps(summary), f"-> {path}")


if __name__ == "__main__":
    main()
