"""The byte counter (benchmarks/count_bytes.py) on cases small enough to count by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import natural_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from augmix_share import main as augmix_share  # noqa: E402
from count_bytes import counting, predict  # noqa: E402

from augmix_gpu.augment.augmix import AugMixBatch, AugMixParams  # noqa: E402
from augmix_gpu.augment.execute import fused_unavailable  # noqa: E402


def test_an_elementwise_add_reads_two_tensors_and_writes_one():
    a, b = torch.rand(10, 7), torch.rand(10, 7)
    with counting() as tally:
        a + b
    assert (tally.read, tally.written, tally.kernels) == (2 * 70 * 4, 70 * 4, 1)
    assert tally.total == 3 * 70 * 4 and tally.by_op == {"add": 3 * 70 * 4}


def test_views_and_allocations_move_nothing_and_launch_nothing():
    a = torch.rand(4, 5)
    with counting() as tally:
        a.view(20), a.t(), a[1:], a.unsqueeze(0), a.detach(), a.split(2), torch.empty(3)
    assert (tally.read, tally.written, tally.kernels) == (0, 0, 0)


def test_an_expanded_scalar_counts_once_and_a_destination_is_not_read():
    a, s, out = torch.rand(8, 8), torch.rand(1).expand(8, 8), torch.empty(8, 8, dtype=torch.float64)
    with counting() as tally:
        a.mul(s)
    assert (tally.read, tally.written) == ((64 + 1) * 4, 64 * 4)
    with counting() as tally:
        out.copy_(a)  # reads float32, writes float64
        out.fill_(0.0)
    assert (tally.read, tally.written, tally.kernels) == (64 * 4, 2 * 64 * 8, 2)


def test_a_gather_reads_what_it_writes_and_host_reads_are_counted():
    src, idx = torch.rand(100, 10), torch.tensor([3, 7])
    with counting() as tally:
        src.index_select(0, idx)
        idx.sum().item()
        idx.tolist()
    assert tally.host_reads == 2
    # index_select: 20 source floats + 2 indices in, 20 floats out; sum: 2 in, 1 out; item: 1
    assert tally.read == 20 * 4 + 2 * 8 + 2 * 8 + 8
    assert tally.written == 20 * 4 + 8 and tally.kernels == 4


def test_the_prediction_reproduces_the_issues_static_figure():
    """Issue 21's table: static, ~600 MB and ~197 kernels per image -> 31 % of the step at
    MLPerf-class throughput (7.3k images/s), 22 % at 4.6k, on an H100 (3.35 TB/s, 4 us/launch)."""
    p = predict(600.0, 197)
    assert p["share_mlperf"] == pytest.approx(0.311, abs=2e-3)
    assert p["share_pytorch_amp"] == pytest.approx(0.221, abs=2e-3)
    assert p["augmix_ms"] == pytest.approx(1e3 * (128 * 600e6 / 3.35e12 + 197 * 4e-6))


@pytest.mark.skipif(fused_unavailable("cpu") is not None, reason="needs TRITON_INTERPRET=1")
def test_the_fused_kernels_count_only_the_chains_still_running():
    """Two chains of one image (8x8): chain 0 equalizes (depth 1), chain 1 has depth 0. Step 0
    reads the source once and writes one float16 image; steps 1 and 2 touch no image; the mix
    reads the source and one chain, and writes the clean image and the view in float32."""
    aug = AugMixBatch(strategy="fused", num_views=1, width=2, normalize=False)
    x = natural_batch(1, 8)
    ops = torch.full((1, 2, 3, 1), aug.op_names.index("equalize"))
    p = AugMixParams(ops, torch.tensor([[[1], [0]]]), torch.rand(1, 2, 3, 1),
                     torch.ones(1, 2, 3, 1), torch.tensor([[[0.5, 0.5]]]), torch.ones(1, 1))  # fmt: skip
    aug.apply(x, p, 3.0)  # the first call builds the op table
    with counting() as tally:
        aug.apply(x, p, 3.0)
    image = 3 * 8 * 8  # bytes of one uint8 image
    table = {"ops": 6 * 8, "depth": 2 * 8, "level_u": 6 * 4, "signs": 6 * 4}
    table |= {"optab": 9 * 2 * 4, "coef": 18 * 3 * 4, "weights": 2 * 4, "mix": 4, "norm": 6 * 4}
    stats_small = table["ops"] + table["depth"] + table["optab"]
    step_small = stats_small + table["level_u"] + table["signs"] + table["coef"]
    mix_small = table["depth"] + table["weights"] + table["mix"] + table["norm"]
    lut = 3 * 256 * 4
    read = (image + stats_small) + (image + lut + step_small)  # step 0: statistics, step
    read += 2 * (stats_small + step_small)  # steps 1, 2: no chain runs
    read += image + 2 * image + mix_small  # the mix: the source, one float16 chain
    assert tally.kernels == 7 and tally.host_reads == 0
    assert tally.read == read
    assert tally.written == lut + 2 * image + 2 * 4 * image


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would time")
def test_the_share_script_without_cuda_says_so_in_one_line_and_exits_0(capsys):
    """The GPU check runs ``python benchmarks/augmix_share.py --quick`` as a stage."""
    assert augmix_share(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
