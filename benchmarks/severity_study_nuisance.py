"""Which nuisance a model trained on the shifted task fails on: the pose_polarity pilot's probe.

``--synthetic_shift pose_polarity`` trains on upright shapes lighter than their background and
tests on rotated shapes of either polarity. This script scores trained checkpoints on the val
images of that task (the val split's random numbers) drawn four ways: upright or rotated (+-20
deg), light shapes (the training polarity, every image) or dark ones (the images whose test
polarity is dark, about half). Centre crop 56 of the 64 px images, as the evaluation reads them.

    python benchmarks/severity_study_nuisance.py RUN/last.ckpt [...] --out results/....json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import write_table  # noqa: E402

from augmix_gpu.augment.augmix import normalize_images  # noqa: E402
from augmix_gpu.data.synthetic import _LUMA, _background, grid, render, shape_mask  # noqa: E402
from augmix_gpu.eval.model import load_checkpoint_model  # noqa: E402

SETS = ("upright, light", "rotated, light", "upright, dark", "rotated, dark")


def _is_light(label: int, seed: list[int]) -> bool:
    """Whether the standard (test) image has its shape lighter than the background."""
    rng = np.random.default_rng(seed)
    gy, gx = grid(64)
    _background(gy, gx, rng)
    cover = shape_mask(label, gy, gx, rng).reshape(64, 2, 64, 2).mean(axis=(1, 3))
    luma = render(label, 64, np.random.default_rng(seed)).astype(float) @ _LUMA
    return bool(luma[cover == 1].mean() > luma[cover == 0].mean())


def probe_sets(per_class: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    sets: dict[str, list] = {k: [] for k in SETS}
    for label in range(10):
        for i in range(per_class):
            seed = [0, 1, label, i]  # the val split's stream (synthetic seed 0)
            dark = not _is_light(label, seed)
            for upright, pose in ((True, "upright"), (False, "rotated")):
                light = render(label, 64, np.random.default_rng(seed), upright=upright,
                               light_shape=True)  # fmt: skip
                sets[f"{pose}, light"].append((light, label))
                if dark:
                    image = render(label, 64, np.random.default_rng(seed), upright=upright)
                    sets[f"{pose}, dark"].append((image, label))
    out = {}
    for k, items in sets.items():
        x = torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2)
        out[k] = (x[:, :, 4:60, 4:60].contiguous(), torch.tensor([b for _, b in items]))
    return out


def _run_summary(results: Path) -> dict:
    """The run's own figures (its results.json beside the checkpoint): its severity, its error on
    the shifted val set and its mean corruption error (over the -C severities it was given)."""
    import json

    if not results.is_file():
        return {}
    r = json.loads(results.read_text())
    c = r["robustness"]["imagenet_c"]
    return {"severity": r["config"]["initial_aug_severity"], "epochs": r["config"]["epochs"],
            "clean error": r["robustness"]["clean"]["error"],
            "corruption error": c.get("mean_corruption_error") or c["mean_corruption_error_partial"],
            "c severities": c["severities"], "config": r["config"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--per_class", type=int, default=30)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    sets = probe_sets(args.per_class)
    rows, record = [], {}
    for ckpt in args.checkpoints:
        model = load_checkpoint_model(ckpt, "cpu").model
        errors = {}
        for name, (x, y) in sets.items():
            with torch.no_grad():
                pred = model(normalize_images(x)).argmax(1)
            errors[name] = float(100 * (pred != y).float().mean())
        run = _run_summary(Path(ckpt).parent / "results.json")
        record[ckpt] = {"errors": errors, **run}
        rows.append([f"{run.get('severity', '?')}", f"{run.get('clean error', float('nan')):.1f}",
                     f"{run.get('corruption error', float('nan')):.1f}",
                     *(f"{errors[k]:.1f}" for k in SETS)])  # fmt: skip
    headers = ["severity", "val error", "-C error", *(f"{k} (n={len(sets[k][1])})" for k in SETS)]
    write_table(args.out, "severity_study_nuisance", args, headers, rows, errors=record)


if __name__ == "__main__":
    main()
