"""augmix-gpu: batched, per-sample AugMix on tensors with a learnable severity.

    from augmix_gpu import AugMixBatch, LearnableSeverity, jsd_loss

Importing the package is cheap and CPU-safe: the public names load their modules on first use,
and no DALI or CUDA work ever happens at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AugMixBatch": ".augment.augmix",
    "AugMixParams": ".augment.augmix",
    "normalize_images": ".augment.augmix",
    "OPS": ".augment.ops",
    "get_ops": ".augment.ops",
    "LearnableSeverity": ".augment.severity",
    "jsd_loss": ".augment.losses",
    "augmix_objective": ".augment.losses",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'augmix_gpu' has no attribute {name!r}")
