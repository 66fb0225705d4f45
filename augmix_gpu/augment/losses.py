"""The AugMix objective: cross-entropy on the clean view plus the Jensen-Shannon consistency loss.

Sources: Hendrycks et al., "AugMix" (ICLR 2020), eq. for JS(p_orig; p_aug1; p_aug2) and the
official google-research/augmix ``imagenet.py`` / ``cifar.py`` training step (lambda = 12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG3 = math.log(3.0)


def _check_logits(*logits: Tensor) -> None:
    shape = logits[0].shape
    for i, t in enumerate(logits):
        if t.dim() != 2:
            raise ValueError(
                f"expected logits of shape [B, classes], got shape {tuple(t.shape)} for input {i}"
            )
        if t.shape != shape:
            raise ValueError(
                f"all logits must share one shape, got {tuple(shape)} and {tuple(t.shape)} "
                f"(input {i}): pass the clean and the two augmented logits of the same batch"
            )


def _at_least_fp32(z: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged (fp64 keeps gradcheck exact)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def jsd_loss(logits_clean: Tensor, logits_v1: Tensor, logits_v2: Tensor) -> Tensor:
    """AugMix's Jensen-Shannon consistency, ``mean_b (1/3) sum_i KL(p_i || M)``, M = mean_i p_i.

    Computed in log space and fp32 (autocast disabled): ``log p_i = log_softmax(z_i)``,
    ``log M = logsumexp_i(log p_i) - log 3``, ``KL(p_i||M) = sum_c p_i (log p_i - log M)``. No
    clamp is needed: saturated fp16/bf16 logits (e.g. +-1e4) give finite values and gradients,
    and the result lies in [0, log 3] nats.

    The official code (google-research/augmix) computes the same quantity in probability space as
    ``F.kl_div(log(clamp(M, 1e-7, 1)), p_i, reduction='batchmean')``; the clamp changes it only when
    M < 1e-7. The reference learnable-severity script computed KL(M || p_i) (arguments reversed),
    which is not the JS divergence; we follow AugMix.

    Shape: three ``[B, C]`` tensors -> a scalar fp32 tensor (fp64 for fp64 inputs).
    """
    _check_logits(logits_clean, logits_v1, logits_v2)
    with torch.autocast(device_type=logits_clean.device.type, enabled=False):
        logp = torch.stack(
            [F.log_softmax(_at_least_fp32(z), dim=1) for z in (logits_clean, logits_v1, logits_v2)]
        )  # [3, B, C]
        log_m = torch.logsumexp(logp, dim=0) - _LOG3  # [B, C]
        kl_each = (logp.exp() * (logp - log_m)).sum(dim=2)  # [3, B], KL(p_i || M) in nats
        return kl_each.mean(dim=0).mean()


@dataclass
class LossParts:
    """Terms of the objective (scalar tensors); ``jsd``/``kl`` are zeros when unused.

    ``kl`` is the raw KL in nats (before ``beta_augmenter_reg`` and ``kl_scale``).
    """

    total: Tensor
    ce: Tensor
    jsd: Tensor
    kl: Tensor


def augmix_objective(
    logits: Tensor,
    targets: Tensor,
    *,
    jsd: bool,
    beta_jsd: float = 12.0,
    kl: Tensor | None = None,
    beta_augmenter_reg: float = 0.0,
    kl_scale: float = 1.0,
) -> LossParts:
    """Total training loss, with its terms for logging.

    ``jsd=True``: ``logits`` is ``[3B, C]`` for the concatenated ``[clean; view1; view2]`` batch
    and ``total = CE(clean, targets) + beta_jsd * JSD`` (AugMix; lambda = 12 in the paper).
    ``jsd=False``: ``total = CE(logits, targets)`` over the one view the caller fed.
    ``kl`` (a LearnableSeverity's ``kl()``): ``total += beta_augmenter_reg * kl * kl_scale``. The
    reference learnable-severity script divides the KL by the batch size; the trainer reproduces
    this with ``kl_scale = 1 / global_batch``, which makes the KL a per-example cost like the CE.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [N, classes], got shape {tuple(logits.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"expected targets of shape [B], got shape {tuple(targets.shape)}")
    zero = logits.new_zeros((), dtype=torch.float32)
    if jsd:
        b = targets.shape[0]
        if logits.shape[0] != 3 * b:
            raise ValueError(
                f"jsd=True expects logits for [clean; view1; view2], i.e. {3 * b} rows for "
                f"{b} targets, got {logits.shape[0]}"
            )
        clean, v1, v2 = logits.split(b)
        ce = F.cross_entropy(_at_least_fp32(clean), targets)
        js = jsd_loss(clean, v1, v2)
        total = ce + beta_jsd * js
    else:
        if logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"jsd=False expects one row of logits per target, got {logits.shape[0]} rows "
                f"for {targets.shape[0]} targets"
            )
        ce = F.cross_entropy(_at_least_fp32(logits), targets)
        js = zero
        total = ce
    if kl is None:
        kl_raw = zero
    else:
        kl_raw = kl.float()
        total = total + beta_augmenter_reg * kl_scale * kl_raw
    return LossParts(total=total, ce=ce, jsd=js, kl=kl_raw)
