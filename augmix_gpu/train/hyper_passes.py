"""The passes every held-out severity estimator takes: the held-out loss (and its gradient) and
the training gradient, in fp32 whatever the training precision, with BatchNorm as each needs.

Why one module: the one-step lookaheads (lookahead.py) and the horizon pair (horizon.py) score
the network the same way, so their numbers can be compared; under DDP each reduces over ranks
here, once per pass (one flat all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..augment.losses import augmix_objective
from ..distributed import DistEnv, all_reduce_sum


@dataclass
class Hypergradient:
    """One hypergradient evaluation, as 0-d tensors on the device (read at logging steps only):
    the held-out loss at w', d L_val / d (mu, log_sigma), and whether all of it is finite."""

    heldout_loss: Tensor
    grad_mu: Tensor
    grad_log_sigma: Tensor
    finite: Tensor


class HeldoutBatch(NamedTuple):
    """This rank's share of one global held-out batch: normalised images ``[H,3,h,w]``, their
    labels, and which slots are real samples (False: padding, so that ranks hold equal shares)."""

    images: Tensor
    labels: Tensor
    valid: Tensor


def split_like(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def flatten_like(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` (a missing gradient as zeros): one all-reduce for all."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for p, t in zip(like, tensors)]
    )


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """Sum of squares over a list of tensors, in float64."""
    return sum((t.double() ** 2).sum() for t in tensors)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (running BatchNorm statistics, none updated), then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def masked_ce_sum(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Sum of the cross-entropy over the valid (non-padding) samples, in fp32 at least, no host sync."""
    ce = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none"
    )
    return (ce * valid.to(ce.dtype)).sum()


def fp32_network(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``run`` (the network) in fp32 whatever the training precision (autocast off inside): a
    second derivative in bf16 carries 8 bits of mantissa, less than the signal of one update."""

    def fp32(x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # x: fp32 views, as AugMix makes
            return run(x)

    return fp32


@contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalising by the batch's statistics, as in train mode, without updating its
    running statistics (nothing is written: what torch.func's transforms require)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # train mode + no tracking: batch statistics, no update
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def rank_mean(values: Tensor, env: DistEnv) -> Tensor:
    """The mean of ``values`` over ranks (a copy; the tensor itself is left as it is)."""
    out = values.clone()
    all_reduce_sum(out, env)
    return out / env.world_size


def training_gradient(
    net, named, views, labels, beta_jsd: float, env: DistEnv, model: nn.Module | None = None
) -> list[Tensor]:
    """grad_w of the training loss (CE + JSD) of ``views`` at the current weights, averaged over
    ranks as DDP averages the step's: fp32, BatchNorm on the batch's statistics, none updated.
    ``model``: a copy of the network that trains (the horizon pair's; ``named`` its parameters),
    whose BatchNorm statistics follow its batches as the run's do."""
    params = [p for _, p in named]
    frozen = batch_statistics_only(net.model) if model is None else nullcontext()
    with torch.enable_grad(), frozen:
        logits = net.classify(views, model=fp32_network(net.model if model is None else model))
        loss = augmix_objective(logits, labels, jsd=True, beta_jsd=beta_jsd).total
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = flatten_like(list(grads), params)
    all_reduce_sum(flat, env)
    return split_like(flat / env.world_size, params)


def heldout_loss_at(net, weights, heldout: HeldoutBatch, env: DistEnv, model=None) -> Tensor:
    """The mean held-out CE of the network at ``weights`` ({name: tensor}; None: its own), over
    the global held-out batch: eval mode (running BatchNorm statistics), fp32. ``model``: another
    copy of the network to score (the horizon pair's), default ``net.model``."""
    images, labels, valid = heldout
    model = net.model if model is None else model
    run = fp32_network(
        model if weights is None else lambda x: functional_call(model, weights, (x,))
    )
    with eval_mode(model):
        loss_sum = masked_ce_sum(net.classify(images, model=run), labels, valid)
    flat = torch.stack([loss_sum, valid.sum().to(loss_sum.dtype)])
    all_reduce_sum(flat, env)
    return flat[0] / flat[1].clamp_min(1.0)


def heldout_gradient(net, params, heldout: HeldoutBatch, env: DistEnv) -> tuple[Tensor, Tensor]:
    """1. v = grad_w of the mean held-out CE at w', over the global held-out batch, and that CE.

    Eval mode: the held-out images are scored as at test time (running BatchNorm statistics, none
    updated)."""
    images, labels, valid = heldout
    model = net.model
    with eval_mode(model), torch.enable_grad():
        loss_sum = masked_ce_sum(net.classify(images, model=fp32_network(model)), labels, valid)
        grads = torch.autograd.grad(loss_sum, params, allow_unused=True)
    counts = torch.stack([loss_sum.detach(), valid.sum().to(loss_sum.dtype)])
    flat = torch.cat([flatten_like(list(grads), params), counts])
    all_reduce_sum(flat, env)
    count = flat[-1].clamp_min(1.0)
    return flat[:-2] / count, flat[-2] / count
