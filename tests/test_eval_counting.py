"""evaluate_loader counts with masks: no host synchronisation per batch.

On a GPU, boolean indexing (`nll[valid]`), `.item()`, `.tolist()` or `bool(t)` inside the loop
each wait for the device to finish the batch before the next can be queued. The number of such
operations must not grow with the number of batches (counted by a `TorchFunctionMode`, so the
test runs on the CPU), and padding must still be masked out.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from augmix_gpu.distributed import DistEnv
from augmix_gpu.eval.loop import evaluate_loader

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.Tensor.cpu,
}


class CountSyncs(TorchFunctionMode):
    """Counts calls whose result needs the device's values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.count += 1
        elif func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.count += 1
        return func(*args, **kwargs)


class Loader:
    """`batches` batches of 4, the last one half padding; labels all 0."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.num_samples = 4 * batches - 2

    def __len__(self) -> int:
        return self.batches

    def epoch(self, _epoch: int):
        g = torch.Generator().manual_seed(0)
        for b in range(self.batches):
            images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
            valid = torch.tensor([True, True] + [b < self.batches - 1] * 2)
            yield images, torch.zeros(4, dtype=torch.long), valid


def _run(batches: int) -> tuple[int, int]:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with CountSyncs() as mode:
        result = evaluate_loader(model, Loader(batches), ENV, progress=False)
    assert result.n == 4 * batches - 2 and len(result.confidences) == result.n
    return mode.count, result.n


def test_evaluate_loader_synchronises_a_constant_number_of_times():
    few, _ = _run(2)
    many, _ = _run(9)
    assert few == many, f"{few} host syncs for 2 batches, {many} for 9: one per batch crept in"
