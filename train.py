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
from augmix_gpu.train.config import Settings, resolve_settings, validate_settings  # noqa: E402


def evaluate_only(settings: Settings, env) -> int:
    """--eval_only: evaluate.py's evaluation (the same code) of --ckpt_path or --pretrained on
    this run's data, reports under <run dir>/eval."""
    from augmix_gpu.eval.cli import evaluate_checkpoint
    from augmix_gpu.eval.settings import ModelSource
    from augmix_gpu.train.data import prepare_data
    from augmix_gpu.train.final_eval import eval_settings

    run, model = settings.run, settings.model
    source = ModelSource(ckpt_path=run.ckpt_path) if run.ckpt_path else (
        ModelSource(pretrained=model.pretrained, arch=model.arch))  # fmt: skip
    data = prepare_data(settings, env)
    return evaluate_checkpoint(eval_settings(settings, data, env.world_size, source), env)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve_settings(argv)
        # a device that cannot serve this launch is a one-line error too
        env = init_distributed("cpu" if settings.run.gpus == 0 else settings.run.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        validate_settings(settings, env.world_size)
        torch.set_float32_matmul_precision(settings.run.matmul_precision)
        if env.device.type == "cpu":
            reuse_freed_memory()  # batched CPU AugMix: keep freed pages (2-3x, runtime.py)
        if settings.run.eval_only:
            return evaluate_only(settings, env)
        from augmix_gpu.train.run import fit

        return fit(settings, env)
    # Bad arguments or data, or a checkpoint that cannot be written: one line, no traceback.
    except (ValueError, FileNotFoundError, CheckpointWriteError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)


if __name__ == "__main__":
    sys.exit(main())
