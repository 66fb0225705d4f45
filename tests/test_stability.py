"""ImageNet-P metrics against hand computation on constructed prediction sequences (both comparison
rules, the difficulty steps), the summary's partial/normalised figures, and exact once-per-sequence
counts over 1, 2 and 3 shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from augmix_gpu import protocols
from augmix_gpu.distributed import DistEnv
from augmix_gpu.eval import metrics as rb
from augmix_gpu.eval.imagenet_p import (
    local_sequence_counts,
    rank_positions,
    reduce_sequence_counts,
    sequence_statistics,
)

C = 10


def onehot_logits(preds: list[int]) -> torch.Tensor:
    """A frame per prediction: that class far ahead, the rest in index order behind it."""
    x = -torch.arange(C, dtype=torch.float32).repeat(len(preds), 1) * 0.01
    x[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return x


def stats(preds: list[int], perturbation: str, difficulty: int):
    pairs = torch.tensor(protocols.comparison_pairs(len(preds), perturbation, difficulty))
    flips, top5, zipf, top1 = sequence_statistics(onehot_logits(preds), pairs)
    assert top1.tolist() == preds
    return int(flips), len(pairs)


def test_comparison_pairs_follow_test_py():
    assert protocols.comparison_pairs(4, "shot_noise", 1) == [(0, 1), (0, 2), (0, 3)]
    assert protocols.comparison_pairs(4, "shot_noise", 3) == [
        (0, 1),
        (0, 2),
        (0, 3),
    ]  # folder, not step
    assert protocols.comparison_pairs(4, "rotate", 1) == [(0, 1), (1, 2), (2, 3)]
    # step 2: chains 0,2,4 and 1,3,5
    assert protocols.comparison_pairs(6, "tilt", 2) == [(0, 2), (2, 4), (1, 3), (3, 5)]
    assert protocols.comparison_pairs(7, "scale", 3) == [(0, 3), (3, 6), (1, 4), (2, 5)]
    with pytest.raises(ValueError, match="needs at least 4"):
        protocols.comparison_pairs(3, "rotate", 3)
    with pytest.raises(ValueError, match="needs at least 2"):
        protocols.comparison_pairs(1, "gaussian_noise", 1)
    assert protocols.perturbation_folder("gaussian_noise", 2) == "gaussian_noise_2"
    assert protocols.perturbation_folder("rotate", 2) == "rotate"
    assert protocols.perturbation_folder("speckle_noise", 1) == "speckle_noise"


def test_flips_by_hand_both_rules_and_steps():
    seq = [0, 1, 1, 1, 1, 1]
    assert stats(seq, "rotate", 1) == (1, 5)  # frame vs previous: one change
    assert stats(seq, "gaussian_noise", 1) == (5, 5)  # frame vs first: every later frame differs
    assert stats(seq, "rotate", 2) == (1, 4)  # chains 0,2,4 = (0,1,1) and 1,3,5 = (1,1,1)
    alt = [0, 1, 2, 0, 1, 2, 0]
    assert stats(alt, "translate", 1) == (6, 6)
    assert stats(alt, "translate", 3) == (0, 4)  # every chain constant
    assert stats(alt, "shot_noise", 1) == (4, 6)  # frames 1,2,4,5 differ from frame 0


def test_top5_and_zipf_distance_by_hand():
    base = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0]])  # order: classes 0..9
    swap = torch.tensor([[8.0, 9, 7, 6, 5, 4, 3, 2, 1, 0]])  # classes 0 and 1 swap places
    pairs = torch.tensor([[0, 1]])
    _, t5, zipf, _ = sequence_statistics(torch.cat([base, swap]), pairs)
    assert int(t5) == 2  # |0-1| + |1-0|
    assert float(zipf) == pytest.approx(abs(1 - 1 / 2) * 1 + abs(1 / 2 - 1) / 2)  # 0.75
    # Class 0 drops to position 7: counts as 5 (out of the top 5); classes 1..4 move up one.
    drop = torch.tensor([[2.5, 9, 8, 7, 6, 5, 4, 3, 2, 1]])
    _, t5, zipf, _ = sequence_statistics(torch.cat([base, drop]), pairs)
    assert int(t5) == 5 + 1 + 1 + 1 + 1
    want = abs(1 - 1 / 8) + sum(abs(1 / (k + 1) - 1 / k) / (k + 1) for k in range(1, 8))
    assert float(zipf) == pytest.approx(want)
    # Identical frames: nothing moves.
    _, t5, zipf, _ = sequence_statistics(torch.cat([base, base]), pairs)
    assert int(t5) == 0 and float(zipf) == 0.0


def test_ties_rank_like_scipy_ordinal():
    """Equal logits: the lower class index ranks first, as rankdata(-x, 'ordinal') and argmax."""
    x = torch.tensor([[1.0, 3, 3, 0, 3]])
    order, position = rank_positions(x)
    assert order.tolist() == [[1, 2, 4, 0, 3]]
    assert position.tolist() == [[3, 0, 1, 4, 2]]


def _counts(per_seq: list[tuple[int, int, int, float]]) -> dict[str, np.ndarray]:
    f, c, t, z = map(np.array, zip(*per_seq))
    return {"flips": f, "comparisons": c, "top5": t, "zipf": z}


def test_summary_is_a_mean_of_sequence_means_and_partial():
    # Two sequences of unequal length: 1/1 and 0/3 flips -> FP = (1 + 0) / 2 = 50 %, not 25 %.
    counts = {"rotate": {1: _counts([(1, 1, 2, 0.5), (0, 3, 3, 0.3)])}}
    s = rb.summarize_perturbations(counts)
    assert s["flip_probability"]["rotate"]["1"] == pytest.approx(50.0)
    assert s["top5_distance"]["rotate"]["1"] == pytest.approx((2 / 1 + 3 / 3) / 2)
    assert s["zipf_distance"]["rotate"]["1"] == pytest.approx((0.5 + 0.1) / 2)
    assert s["counts"]["rotate"]["1"] == {"sequences": 2, "flips": 1, "comparisons": 4}
    assert s["partial"] and "9 of the 10" in s["partial_reason"]
    assert s["mfr"] is None and s["mean_flip_probability_partial"] == pytest.approx(50.0)
    assert "mean_flip_probability" not in s
    # No AlexNet figures are published: FR is unavailable, never made up.
    assert s["fr"] == {} and s["normalisation"]["available"] is False
    assert "issue #49" in s["normalisation"]["reason"]


def test_summary_with_a_reference_gives_fr_and_mfr():
    counts = {p: {1: _counts([(1, 4, 4, 0.0), (1, 4, 8, 0.0)])} for p in protocols.PERTURBATIONS}
    counts["shear"] = {1: _counts([(4, 4, 0, 0.0)])}  # a validation perturbation: reported apart
    ref = {p: {"flip_probability": 50.0, "top5_distance": 3.0} for p in protocols.PERTURBATIONS}
    s = rb.summarize_perturbations(counts, ref, "alexnet.json")
    assert not s["partial"]
    assert s["mean_flip_probability"] == pytest.approx(25.0)
    assert s["fr"]["rotate"] == pytest.approx(50.0) and s["mfr"] == pytest.approx(50.0)
    assert s["t5d_rate"]["tilt"] == pytest.approx(100 * 1.5 / 3) and s["mt5d"] == pytest.approx(50)
    assert s["extra_mean_flip_probability"] == pytest.approx(100.0)
    assert s["normalisation"] == {"reference": "alexnet.json", "available": True, "reason": None}
    assert rb.reference_from_results({"imagenet_p": s})["rotate"]["flip_probability"] == 25.0


# ----------------------------------------------------------------------------- sharding


class ShardLoader:
    """Sequences of random logits-as-images, sharded like SequenceLoader (r, r+W, ...)."""

    def __init__(self, n: int, rank: int, world: int, batch: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        self.lengths = [int(x) for x in torch.randint(5, 9, (n,), generator=g)]
        self.images = [torch.randint(0, 256, (t, 3, 2, 2), generator=g, dtype=torch.uint8)
                       for t in self.lengths]  # fmt: skip
        self.own = list(range(rank, n, world))
        self.batch, self.num_sequences = batch, n

    def __len__(self) -> int:
        return -(-len(self.own) // self.batch)

    def paths(self, idx):
        return [f"seq{i}" for i in idx]

    def epoch(self, epoch: int = 0):
        for k in range(0, len(self.own), self.batch):
            ids = self.own[k : k + self.batch]
            yield (torch.cat([self.images[i] for i in ids]), torch.tensor([i % 3 for i in ids]),
                   torch.tensor(ids), torch.tensor([self.lengths[i] for i in ids]))  # fmt: skip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, C)).eval()


@pytest.mark.parametrize("perturbation,difficulty", [("rotate", 2), ("gaussian_noise", 1)])
def test_counts_are_exact_over_1_2_3_shards(perturbation, difficulty):
    model, n = _model(), 11
    results = {}
    for world in (1, 2, 3):
        total = None
        for rank in range(world):
            env = DistEnv(rank, rank, world, torch.device("cpu"), None)  # sum by hand below
            loader = ShardLoader(n, rank, world)
            slots = local_sequence_counts(model, loader, env, perturbation, difficulty)
            total = slots if total is None else {k: total[k] + v for k, v in slots.items()}
        one = DistEnv(0, 0, 1, torch.device("cpu"), None)
        results[world] = reduce_sequence_counts(total, one, f"{world} shards")
    for world in (2, 3):
        for name in ("flips", "comparisons", "top5", "zipf", "predictions", "labels"):
            np.testing.assert_array_equal(getattr(results[world], name), getattr(results[1], name))
    assert results[1].flips.sum() > 0 and results[1].frames == sum(ShardLoader(n, 0, 1).lengths)


def test_a_sequence_counted_twice_is_refused():
    model, env = _model(), DistEnv(0, 0, 1, torch.device("cpu"), None)
    a = local_sequence_counts(model, ShardLoader(5, 0, 1), env, "rotate", 1)
    b = local_sequence_counts(model, ShardLoader(5, 1, 2), env, "rotate", 1)  # overlaps a
    total = {k: a[k] + b[k] for k in a}
    with pytest.raises(RuntimeError, match=r"sequence\(s\) \[1, 3\] counted \[2, 2\] times"):
        reduce_sequence_counts(total, env, "overlap")
