"""Train a classifier with (learnable) AugMix + JSD: one process, or many under torchrun.

Launched so that torchrun restarts the workers after a fault; they continue from the newest
complete last.ckpt by themselves (README, "Faults and restarts"):

    torchrun --standalone --nproc_per_node=1 --max-restarts=3 train.py   # embedded demo, CPU, ~3 min
    torchrun --standalone --nproc_per_node=1 --max-restarts=3 train.py --data /imagenet \
        --config reference.toml                                          # the reference recipe
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --data /imagenet \
        --config augmix_paper.toml                                       # all GPUs of a node
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --max-restarts=3 \
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=JOB_ID \
        train.py --data /imagenet --config augmix_paper.toml             # every node, multi-node
    python train.py --eval_only --ckpt_path checkpoints/learnable_augmix_jsd/best.ckpt --imagenet_c /imagenet-c

`python train.py` runs the same without restarts; a relaunched job continues with --resume auto.
Flags override the --config preset; the resolved configuration is saved beside the run.
"""

from __future__ import annotations

import sys

from augmix_gpu.runtime import prefer_passive_openmp, reuse_freed_memory

prefer_passive_openmp()  # before torch loads OpenMP (idle threads must not spin on a shared CPU)
import torch  # noqa: E402

from augmix_gpu.checkpoint import CheckpointWriteError  # noqa: E402
from augmix_gpu.distributed import cleanup, init_distributed  # noqa: E402
from augmix_gpu.train.config import resolve_config, validate_config  # noqa: E402


def eval_only_argv(config: dict, env) -> list[str]:
    """--eval_only runs evaluate.py (the same code) on this run's data and checkpoint."""
    from augmix_gpu.train.data import prepare_data
    from augmix_gpu.train.run import run_dir

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
    if config["dataset"] in ("cifar10", "cifar100"):  # the test split from the pickles, -C .npy
        data = ["--cifar", config["data"], "--cifar_name", config["dataset"]]
        data += ["--cifar_c", str(spec.cifar_c)] if spec.cifar_c else []
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
    try:  # a device that cannot serve this launch is a one-line error too
        env = init_distributed("cpu" if config["gpus"] == 0 else config["device"])
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        validate_config(config, env.world_size)
        torch.set_float32_matmul_precision(config["matmul_precision"])
        if env.device.type == "cpu":
            reuse_freed_memory()  # batched CPU AugMix: keep freed pages (2-3x, runtime.py)
        if config["eval_only"]:
            import evaluate

            return evaluate.main(eval_only_argv(config, env))
        from augmix_gpu.train.run import fit

        return fit(config, env)
    # Bad arguments or data, or a checkpoint that cannot be written: one line, no traceback.
    except (ValueError, FileNotFoundError, CheckpointWriteError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)


if __name__ == "__main__":
    sys.exit(main())
