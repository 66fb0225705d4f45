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


def eval_only_argv(settings: Settings, env) -> list[str]:
    """--eval_only runs evaluate.py (the same code) on this run's data and checkpoint."""
    from augmix_gpu.train.data import prepare_data

    s, spec = settings, prepare_data(settings, env)
    run = s.run
    model = (
        ["--ckpt_path", run.ckpt_path]
        if run.ckpt_path
        else ["--pretrained", s.model.pretrained, "--arch", s.model.arch]
    )
    roots = [arg for name, root in spec.roots.items() for arg in (f"--{name}", str(root))]
    data = ["--val", str(spec.val), *roots]
    if s.data.is_cifar:  # the test split from the pickles, -C .npy
        data = ["--cifar", s.data.data, "--cifar_name", s.data.dataset, *roots]
    opts = ["--batch", str(s.per_rank_batch(env.world_size)), "--workers", str(s.data.workers),
            "--device", run.device, "--precision", s.model.precision, "--out", str(s.run_dir / "eval"),
            "--crop_size", str(s.data.crop_size), "--resize_size", str(s.data.val_resize)]  # fmt: skip
    return model + data + opts + (["--no_progress"] if run.no_progress else [])


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
            import evaluate

            return evaluate.main(eval_only_argv(settings, env))
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
