"""Clean + ImageNet-C (+ CIFAR-C) + ImageNet-P evaluation: results JSON, markdown, pictures.

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
Two results side by side:
    python evaluate.py --compare a/results.json b/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from augmix_gpu.runtime import prefer_passive_openmp

prefer_passive_openmp()  # before torch loads OpenMP (idle threads must not spin on a shared CPU)
import torch  # noqa: E402

from augmix_gpu.runtime import PRECISIONS, amp_dtype  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("model")
    src.add_argument("--ckpt_path", help="checkpoint of this project (model, classes, config)")
    src.add_argument(
        "--pretrained", help="local torchvision weights file (or a cached weights name)"
    )
    src.add_argument("--arch", default="resnet50", help="architecture for --pretrained")
    data = p.add_argument_group("data")
    data.add_argument("--val", help="clean ImageNet-layout folder (resize + centre crop)")
    data.add_argument(
        "--imagenet_c", help="ImageNet-C root: <corruption>/<severity>/<class>/<image>"
    )
    data.add_argument(
        "--cifar_c", help="CIFAR-10-C / CIFAR-100-C folder of <corruption>.npy + labels.npy"
    )
    data.add_argument(
        "--cifar", help="CIFAR root (holds cifar-10-batches-py) for the clean test error"
    )
    data.add_argument("--cifar_name", default="cifar10", choices=("cifar10", "cifar100"))
    data.add_argument("--corruptions", nargs="+", help="subset (reported as partial, never as mCE)")
    data.add_argument("--severities", nargs="+", type=int, help="subset of 1..5 (partial)")
    data.add_argument(
        "--c_resize", type=int, help="resize -C images' shorter side first (official augmix: 256)"
    )
    data.add_argument(
        "--imagenet_p", help="ImageNet-P root: <perturbation>[_<difficulty>]/<class>/<name>.mp4"
    )
    data.add_argument("--perturbations", nargs="+", help="-P subset (partial, never an mFR)")
    data.add_argument(
        "--p_difficulties", nargs="+", type=int, default=[1], help="-P difficulties (1 2 3)"
    )
    data.add_argument(
        "--p_decoder", default="auto", choices=("auto", "cpu", "dali"),
        help="-P videos: DALI on a GPU (auto), PyAV on the CPU (cpu), or DALI (dali)",
    )  # fmt: skip
    data.add_argument(
        "--p_batch", type=int, help="-P sequences per rank per step (default: ~batch frames)"
    )
    data.add_argument(
        "--p_reference", help="results.json whose -P figures normalise FR/mFR/mT5D (e.g. AlexNet's)"
    )
    data.add_argument("--crop_size", type=int, help="centre crop (default: checkpoint's, else 224)")
    data.add_argument(
        "--resize_size", type=int, help="clean resize (default: checkpoint's, else 256)"
    )
    run = p.add_argument_group("run")
    run.add_argument("--batch", type=int, default=128, help="images per rank per step")
    run.add_argument("--workers", type=int, default=4, help="DALI threads per rank")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--precision", default="32", choices=PRECISIONS)
    run.add_argument("--channels_last", action="store_true")
    run.add_argument(
        "--out", default="eval_results", help="folder for the JSON, markdown and heatmap"
    )
    run.add_argument("--name", default="results", help="file stem of the reports")
    run.add_argument("--no_progress", action="store_true")
    p.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="print two results side by side"
    )
    args = p.parse_args(argv)
    if not args.compare:
        if bool(args.ckpt_path) == bool(args.pretrained):
            p.error("pass exactly one of --ckpt_path or --pretrained (or --compare A.json B.json)")
        if not (args.val or args.imagenet_c or args.cifar_c or args.cifar or args.imagenet_p):
            p.error(
                "nothing to evaluate: pass --val, --imagenet_c, --cifar_c, --cifar and/or --imagenet_p"
            )
        if args.imagenet_c and args.cifar_c:
            p.error("--imagenet_c and --cifar_c need different models: run them separately")
    return args


def compare(paths: list[str]) -> str:
    from augmix_gpu.eval.run import compare_table

    loaded = []
    for path in paths:
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--compare: cannot read {path!r} ({e})") from None
    return compare_table(
        *loaded,
        names=(Path(paths[0]).parent.name or paths[0], Path(paths[1]).parent.name or paths[1]),
    )


def load_model(args: argparse.Namespace, device: torch.device):
    """(model, classes, config, model info) from --ckpt_path or --pretrained."""
    from augmix_gpu.checkpoint import load_model_for_eval
    from augmix_gpu.data import find_classes
    from augmix_gpu.eval.run import describe_model
    from augmix_gpu.models import build_model

    if args.ckpt_path:
        model, classes, config = load_model_for_eval(args.ckpt_path, device)
        return (
            model,
            classes,
            config,
            describe_model(config, args.ckpt_path, name=Path(args.ckpt_path).stem),
        )
    # --pretrained: labels are the sorted class folders, torchvision's ImageNet index order.
    root = args.val or _first_c_folder(args)
    classes, _ = find_classes(root)
    weights = Path(args.pretrained) if Path(args.pretrained).is_file() else None
    if weights is not None:  # a head of another size would be silently replaced by a random one
        from augmix_gpu.models import load_state_dict_file

        expected = {
            k: tuple(v.shape) for k, v in build_model(args.arch, len(classes)).state_dict().items()
        }
        got = {k: tuple(v.shape) for k, v in load_state_dict_file(weights).items()}
        # Shapes only: old torchvision files lack BatchNorm's num_batches_tracked, which loads fine.
        diff = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        if diff:
            raise ValueError(
                f"--pretrained {args.pretrained} does not match --arch {args.arch} with the "
                f"{len(classes)} class folders of {root!r} (differs at {diff[:3]}): evaluate on the "
                "dataset and architecture the weights were trained for"
            )
    model = build_model(args.arch, num_classes=len(classes), pretrained=args.pretrained)
    config = {"arch": args.arch, "aug_type": None, "all_ops": None}
    return model.to(device).eval(), classes, config, describe_model(config, weights, name=args.arch)


def _first_c_folder(args: argparse.Namespace) -> str:
    from augmix_gpu.protocols import CORRUPTIONS, PERTURBATIONS

    if not args.imagenet_c and args.imagenet_p:
        return str(Path(args.imagenet_p) / (args.perturbations or PERTURBATIONS)[0])
    if not args.imagenet_c:
        raise SystemExit(
            "--pretrained needs --val, --imagenet_c or --imagenet_p to read the class folders from"
        )
    c = (args.corruptions or CORRUPTIONS)[0]
    s = (args.severities or [1])[0]
    return str(Path(args.imagenet_c) / c / str(s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0

    from augmix_gpu.distributed import cleanup, init_distributed
    from augmix_gpu.eval.run import evaluate_robustness, markdown_table, write_reports

    env = init_distributed(args.device)
    try:
        model, classes, config, info = load_model(args, env.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        crop = args.crop_size or config.get("crop_size") or 224
        resize = args.resize_size or config.get("val_resize") or 256
        results = evaluate_robustness(
            model,
            env,
            classes=classes,
            val_dir=args.val,
            imagenet_c_dir=args.imagenet_c,
            cifar_c=args.cifar_c,
            cifar_dir=args.cifar,
            cifar_name=args.cifar_name,
            corruptions=args.corruptions,
            severities=args.severities,
            c_resize=args.c_resize,
            batch_size=args.batch,
            device_kind=args.device,
            num_threads=args.workers,
            crop_size=crop,
            resize_size=resize,
            amp_dtype=amp_dtype(args.precision),
            channels_last=args.channels_last,
            progress=not args.no_progress,
            extra_info={"args": vars(args), "model": info},
            imagenet_p_dir=args.imagenet_p,
            perturbations=args.perturbations,
            p_difficulties=args.p_difficulties,
            p_batch_size=args.p_batch,
            p_decoder=args.p_decoder,
            p_reference=args.p_reference,
        )
        if env.is_main:
            paths = write_reports(results, args.out, args.name)
            print(markdown_table(results))
            print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    finally:
        cleanup(env)
    return 0


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
