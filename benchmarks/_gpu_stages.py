"""The stages of `make gpu-check` (benchmarks/gpu_check.py runs them, in this order).

Each stage is a function of the :class:`Context` returning a dict for its JSON row: ``summary``
(one line for the table), ``status`` (default ``ok``; ``failed``, ``not available``, ``not run``),
``tail`` (the end of a failed command's output) and any figures. Everything heavy runs in a
subprocess with the stage's timeout, so a crash or a hang in CUDA costs one stage, not the check.
The data is generated once into ``Context.data`` and reused by every later check.

Budget estimates (``estimate_s``) are guesses for one H100 made without one: the first GPU run
should replace them with its timings.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TAIL = 3000  # characters of a failed command's output kept in the JSON


@dataclass
class Context:
    """Where a check reads and writes, and what its stages leave for the next ones."""

    data: Path  # generated data, kept between checks (cache)
    scratch: Path  # this check's runs and reports (emptied when a check starts)
    results: Path  # benchmarks/results: the benchmark JSON files
    timeout_s: float = 600.0  # the running stage's limit (gpu_check sets it per stage)
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    @property
    def syn(self) -> Path:
        return self.data / "syn224"

    @property
    def checkpoint(self) -> Path:
        """The train stage's model (this check's, or the last check's if it was not run)."""
        return self.scratch / "train" / "learnable_augmix_jsd" / "last.ckpt"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    estimate_s: float  # for --budget: a stage is not started unless this much is left
    timeout_s: float  # its own limit (the budget left may lower it)
    what: str = ""
    needs: tuple[str, ...] = ()  # stages --only adds before it (the data)


# --- commands ----------------------------------------------------------------------------------


def run_command(ctx: Context, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in the repository within ``ctx.timeout_s``; its exit code, command line and,
    if it failed, its output's tail. On a timeout the whole process group is killed (torchrun's
    workers too) and ``subprocess.TimeoutExpired`` is raised with the output so far."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=ctx.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, ctx.timeout_s, output=output[-TAIL:]) from None
    row: dict[str, Any] = {"command": shlex.join(cmd), "exit_code": proc.returncode}
    if proc.returncode != 0:
        row.update(status="failed", tail=output[-TAIL:])
    row["output"] = output
    return row


def _finish(row: dict, **figures: Any) -> dict:
    """The row without the full output (kept only as a failure's tail)."""
    row.pop("output", None)
    return {**row, **figures}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# --- environment and data ----------------------------------------------------------------------

_FACTS = """
import json, torch, triton, nvidia.dali as dali
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "gpus": torch.cuda.device_count(),
    "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
    "cuda_build": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "nccl": ".".join(map(str, torch.cuda.nccl.version())), "torch": torch.__version__,
    "dali": dali.__version__, "triton": triton.__version__}))
"""


def environment(ctx: Context, driver: Callable[[], str]) -> dict:
    """The GPU and the versions of everything that runs on it (read in a subprocess)."""
    row = run_command(ctx, python("-c", _FACTS))
    if row["exit_code"] != 0:
        return _finish(row)
    facts = {**json.loads(row["output"].strip().splitlines()[-1]), "driver": driver()}
    summary = (f"{facts['gpu']}, driver {facts['driver']}, CUDA {facts['cuda_build']}, torch "
               f"{facts['torch']}, DALI {facts['dali']}, Triton {facts['triton']}")  # fmt: skip
    return _finish(row, summary=summary, **facts)


# Small generated sets: 224-px JPEGs (10 classes x 64 train / 10 val), a -C set of four
# corruptions (noise, blur, weather, digital) at severity 3, and -P sequences of two
# perturbations for one image per class.
SYNTHETIC = ["--classes", "10", "--train_per_class", "64", "--val_per_class", "10", "--size", "224"]
C_CORRUPTIONS = ["gaussian_noise", "defocus_blur", "fog", "jpeg_compression"]
P_PERTURBATIONS = ["gaussian_noise", "translate"]


def make_data(ctx: Context) -> dict:
    """Generate what is missing (each maker reuses a finished set); say what each part took."""
    made_file = ctx.data / "made.json"
    made = json.loads(made_file.read_text()) if made_file.is_file() else {}
    syn, w = ctx.syn, str(ctx.workers)
    parts = {
        "syn224": python("-m", "augmix_gpu.data.synthetic", str(syn), *SYNTHETIC),
        "imagenet_c": python("-m", "augmix_gpu.data.make_c", str(syn / "val"), str(ctx.data / "c"),
                             "--severities", "3", "--corruptions", *C_CORRUPTIONS, "--workers", w),
        "imagenet_p": python("-m", "augmix_gpu.data.make_p", str(syn / "val"), str(ctx.data / "p"),
                             "--perturbations", *P_PERTURBATIONS, "--per_class", "1", "--size",
                             "224", "--preset", "ultrafast", "--workers", w),
    }  # fmt: skip
    seconds = {}
    for name, cmd in parts.items():
        start = time.perf_counter()
        row = run_command(ctx, cmd)
        if row["exit_code"] != 0:
            return _finish(row, summary=f"{name} failed")
        seconds[name] = round(time.perf_counter() - start, 1)
        made.setdefault(name, {"seconds": seconds[name], "when": time.strftime("%Y-%m-%d %H:%M")})
    made_file.write_text(json.dumps(made, indent=1))
    first = sum(m["seconds"] for m in made.values())
    return {"summary": f"{first:.0f} s to make (once), {sum(seconds.values()):.0f} s now",
            "made": made, "seconds_now": seconds, "root": str(ctx.data)}  # fmt: skip


# --- tests and benchmarks ----------------------------------------------------------------------

_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 12, "skipped": 1, ...}`` from pytest's last summary line."""
    lines = [ln for ln in output.strip().splitlines() if " in " in ln and _COUNTS.search(ln)]
    found = _COUNTS.findall(lines[-1]) if lines else []
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}


def cuda_tests(ctx: Context) -> dict:
    """``pytest -m cuda``: failed if any test fails, or if none passed (all skipped: vacuous)."""
    row = run_command(ctx, python("-m", "pytest", "-m", "cuda", "-q", "-rs", "-p",
                                  "no:cacheprovider", "tests"))  # fmt: skip
    counts = pytest_counts(row["output"])
    skips = [ln for ln in row["output"].splitlines() if ln.startswith("SKIPPED")]
    if not counts.get("passed"):
        row.update(status="failed", tail=row["output"][-TAIL:])
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
    return _finish(row, summary=summary, counts=counts, skipped=skips)


def augmix_forms(ctx: Context) -> dict:
    """benchmarks/augmix_share.py --quick, where it exists: exit 0 ok, anything else failed."""
    script = REPO / "benchmarks" / "augmix_share.py"
    if not script.is_file():
        return {"status": "not available", "summary": f"{script.name} is not in this checkout"}
    row = run_command(ctx, python(str(script), "--quick"))
    return _finish(row, summary="ok" if row["exit_code"] == 0 else f"exit {row['exit_code']}")


def loader_rows(ctx: Context) -> dict:
    """The loader benchmark's throughput rows (GPU rows included here) and the chroma check."""
    out = ctx.results / "gpu_check_loader.json"
    row = run_command(ctx, python(str(REPO / "benchmarks" / "bench_loader.py"), "--sections",
                                  "throughput", "upsampling", "--threads", str(ctx.workers),
                                  "--images", "256", "--repeats", "2",
                                  "--out", str(out)))  # fmt: skip
    if row["exit_code"] != 0:
        return _finish(row)
    rows = json.loads(out.read_text()).get("results", [])
    rates = {f"{r['loader']} ({r['device']}, {r['threads']} threads)":
             round(r["images_per_s_median"]) for r in rows}  # fmt: skip
    return _finish(row, summary=f"{len(rows)} rows, {out.name}", json=str(out), images_per_s=rates)


# --- train.py and evaluate.py ------------------------------------------------------------------


def train_args(ctx: Context, out: str, arch: str = "resnet50", epochs: int = 20) -> list[str]:
    """train.py on the generated 224-px set: 640 images, batch 64, 10 steps per epoch."""
    return ["--data", str(ctx.syn), "--arch", arch, "--aug_type",
            "learnable_augmix_jsd", "--precision", "bf16", "--channels_last", "--batch", "64",
            "--epochs", str(epochs), "--optimizer", "sgd", "--lr", "0.05", "--workers",
            str(ctx.workers), "--no_c_eval", "--no_p_eval", "--no_progress", "--wandb",
            "disabled", "--device", "cuda", "--save_every_minutes", "0", "--ckpt_dir_base",
            str(ctx.scratch / out)]  # fmt: skip


def _trained(ctx: Context, row: dict, out: str) -> dict:
    """What a finished train.py run reports: images/s after its first epoch, the last loss."""
    if row["exit_code"] != 0:
        return _finish(row)
    res = json.loads((ctx.scratch / out / "learnable_augmix_jsd" / "results.json").read_text())
    history = res["history"]
    rate = statistics.median(h["images_per_s"] for h in history[1:] or history)
    memory = re.search(r"memory: (.*)", row["output"])
    figures = dict(steps=history[-1]["global_step"], images_per_s=round(rate),
                   final_loss=history[-1]["loss"],
                   memory=memory.group(1) if memory else None)  # fmt: skip
    return _finish(row, summary=f"{figures['steps']} steps, {rate:.0f} images/s", **figures)


def train(ctx: Context) -> dict:
    """ResNet-50 learnable_augmix_jsd, bf16, channels_last, 200 steps, under torchrun (one rank:
    no process group; NCCL itself is checked by test_cuda.py's one-rank group)."""
    shutil.rmtree(ctx.scratch / "train", ignore_errors=True)  # a fresh run, not a resumed one
    cmd = python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 str(REPO / "train.py"), *train_args(ctx, "train"))  # fmt: skip
    return _trained(ctx, run_command(ctx, cmd), "train")


def compiled(ctx: Context) -> dict:
    """The same with --compile (inductor, Triton), 2 epochs."""
    shutil.rmtree(ctx.scratch / "compile", ignore_errors=True)
    cmd = python(str(REPO / "train.py"), *train_args(ctx, "compile", epochs=2), "--compile")
    return _trained(ctx, run_command(ctx, cmd), "compile")


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read in a thread (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, prefix: str, seconds: float) -> list[str]:
    """The lines read until one starts with ``prefix`` (raises TimeoutError past ``seconds``,
    RuntimeError if the output ends first)."""
    seen, deadline = [], time.monotonic() + seconds
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no line starting {prefix!r} in {seconds:.0f} s") from None
        if line is None:
            raise RuntimeError(f"ended before a line starting {prefix!r}: {''.join(seen)[-TAIL:]}")
        seen.append(line)
        if line.startswith(prefix):
            return seen


def sigterm_resume(ctx: Context) -> dict:
    """SIGTERM after the first epoch saves last.ckpt (CUDA generator states included) and
    exits 0; --resume auto continues it to the end of epoch 2."""
    shutil.rmtree(ctx.scratch / "sigterm", ignore_errors=True)
    args = python(str(REPO / "train.py"), *train_args(ctx, "sigterm", arch="resnet18", epochs=50))
    proc = subprocess.Popen(args, cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        seen = wait_for_line(_lines(proc), "epoch=1", ctx.timeout_s / 2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=ctx.timeout_s / 4)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if code != 0:
        return {"status": "failed", "summary": f"exit {code} after SIGTERM", "tail": "".join(seen)}
    resumed = train_args(ctx, "sigterm", arch="resnet18", epochs=2)
    row = run_command(ctx, python(str(REPO / "train.py"), *resumed, "--resume", "auto"))
    ok = row["exit_code"] == 0 and "resumed from" in row["output"]
    if row["exit_code"] == 0 and not ok:
        row.update(status="failed", tail=row["output"][-TAIL:])
    return _finish(row, summary="stopped, saved, resumed" if ok else "resume failed")


def evaluate_args(ctx: Context) -> list[str]:
    """evaluate.py on the train stage's checkpoint: clean, -C, -P, on the GPU in bf16."""
    return ["--ckpt_path", str(ctx.checkpoint), "--val", str(ctx.syn / "val"), "--imagenet_c",
            str(ctx.data / "c"), "--corruptions", *C_CORRUPTIONS, "--severities", "3",
            "--imagenet_p", str(ctx.data / "p"), "--perturbations", *P_PERTURBATIONS,
            "--device", "cuda",
            "--precision", "bf16", "--channels_last", "--batch", "100", "--workers",
            str(ctx.workers), "--out", str(ctx.scratch / "eval"), "--no_progress"]  # fmt: skip


def evaluate(ctx: Context) -> dict:
    """evaluate.py on the trained checkpoint: clean, -C (4 corruptions x severity 3), -P."""
    if not ctx.checkpoint.is_file():
        return {"status": "not run", "summary": "no checkpoint: the train stage has not finished"}
    row = run_command(ctx, python(str(REPO / "evaluate.py"), *evaluate_args(ctx)))
    if row["exit_code"] != 0:
        return _finish(row)
    results = json.loads((ctx.scratch / "eval" / "results.json").read_text())
    decoder = results["imagenet_p"]["decoder"]
    return _finish(row, summary=f"clean, -C, -P (-P decoder: {', '.join(decoder)})",
                   clean_top1=results["clean"].get("top1"), p_decoder=decoder)  # fmt: skip


DATA = ("data",)


def stages(driver: Callable[[], str]) -> tuple[Stage, ...]:
    """The check's stages, most important first (a budget cuts from the end)."""
    return (
        Stage("environment", lambda c: environment(c, driver), 15, 120, "GPU, driver, versions"),
        Stage("data", make_data, 60, 600, "224-px JPEGs, -C, -P (made once)"),
        Stage("cuda_tests", cuda_tests, 120, 420, "pytest -m cuda"),
        Stage("train", train, 90, 400, "ResNet-50, 200 steps, bf16, channels_last", DATA),
        Stage("evaluate", evaluate, 45, 300, "evaluate.py: clean, -C, -P", DATA),
        Stage("sigterm_resume", sigterm_resume, 60, 300, "SIGTERM, last.ckpt, --resume", DATA),
        Stage("augmix_forms", augmix_forms, 60, 300, "benchmarks/augmix_share.py --quick"),
        Stage("loader", loader_rows, 45, 300, "bench_loader.py: throughput, chroma"),
        Stage("compile", compiled, 120, 480, "train.py --compile, 20 steps", DATA),
    )
