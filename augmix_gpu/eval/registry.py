"""The robustness benchmarks, one line each: evaluate.py's flags, the evaluation order, the reports.

Adding a benchmark: write its module (``BENCHMARK = benchmark.Benchmark(...)``; the four folder
benchmarks show the smallest form) and add it to this tuple. Its flag ``--<name> DIR``, its place
in the run (after the clean set, in this order), its block in the results JSON, its headline and
its report lines follow from that line.
"""

from __future__ import annotations

from . import cifar_c, imagenet_a, imagenet_c, imagenet_p, imagenet_r, imagenet_sketch, imagenet_v2
from .benchmark import Benchmark

BENCHMARKS: tuple[Benchmark, ...] = (
    imagenet_c.BENCHMARK,
    cifar_c.BENCHMARK,
    imagenet_p.BENCHMARK,
    imagenet_r.BENCHMARK,
    imagenet_a.BENCHMARK,
    imagenet_v2.BENCHMARK,
    imagenet_sketch.BENCHMARK,
)
