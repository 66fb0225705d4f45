"""Bytes every kernel of one AugMix call reads and writes, counted on the CPU: a model of its GPU cost.

    python benchmarks/count_bytes.py            # 224 px, 4 source images: table + results/bytes.json
    python benchmarks/count_bytes.py --quick    # 64 px smoke run (fused runs Triton's interpreter)

Why bytes: on a GPU AugMix is bandwidth-bound (< 0.3 operations per byte), so a call costs about
the bytes its kernels move over the memory bandwidth, plus a launch per kernel. ``ByteCounter``
(a ``TorchDispatchMode``) sees every dispatched operator of a call and counts, per operator:

* read: the distinct elements of every tensor argument x element size (an expanded argument,
  stride 0, counts its stored elements once); written: the same for every output. An argument
  the operator only overwrites (``copy_``'s and ``fill_``'s destination, an ``out=``, the target
  of an in-place random draw) is not read.
* a view or an alias (``func.is_view``, ``detach``, ``_unsafe_view``, ...) and an allocation
  (``empty*``) move no bytes and launch no kernel; every other operator is one kernel.
* gathers (``index_select``, ``gather``, ``index``) read as many source elements as they write;
  in-place scatters (``index_copy_``, ``index_put_``, ``scatter_``, ``scatter_add_``,
  ``index_add_``) write as many as their source holds (and read them too when they add).
* ``_local_scalar_dense`` (``.item()``) and ``Tensor.tolist()`` are host reads (one kernel, a few
  bytes, and on a GPU a wait for every queued kernel).
* the fused form's operators (``augmix_gpu::fused_*``) by their kernels' loads and stores
  (``augmix_gpu/augment/fused_kernels.py``): a step reads and writes only the images of the
  chains still running (step 0 reads each source image once), the statistics kernel only the
  images that drew autocontrast, equalize or contrast, the mix each chain's last image once.

Rows, per source image (the counts divided by the batch; kernels per call): torchvision v2's
AugMix on a uint8 batch (one chain for the whole batch: its draws are made on the CPU), then each
form of ``AugMixBatch`` (severity 3, clean + 2 views) three ways: ``forward`` (the float32
``(clean, v1, v2)`` tuple), ``network input`` (``network_input(dtype=bf16, channels_last=True)``,
as the trainer calls it) and ``learnable fwd+bwd`` (``LearnableSeverity``, the network input,
then the backward of a gradient of its shape). And a ResNet-50 JSD step on the ``meta`` device at
the real batch (B source images = 3B network images, bf16, channels_last, forward + backward).

The prediction, on the named GPU: ``t_aug = B bytes / bandwidth + kernels x launch``, ``t_net =
3B / throughput`` at each throughput anchor (network images per second), share = ``t_aug /
(t_aug + t_net)``. It is a model: caches, overlapping kernels and launch queues are not in it.
``python benchmarks/augmix_share.py`` (a stage of ``make gpu-check``) measures the share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU the fused form's kernels run under Triton's interpreter, which is read when triton
# is first imported (after this): counted, not skipped.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info, markdown_table, photo_like, write_json  # noqa: E402

# The GPU the prediction prices bytes on, and the network's throughput anchors (images through
# the network per second, one GPU, ResNet-50 training, bf16/AMP).
GPU = {"name": "NVIDIA H100 SXM", "bandwidth_bytes_per_s": 3.35e12, "launch_s": 4e-6}
ANCHORS = {
    "mlperf": (7300.0, "MLPerf-class ResNet-50 training on an H100, ~7.3k images/s per GPU"),
    "pytorch_amp": (4600.0, "NVIDIA's PyTorch ResNet-50 AMP figure scaled to an H100, ~4.6k/s"),
}
STEP_BATCH = 128  # source images per GPU per step
GOALS = {"fused_forward_mb": 30.0, "fused_kernels": 24, "learnable_mb": 200.0, "share": 0.03}

_ALIASES = {"detach", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias", "lift"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_",
                    "exponential_", "geometric_", "cauchy_", "log_normal_"}  # fmt: skip
_GATHERS = {"index_select", "gather", "index", "take", "embedding"}
_SCATTERS = {"index_copy_": False, "index_put_": False, "scatter_": False,
             "scatter_add_": True, "index_add_": True, "scatter_reduce_": True}  # fmt: skip
_HOST_READ = "_local_scalar_dense"


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a stride-0 dimension counts once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class Tally:
    """What one counted region dispatched: bytes, kernels, host reads, and bytes per operator."""

    read: int = 0
    written: int = 0
    kernels: int = 0
    host_reads: int = 0
    by_op: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.read + self.written


class ByteCounter(TorchDispatchMode):
    """Counts the bytes and kernels of every dispatched operator (rules: module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.tally = Tally()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        read, written, kernel = operator_bytes(func, args, kwargs, out)
        name = func.overloadpacket.__name__
        if kernel:
            self.tally.kernels += 1
            self.tally.read += read
            self.tally.written += written
            self.tally.by_op[name] += read + written
        if name == _HOST_READ:
            self.tally.host_reads += 1
        return out


def operator_bytes(func, args, kwargs, out) -> tuple[int, int, bool]:
    """(bytes read, bytes written, launches a kernel) of one dispatched operator."""
    name = func.overloadpacket.__name__
    named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    if func.namespace == "augmix_gpu":
        read, written = FUSED_RULES[name](named, out)
        return read, written, True
    if func.is_view or name in _ALIASES or name in _ALLOCATIONS:
        return 0, 0, False
    if name == _HOST_READ:
        return args[0].element_size(), 0, True
    if name in _SCATTERS:
        source = named.get("source", named.get("src", named.get("values")))
        moved = distinct_bytes(source) if isinstance(source, torch.Tensor) else 0
        index = sum(distinct_bytes(t) for t in _tensors(named.get("index", named.get("indices"))))
        return moved * (2 if _SCATTERS[name] else 1) + index, moved, True
    write_only = {a.name for a in func._schema.arguments if a.is_out} | (
        {"self"} if name in _WRITE_ONLY_SELF else set()
    )
    read = 0
    for arg_name, value in named.items():
        if arg_name in write_only:
            continue
        for t in _tensors(value):
            if name in _GATHERS and arg_name in ("self", "weight", "input"):
                read += min(
                    distinct_bytes(t), sum(o.numel() for o in _tensors(out)) * t.element_size()
                )
            else:
                read += distinct_bytes(t)
    written = sum(distinct_bytes(t) for t in _tensors(out))
    return read, written, read + written > 0


# --- the fused form's kernels: what their loads and stores touch ---------------------------------

# fused_kernels' branch codes of the ops that need statistics, and the statistics each writes
_STATS_ELEMENTS = {1: 6, 2: 768, 6: 2}  # autocontrast: lo, span x 3; equalize: 3 LUTs; contrast


def _plane(a) -> int:
    return 3 * a["src"].shape[-2] * a["src"].shape[-1]


def _step_state(a) -> tuple[torch.Tensor, torch.Tensor]:
    """Which chains run at step t, and the kernel branch of the op each drew there."""
    ops, t = a["ops"], a["t"]
    running = a["depth"].reshape(-1) > t
    branch = a["optab"][ops[:, :, t, :].reshape(-1), 0]
    return running, branch


def _source_bytes(a, rows: torch.Tensor) -> int:
    """Step t's source images of the chains ``rows``: each source sample once at step 0."""
    if a["t"] == 0:
        samples = torch.arange(rows.numel())[rows] % a["src"].shape[0]
        return len(torch.unique(samples)) * _plane(a) * a["src"].element_size()
    return int(rows.sum()) * _plane(a) * a["buf"].element_size()


def _tangent_bytes(a, rows: torch.Tensor, read: bool) -> int:
    tangent = a["tangent"]
    if tangent is None or (read and a["t"] == 0):
        return 0
    return int(rows.sum()) * _plane(a) * tangent.element_size()


def _small(a, *names: str) -> int:
    return sum(distinct_bytes(a[n]) for n in names if isinstance(a.get(n), torch.Tensor))


def _stats_rule(a, out) -> tuple[int, int]:
    running, branch = _step_state(a)
    rows = running & torch.isin(branch, torch.tensor(list(_STATS_ELEMENTS)))
    contrast = running & (branch == 6)
    read = _source_bytes(a, rows) + _tangent_bytes(a, contrast, read=True)
    written = sum(_STATS_ELEMENTS[int(k)] for k in branch[rows]) * a["stats"].element_size()
    return read + _small(a, "ops", "depth", "optab"), written


def _step_rule(a, out) -> tuple[int, int]:
    running, branch = _step_state(a)
    used = sum(_STATS_ELEMENTS.get(int(k), 0) for k in branch[running])
    read = _source_bytes(a, running) + _tangent_bytes(a, running, read=True)
    read += used * a["stats"].element_size()
    read += _small(a, "ops", "depth", "level_u", "signs", "severity", "optab", "coef")
    written = int(running.sum()) * _plane(a) * a["buf"].element_size()
    return read, written + _tangent_bytes(a, running, read=False)


def _mix_rule(a, out) -> tuple[int, int]:
    chains = int((a["depth"] > 0).sum())
    per_chain = a["buf"].element_size() + (
        a["tangent"].element_size() if a["out_tangent"] is not None else 0
    )
    read = distinct_bytes(a["src"]) + chains * _plane(a) * per_chain
    read += _small(a, "depth", "weights", "mix", "norm")
    return read, distinct_bytes(a["out"]) + (
        distinct_bytes(a["out_tangent"]) if a["out_tangent"] is not None else 0
    )


def _grad_rule(a, out) -> tuple[int, int]:
    tangent = a["tangent"]
    views = tangent.shape[0] * tangent[0].numel() * a["grad"].element_size()
    return views + distinct_bytes(tangent), distinct_bytes(out)


FUSED_RULES: dict[str, Callable] = {
    "fused_stats": _stats_rule,
    "fused_step": _step_rule,
    "fused_mix": _mix_rule,
    "fused_grad": _grad_rule,
}


@contextmanager
def counting():
    """A ``ByteCounter`` whose tally also counts ``Tensor.tolist()`` (it reads memory without
    dispatching) as a host read."""
    original = torch.Tensor.tolist
    counter = ByteCounter()

    def tolist(t):
        if t.device.type != "meta":
            counter.tally.host_reads += 1
            counter.tally.kernels += 1
        return original(t)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter.tally
    finally:
        torch.Tensor.tolist = original


# --- the rows ------------------------------------------------------------------------------------


def _batch(size: int, n: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(photo_like(size, s)).permute(2, 0, 1) for s in range(n)])


def count_torchvision(x: torch.Tensor, severity: float) -> Tally:
    """torchvision v2's AugMix as bench_augment's row b runs it: clean + 2 views, normalised."""
    from torchvision.transforms import v2

    from augmix_gpu.augment.augmix import normalize_images

    tv2 = v2.AugMix(severity=int(severity), mixture_width=3, chain_depth=-1, alpha=1.0)
    normalize_images(x)  # the constants on the device once, as a training loop has them
    torch.manual_seed(0)
    with counting() as tally:
        for view in (x, tv2(x), tv2(x)):
            normalize_images(view)
    return tally


def count_form(strategy: str, mode: str, x: torch.Tensor, severity: float) -> Tally:
    """One AugMixBatch call of ``strategy`` (sampling included), ``mode`` as the table names it."""
    from augmix_gpu.augment.augmix import AugMixBatch
    from augmix_gpu.augment.severity import LearnableSeverity

    learnable = mode == "learnable fwd+bwd"
    sev = LearnableSeverity(initial_aug_severity=severity) if learnable else severity
    aug = AugMixBatch(severity=sev, strategy=strategy)
    aug(x[:1])  # tables on the device, first-call settings: outside the count
    net_kw = {"dtype": torch.bfloat16, "channels_last": True}
    shape = aug.network_input(x, **net_kw).detach()
    grad = torch.ones_like(shape)  # the network's gradient for the backward, made beforehand
    torch.manual_seed(0)  # every form and call counts the same draws
    with counting() as tally:
        if mode == "forward":
            aug(x)
        else:
            out = aug.network_input(x, **net_kw)
            if learnable:
                out.backward(grad)
    return tally


def count_network(batch: int, size: int) -> Tally:
    """A ResNet-50 JSD step on the meta device: 3 x ``batch`` images, bf16, channels_last,
    forward, the CE + JSD loss, backward (the optimiser's update is not counted)."""
    import torch.nn.functional as F
    from torchvision.models import resnet50

    model = resnet50().to(device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.empty(3 * batch, 3, size, size, device="meta", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    with counting() as tally:
        # losses.augmix_objective's operators (its autocast guard has no meta device)
        logp = F.log_softmax(model(x).float().view(3, batch, -1), dim=-1)
        log_m = torch.logsumexp(logp, dim=0) - 1.0986
        jsd = (logp.exp() * (logp - log_m)).sum(dim=2).mean()
        (F.nll_loss(logp[0], y) + 12.0 * jsd).backward()
    return tally


# --- the prediction and the report -----------------------------------------------------------------


def predict(mb_per_image: float, kernels: int, batch: int = STEP_BATCH) -> dict[str, float]:
    """AugMix's predicted share of the step at each throughput anchor (module docstring)."""
    t_aug = batch * mb_per_image * 1e6 / GPU["bandwidth_bytes_per_s"] + kernels * GPU["launch_s"]
    shares = {}
    for key, (throughput, _) in ANCHORS.items():
        t_net = 3 * batch / throughput
        shares[key] = t_aug / (t_aug + t_net)
    return {"augmix_ms": 1e3 * t_aug, **{f"share_{k}": v for k, v in shares.items()}}


def row(form: str, mode: str, tally: Tally, batch: int, host_reads: bool = True) -> dict:
    mb = tally.total / batch / 1e6
    top = {k: round(v / batch / 1e6, 2) for k, v in tally.by_op.most_common(8)}
    return {
        "form": form, "mode": mode, "mb_per_image": mb, "read_mb_per_image": tally.read / batch / 1e6,
        "written_mb_per_image": tally.written / batch / 1e6, "kernels_per_call": tally.kernels,
        "host_reads": tally.host_reads if host_reads else None, "mb_per_image_by_op": top,
        **predict(mb, tally.kernels),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    headers = ["form", "call", "MB / image", "kernels / call", "host reads",
               f"share @ {ANCHORS['mlperf'][0]:.0f}/s", f"share @ {ANCHORS['pytorch_amp'][0]:.0f}/s"]  # fmt: skip
    body = [
        [r["form"], r["mode"], f"{r['mb_per_image']:.1f}", r["kernels_per_call"],
         "—" if r["host_reads"] is None else r["host_reads"],
         f"{100 * r['share_mlperf']:.1f} %", f"{100 * r['share_pytorch_amp']:.1f} %"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, body)


def goals(rows: list[dict]) -> list[str]:
    """One line per goal of issue 21, met or not, from the fused rows."""
    by = {(r["form"], r["mode"]): r for r in rows}
    lines = []
    fwd, net, learn = (
        by.get(("fused", m)) for m in ("forward", "network input", "learnable fwd+bwd")
    )
    if fwd:
        ok = (
            fwd["mb_per_image"] <= GOALS["fused_forward_mb"]
            and fwd["kernels_per_call"] <= GOALS["fused_kernels"]
        )
        lines.append(f"fused forward: {fwd['mb_per_image']:.1f} MB, {fwd['kernels_per_call']} kernels, "
                     f"{fwd['host_reads']} host reads (goal <= 30 MB, <= 24, 0): {'met' if ok and not fwd['host_reads'] else 'NOT met'}")  # fmt: skip
    if net:
        lines.append(f"fused network input (bf16, channels_last): {net['mb_per_image']:.1f} MB (stretch <= 15 MB): "
                     f"{'met' if net['mb_per_image'] <= 15 else 'NOT met'}; predicted share {100 * net['share_mlperf']:.2f} % "
                     f"at MLPerf-class throughput (goal <= 3 %): {'met' if net['share_mlperf'] <= GOALS['share'] else 'NOT met'}")  # fmt: skip
    if learn:
        lines.append(f"fused learnable fwd+bwd: {learn['mb_per_image']:.1f} MB, {learn['host_reads']} host reads "
                     f"(goal <= 200 MB, 0): {'met' if learn['mb_per_image'] <= 200 and not learn['host_reads'] else 'NOT met'}")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4, help="source images per counted call")
    parser.add_argument("--severity", type=float, default=3.0)
    parser.add_argument(
        "--forms", default="grouped,static,fused", help="AugMixBatch forms to count"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="64 px, 1 source image: a smoke run (the shares are priced against 224 px anchors)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="bytes.json", help="JSON (bare names: benchmarks/results/)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch = 64, 1
    args.forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from augmix_gpu.augment.execute import fused_unavailable

    x = _batch(args.size, args.batch)
    rows = [
        row(
            "torchvision v2 AugMix",
            "forward",
            count_torchvision(x, args.severity),
            args.batch,
            False,
        )
    ]
    notes = []
    for form in args.forms:
        if form == "fused" and fused_unavailable("cpu") is not None:
            notes.append(f"fused skipped: {fused_unavailable('cpu')}")
            continue
        for mode in ("forward", "network input", "learnable fwd+bwd"):
            print(f"counting {form}, {mode} ...", flush=True)
            rows.append(row(form, mode, count_form(form, mode, x, args.severity), args.batch))
    net = count_network(STEP_BATCH, args.size)
    network = {"mb_per_source_image": net.total / STEP_BATCH / 1e6, "kernels": net.kernels,
               "bandwidth_bound_ms": 1e3 * net.total / GPU["bandwidth_bytes_per_s"],
               "anchor_ms": {k: 1e3 * 3 * STEP_BATCH / v for k, (v, _) in ANCHORS.items()}}  # fmt: skip
    print()
    print(table(rows))
    print(f"\nResNet-50 JSD step (meta, {STEP_BATCH} source = {3 * STEP_BATCH} network images, bf16, "
          f"channels_last, fwd + bwd): {network['mb_per_source_image']:.1f} MB per source image, "
          f"{net.kernels} kernels; bandwidth-bound {network['bandwidth_bound_ms']:.1f} ms vs the anchors' "
          f"{network['anchor_ms']['mlperf']:.1f} / {network['anchor_ms']['pytorch_amp']:.1f} ms")  # fmt: skip
    for line in goals(rows) + notes:
        print(line)
    path = write_json(args.out, {
        "benchmark": "bytes", "command": "python benchmarks/count_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "model": "bytes / bandwidth + kernels x launch; share = t_aug / (t_aug + 3B / throughput)",
        "gpu": GPU, "anchors": {k: {"images_per_s": v, "what": w} for k, (v, w) in ANCHORS.items()},
        "step_batch": STEP_BATCH, "rows": rows, "network": network, "goals": goals(rows), "notes": notes,
        "environment": environment_info(),
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
