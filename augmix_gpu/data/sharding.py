"""Which sample indices a rank reads in an epoch: pure functions of (n, batch, rank, world, seed, epoch).

Why we shard ourselves instead of using DALI's `random_shuffle`/`shard_id`: DALI shuffles through a
buffer of `initial_fill` samples (not a global permutation) and keeps its shuffle state inside the
pipeline, so epoch `e` cannot be reproduced by a fresh process, nor resumed at step `k`. Here the
order is one global permutation drawn from (seed, epoch), identical on every rank, then cut by
*global* rank (a trap DALI users report: sharding by the local rank makes every node read the
same files).
"""

from __future__ import annotations

import numpy as np


def _check(n: int, batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}: "
            "pass the GLOBAL rank (RANK), not LOCAL_RANK"
        )
    if n < 1:
        raise ValueError(f"the dataset is empty (n={n})")


def stream_seed(*keys: int) -> int:
    """A 31-bit seed (DALI takes a non-negative int) derived from integer keys, e.g. (seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


def train_steps(n: int, batch_size: int, world_size: int, keep_last: bool = False) -> int:
    """Steps per epoch for every rank: the ragged tail (n mod world*batch) is dropped, or with
    ``keep_last`` trained on as one more, smaller step (:func:`last_batch_size` per rank)."""
    full = n // (batch_size * world_size)
    return full + (1 if keep_last and last_batch_size(n, batch_size, world_size) else 0)


def last_batch_size(n: int, batch_size: int, world_size: int) -> int:
    """Each rank's share of the ragged tail: ``(n mod world*batch) // world``, equal on every rank
    so that DDP's ranks stay in step; the ``(n mod world*batch) mod world`` (< world) images left
    over are dropped. 0 when the tail is empty. cifar.py on one GPU: 50,000 mod 128 = 80."""
    return (n % (batch_size * world_size)) // world_size


def train_indices(
    n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
    keep_last: bool = False,
) -> np.ndarray:  # fmt: skip
    """This rank's sample indices for `epoch`, batch after batch: `[steps * batch_size]`, plus
    with `keep_last` the rank's share of the tail (:func:`last_batch_size`) as a last batch.

    The permutation depends on (seed, epoch) only, so all ranks agree on it; rank r takes every
    `world_size`-th sample starting at r, so the shards are disjoint and equally long.
    """
    _check(n, batch_size, rank, world_size)
    full = n // (batch_size * world_size)
    if train_steps(n, batch_size, world_size, keep_last) == 0:
        raise ValueError(
            f"{n} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} rank(s): lower the batch size or add data"
        )
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(n)
    tail = last_batch_size(n, batch_size, world_size) * world_size if keep_last else 0
    kept = perm[: full * batch_size * world_size + tail]
    return kept[rank::world_size]


def eval_indices(
    n: int, batch_size: int, rank: int, world_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """This rank's indices in file order, padded to full batches, with a validity mask.

    Rank r owns samples r, r+W, r+2W, ... (so the shards partition the set); every rank takes
    the same number of steps, `ceil(ceil(n/W)/batch)`, so collectives inside evaluation cannot
    hang. Padding repeats a real index with `valid=False` (a trap DALI users report: padded
    samples counted twice). Returns (indices, valid, num_real).
    """
    _check(n, batch_size, rank, world_size)
    own = np.arange(rank, n, world_size)
    per_rank = -(-n // world_size)
    steps = -(-per_rank // batch_size)
    total = steps * batch_size
    pad_with = own[-1] if len(own) else 0
    indices = np.full(total, pad_with, dtype=np.int64)
    indices[: len(own)] = own
    valid = np.zeros(total, dtype=bool)
    valid[: len(own)] = True
    return indices, valid, len(own)
