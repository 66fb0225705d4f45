"""Train a classifier with (learnable) AugMix + JSD: one process, or many under torchrun.

    python train.py                                   # embedded demo: synthetic data on the CPU, ~3 min
    python train.py --data /imagenet --config reference.toml          # the reference script's recipe
    torchrun --nproc_per_node=8 train.py --data /imagenet --config augmix_paper.toml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --data /imagenet --config augmix_paper.toml          # multi-node
    python train.py --eval_only --ckpt_path checkpoints/learnable_augmix_jsd/best.ckpt --imagenet_c /imagenet-c

Flags override the --config preset; the resolved configuration is saved beside the run.
"""

from __future__ import annotations

import sys

from augmix_gpu.runtime import prefer_passive_openmp, reuse_freed_memory

prefer_passive_openmp()  # before torch loads OpenMP (idle threads must not spin on a shared CPU)
import torch  # noqa: E402

from augmix_gpu.config import resolve_config, validate_config  # noqa: E402
from augmix_gpu.distributed import cleanup, init_distributed  # noqa: E402


def eval_only_argv(config: dict, env) -> list[str]:
    """--eval_only runs evaluate.py (the same code) on this run's data and checkpoint."""
    from augmix_gpu.datasets import prepare_data
    from augmix_gpu.training import run_dir

    spec = prepare_data(config, env)
    model = (
        ["--ckpt_path", config["ckpt_path"]]
        if config["ckpt_path"]
        else ["--pretrained", config["pretrained"], "--arch", config["arch"]]
    )
    data = ["--val", str(spec.val)] + (
        ["--imagenet_c", str(spec.corrupted)] if spec.corrupted else []
    )
    data += ["--imagenet_p", str(spec.perturbed)] if spec.perturbed else []
    run = [
        "--batch",
        str(config["batch"] // env.world_size),
        "--workers",
        str(config["workers"]),
        "--device",
        config["device"],
        "--precision",
        config["precision"],
        "--out",
        str(run_dir(config) / "eval"),
        "--crop_size",
        str(config["crop_size"]),
        "--resize_size",
        str(config["val_resize"]),
    ]
    return model + data + run + (["--no_progress"] if config["no_progress"] else [])


def main(argv: list[str] | None = None) -> int:
    config = resolve_config(argv)
    env = init_distributed("cpu" if config["gpus"] == 0 else config["device"])
    try:
        validate_config(config, env.world_size)
        torch.set_float32_matmul_precision(config["matmul_precision"])
        if env.device.type == "cpu":
            reuse_freed_memory()  # batched CPU AugMix: keep freed pages (2-3x, runtime.py)
        if config["eval_only"]:
            import evaluate

            return evaluate.main(eval_only_argv(config, env))
        from augmix_gpu.training import fit

        return fit(config, env)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or data: one line, no traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)


if __name__ == "__main__":
    sys.exit(main())
