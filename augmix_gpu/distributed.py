"""torchrun environment, process group and rank helpers.

torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK) is the engine; a plain
``python train.py`` is a world of one. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: no process group (world of one)
    # A gloo group for small host-side agreements (the stop flag): on NCCL, a collective on a
    # device tensor read back to the host would drain the GPU's queue every step. None: the
    # default group (gloo already, or no group).
    host_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes files and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cuda_usable() -> tuple[bool, str]:
    """(torch can use CUDA, why not): torch explains a failed initialisation (an old driver, say)
    in a warning, which becomes part of our message instead of scrolling past."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    reasons = [
        str(w.message).splitlines()[0].split("(")[0].strip()
        for w in caught
        if "CUDA" in str(w.message)
    ]
    if not ok and not reasons and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        reasons = [f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"]
    return ok, "; ".join(reasons)


def resolve_device(device: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """'auto' picks this rank's GPU when CUDA is available, else the CPU.

    Why it refuses instead of falling back: with several processes per node (torchrun
    --nproc_per_node > 1) the user meant one GPU each; 8 gloo ranks on the CPU would "train" at a
    thousandth of the speed with nothing but "on cpu" in a log line to say so. `--device cpu`
    asks for exactly that and is honoured.
    """
    if device == "auto":
        ok, why = _cuda_usable()
        if not ok and local_world_size > 1:
            raise ValueError(
                f"{local_world_size} processes on this node but CUDA is not usable "
                f"(torch.cuda.is_available() is False{': ' + why if why else ''}): fix the "
                f"driver / CUDA_VISIBLE_DEVICES, or pass --device cpu to run {local_world_size} "
                "gloo processes on the CPU"
            )
        device = "cuda" if ok else "cpu"
    if device in ("cuda", "gpu"):
        ok, why = _cuda_usable()
        if not ok:
            raise ValueError(
                "--device cuda was requested but CUDA is not available"
                f"{' (' + why + ')' if why else ''}: use --device cpu"
            )
        count = torch.cuda.device_count()
        if local_world_size > count:
            raise ValueError(
                f"{local_world_size} processes on this node but only {count} GPU(s) visible: "
                f"launch torchrun --nproc_per_node={count} (one process per GPU)"
            )
        return torch.device("cuda", local_rank % count)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'")


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Keep a restarted worker group off the keys its predecessor left in torchrun's store.

    torchrun (c10d rendezvous, torch 2.5+) serves one TCPStore for the whole job and the workers'
    process group keeps its keys there under fixed names, so after ``--max-restarts`` restarts
    the workers the new group can read the dead group's addresses: measured here with gloo, it
    hangs or fails with "Connection refused" (pytorch/pytorch#135712). With one agent (a single
    node) TORCHELASTIC_RESTART_COUNT is the same on every worker, so it names a fresh key space.
    Across nodes the agents count restarts apart; there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    on every node's torchrun gives each restart its own store (README, "Faults and restarts").
    """
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or _env_int("GROUP_WORLD_SIZE", 0) != 1
    ):
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 0),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    prefix = f"augmix_gpu/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{attempt}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world_size}


def restart_hazard() -> str | None:
    """Why torchrun's restarts of this job may not come back, or None (see _restart_safe_store)."""
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and _env_int("GROUP_WORLD_SIZE", 1) > 1
        and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0
    ):
        return (
            "torchrun shares its rendezvous store with the workers of several nodes: a restarted "
            "worker group can hang or fail to connect (pytorch/pytorch#135712); launch torchrun "
            "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node"
        )
    return None


def start_process_group(**kwargs) -> None:
    """``dist.init_process_group(**kwargs)``, with torch._dynamo imported first.

    Why: importing torch._dynamo once a process group exists leaves it 10 references to the
    default group that are never dropped (measured, torch 2.14.1; torch's optimisers and DDP import
    it on first use). The group then outlives ``destroy_process_group``, its gloo threads
    (``pt_gloo_runloop``, ``gloo_tcp_loop``) still run when the interpreter tears down, and now
    and then a finished rank aborts on the way out ("terminate called without an active
    exception", SIGABRT; torchrun then fails the whole job). Imported before, it holds nothing and
    the group ends in ``cleanup``. tests/test_distributed_exit.py checks both orders.
    """
    import torch._dynamo  # noqa: F401

    dist.init_process_group(**kwargs)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Read the torchrun environment and start the process group when WORLD_SIZE > 1."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    # torchrun sets LOCAL_WORLD_SIZE; other launchers: at least this rank's index + 1.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", local_rank + 1)
    dev = resolve_device(device, local_rank, local_world_size)
    backend = None
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            start_process_group(
                backend=backend,
                timeout=timeout,
                **_restart_safe_store(rank, world_size, timeout),
                **({"device_id": dev} if dev.type == "cuda" else {}),
            )
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistEnv(rank, local_rank, world_size, dev, backend, host_group)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (also a barrier): e.g. an error found by rank 0 alone."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """One picklable object per rank, in rank order (rank-local RNG states, skipped files)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if ``flag`` is True on any rank; host to host (gloo), no device sync."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.host_group)
    return bool(t.item())


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (counts, not means, so every sample weighs the same)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate a 1-D tensor of per-rank length over ranks (rank order)."""
    if not env.distributed:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor.reshape(-1)
    gathered = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])
