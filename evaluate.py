"""Clean + robustness benchmarks (ImageNet-C, CIFAR-C, ImageNet-P, -R, -A, -V2, -Sketch):
results JSON, markdown, pictures.

One device:
    python evaluate.py --ckpt_path runs/x/last.pt --val /data/imagenet/val --imagenet_c /data/ImageNet-C
All GPUs of a node (every image counted exactly once):
    torchrun --nproc_per_node=8 evaluate.py --ckpt_path runs/x/last.pt --imagenet_c /data/ImageNet-C
torchvision weights from a local file:
    python evaluate.py --pretrained ~/resnet50-0676ba61.pth --arch resnet50 --val /data/imagenet/val
ImageNet-P (flip probability, top-5 distance per perturbation; mFR/mT5D with a reference):
    python evaluate.py --ckpt_path runs/x/last.pt --imagenet_p /data/ImageNet-P [--p_reference alexnet/results.json]
CIFAR-10-C (unnormalised mean corruption error, as the official augmix cifar.py reports):
    python evaluate.py --ckpt_path c10.pt --cifar_c /data/CIFAR-10-C --cifar /data/cifar --cifar_name cifar10
ImageNet-R / -A (logits masked to their 200 classes), -V2, -Sketch (top-1 / top-5 error):
    python evaluate.py --ckpt_path runs/x/last.pt --imagenet_r /data/imagenet-r --imagenet_a /data/imagenet-a \
        --imagenet_v2 /data/imagenetv2-matched-frequency-format-val --imagenet_sketch /data/sketch
Two results side by side:
    python evaluate.py --compare a/results.json b/results.json

The flags come from augmix_gpu/eval/settings.py (one section each) and the benchmark registry
(augmix_gpu/eval/registry.py: one --<name> DIR per benchmark).
"""

from __future__ import annotations

import os
import sys

from augmix_gpu.runtime import prefer_passive_openmp

prefer_passive_openmp()  # before torch loads OpenMP (idle threads must not spin on a shared CPU)


def main(argv: list[str] | None = None) -> int:
    from augmix_gpu.eval import cli as command_line

    return command_line.main(argv, description=__doc__)


def cli() -> int:
    """main() with user errors (bad paths, layouts, names) as one line instead of a traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:  # DatasetError is a ValueError
        rank = os.environ.get("RANK", "0")
        print(f"evaluate.py: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
