"""augmix-gpu: batched, per-sample AugMix on tensors with a learnable severity.

Importing the package is cheap and CPU-safe: no DALI, no CUDA work happens here.
"""

__version__ = "0.1.0"
