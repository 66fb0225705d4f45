"""An embedded, procedural 10-class image task written as ImageNet-layout JPEG folders.

Why: the trainer, the evaluator and the -C maker need a real dataset on a machine with no network
and no GPU. Each class is a shape (circle, square, triangle, ...); everything else is nuisance,
drawn at random per image: fill colour and stripe texture, background colour, gradient and
texture, position, scale, rotation (+-20 deg, so square/diamond and plus/x stay distinct), a small
distractor blob, pixel noise, sometimes low contrast. A small CNN learns it in minutes on a CPU
(the demo's figures are in the README), but not perfectly, and not in the first epochs.

Every image is a pure function of (seed, split, class, index): adding images or classes never
changes the existing ones. The tree is written to a temporary folder and renamed into place, with
a `.complete` marker holding the parameters, so a cache can tell a finished set from a torn one.

    python -m augmix_gpu.data.synthetic OUT --classes 10 --train_per_class 500 --val_per_class 50 --size 64 --seed 0
    python -m augmix_gpu.data.synthetic OUT --format cifar10 --train_per_class 500 --val_per_class 100

`--format cifar10|cifar100` writes the same task at 32 px as torchvision's CIFAR pickles instead
(`OUT/cifar-10-batches-py/...`), so the whole CIFAR path runs here with no download.

`--shift pose_polarity` writes a task whose training images lack two nuisances that the test
images have (the severity study's task, docs/studies.md): in `train/` every shape is upright and
lighter than its background; `val/` is the standard task (rotated +-20 deg, either polarity), and
so is `train_shifted/`, the twin of every training image drawn with the same random numbers but
the test's nuisances, from which the held-out objective takes its split (never from val).

    python -m augmix_gpu.data.synthetic OUT --shift pose_polarity --train_per_class 300 --val_per_class 30
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cifar import LAYOUT as CIFAR_LAYOUT
from .publish import MARKER, begin, finish, is_complete  # noqa: F401  (is_complete: public)

SPLITS = ("train", "val")
JPEG_QUALITY = 90
_SQRT_HALF = np.float32(np.sqrt(0.5))
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights
MIN_CONTRAST = 0.25  # luma gap between a shape's fill and its background (except low contrast)


def _plus(u, v):
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9))


# Shape masks on coordinates (u, v) normalised so the shape fits the unit disc; v points down.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 0.85,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7,
    "triangle": lambda u, v: (v <= 0.6) & (v >= -0.9 + 1.732 * np.abs(u)),
    "plus": _plus,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 0.95,
    "x": lambda u, v: _plus((u + v) * _SQRT_HALF, (u - v) * _SQRT_HALF),
    "crescent": lambda u, v: (u * u + v * v <= 0.9) & ((u - 0.45) ** 2 + v * v >= 0.55),
    "tee": lambda u, v: (
        ((np.abs(u) <= 0.9) & (v >= -0.9) & (v <= -0.45))
        | ((np.abs(u) <= 0.22) & (np.abs(v) <= 0.9))
    ),
    "star": lambda u, v: np.sqrt(u * u + v * v) <= 0.5 + 0.4 * np.cos(5 * np.arctan2(u, -v)),
}
CLASS_NAMES = tuple(f"{i:02d}_{name}" for i, name in enumerate(SHAPES))
MAX_ROTATION = 20.0  # degrees either way: square/diamond and plus/x (45 deg apart) stay distinct


@dataclass(frozen=True)
class Shift:
    """What the training split lacks that the test split (and the held-out pool) has.

    ``upright``: training shapes are not rotated (the rotation is still drawn, so a training image
    and its test twin share every other nuisance); ``light_shapes``: a training shape is always
    lighter than its background (fill and background colours swapped where it was darker)."""

    upright: bool
    light_shapes: bool
    help: str


SHIFTS = {
    "none": Shift(False, False, "train and test drawn alike"),
    "pose_polarity": Shift(
        True, True, "train: upright shapes lighter than the background; test: rotated, both"
    ),
}
SHIFTED_POOL = "train_shifted"  # the training images' test-distribution twins (held-out pool)


def _stripes(gx: np.ndarray, gy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft stripe pattern in [0, 1] at a random angle and period (3-12 px at 64 px)."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3, 12) / 64.0
    phase = (gx * np.cos(angle) + gy * np.sin(angle)) / period
    return (0.5 + 0.5 * np.sin(2 * np.pi * phase + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres ``(gy, gx)`` in [0, 1] at twice ``size``: images are drawn at 2x and
    box-filtered down (anti-aliased edges)."""
    g = (np.arange(2 * size, dtype=np.float32) + 0.5) / (2 * size)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    return gy, gx


def _background(gy: np.ndarray, gx: np.ndarray, rng: np.random.Generator):
    """(image, base colour): a colour, a linear gradient and, 60 % of the time, a stripe texture."""
    bg = rng.uniform(0, 1, 3).astype(np.float32)
    grad = rng.uniform(-0.35, 0.35, 3).astype(np.float32)
    ramp_angle = rng.uniform(0, 2 * np.pi)
    ramp = (gx * np.cos(ramp_angle) + gy * np.sin(ramp_angle))[..., None]
    img = bg + grad * (ramp - 0.5)
    if rng.random() < 0.6:
        img = img + rng.uniform(0.05, 0.2) * (_stripes(gx, gy, rng)[..., None] - 0.5)
    return img, bg


def shape_mask(
    label: int, gy: np.ndarray, gx: np.ndarray, rng: np.random.Generator, upright: bool = False
) -> np.ndarray:
    """Where the shape is (``[2 size, 2 size]`` bool): position, scale and rotation from ``rng``
    (the rotation is drawn even when ``upright``, so the stream stays the same)."""
    radius = rng.uniform(0.2, 0.42)
    cx, cy = rng.uniform(radius * 0.9, 1 - radius * 0.9, 2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    theta = 0.0 if upright else np.deg2rad(angle)
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return SHAPES[list(SHAPES)[label]](u, v)


def _fill_colour(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The shape's colour, at least MIN_CONTRAST of luma away from ``bg`` (10 %: low contrast).

    Difficulty (version 2): the outline must stay visible, or a small CNN sees no shape in the
    demo's budget. Measured on the demo recipe (4 epochs, 1500 images, no AugMix), each v1
    nuisance alone on an easy base: random fill colour with no luminance margin 84 -> 49% val,
    full-strength fill stripes 84 -> 49%, noise up to 20/255 84 -> 68%; all v1 nuisances
    together kept the model near chance. So: a luminance margin between fill and background,
    half-strength fill stripes, weaker noise and background texture. Colours stay uniform at
    random, so colour never tells the class."""
    bg_lum = float(bg @ _LUMA)
    if rng.random() < 0.1:  # low contrast: the background shifted a little, towards the room
        side = 1.0 if bg_lum < 0.5 else -1.0
        return np.clip(bg + side * rng.uniform(0.15, 0.25), 0, 1)
    fg = rng.uniform(0, 1, 3)
    d = float(fg @ _LUMA) - bg_lum
    if abs(d) < MIN_CONTRAST:  # shift the fill's luminance away from the background's
        side = 1.0 if d >= 0 else -1.0
        if not 0.0 <= bg_lum + side * MIN_CONTRAST <= 1.0:
            side = -side
        fg = np.clip(fg + (side * MIN_CONTRAST - d), 0, 1)
    return fg


def _distractor(img: np.ndarray, gy: np.ndarray, gx: np.ndarray, rng: np.random.Generator):
    """Half the time, a small disc or box of a random colour anywhere."""
    if rng.random() < 0.5:
        r = rng.uniform(0.04, 0.1)
        px, py = rng.uniform(0, 1, 2)
        if rng.random() < 0.5:
            blob = (gx - px) ** 2 + (gy - py) ** 2 <= r * r
        else:
            blob = (np.abs(gx - px) <= r) & (np.abs(gy - py) <= r)
        img = np.where(blob[..., None], rng.uniform(0, 1, 3).astype(np.float32), img)
    return img


def render(
    label: int,
    size: int,
    rng: np.random.Generator,
    *,
    upright: bool = False,
    light_shape: bool = False,
) -> np.ndarray:
    """One `[size, size, 3]` uint8 image of class `label`, every nuisance drawn from `rng`.

    ``upright`` / ``light_shape`` remove a nuisance (a :class:`Shift`'s training split) without
    changing which random numbers are drawn: the image differs from the unshifted one only there."""
    gy, gx = grid(size)
    img, bg = _background(gy, gx, rng)
    mask = shape_mask(label, gy, gx, rng, upright)[..., None]
    fg = _fill_colour(bg, rng)
    if light_shape and float(fg @ _LUMA) < float(bg @ _LUMA):  # one polarity: colours swapped
        img = img + (fg - bg).astype(np.float32)  # the background (colour + ramp + texture)
        fg = bg
    fill = np.broadcast_to(fg.astype(np.float32), img.shape)
    if rng.random() < 0.4:
        fg2 = rng.uniform(0, 1, 3).astype(np.float32)
        t = 0.5 * _stripes(gx, gy, rng)[..., None]  # at most half the second colour
        fill = fill * (1 - t) + fg2 * t
    img = _distractor(np.where(mask, fill, img), gy, gx, rng)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, rng.uniform(0.0, 0.05), img.shape)  # pixel noise, sigma up to 13/255
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _params(
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    size: int,
    seed: int,
    shift: str = "none",
) -> dict:
    params = dict(
        classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
        size=size, seed=seed, version=2,
    )  # fmt: skip
    if shift != "none":  # the unshifted task keeps its parameters (and its caches)
        params["shift"] = shift
    return params


def check_shift(shift: str) -> Shift:
    """The :class:`Shift` named ``shift``, or a one-line error listing the names."""
    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r}: choose one of {', '.join(SHIFTS)}")
    return SHIFTS[shift]


def make_synthetic_dataset(
    out: str | os.PathLike,
    *,
    num_classes: int = 10,
    train_per_class: int = 500,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    shift: str = "none",
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 0,
) -> Path:
    """Write `out/train/<class>/*.JPEG` and `out/val/<class>/*.JPEG`; return `out`.

    `workers` processes draw the images (0: this process); every image is the same whatever
    their number (it is a function of its own seed).

    `shift` (a name in :data:`SHIFTS`) removes nuisances from `train/` only, and adds
    `out/train_shifted/`: each training image as the test split would draw it (same file names).
    A finished set with the same parameters is reused as is (cache); anything else already at
    `out` is an error unless `overwrite=True`.
    """
    nuisance = check_shift(shift)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"num_classes must be in 1..{len(SHAPES)} (one shape each), got {num_classes}"
        )
    if size < 32:
        raise ValueError(f"size must be >= 32 px (the -C corruptions need it), got {size}")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError(
            f"need train_per_class >= 1 and val_per_class >= 0, got {train_per_class}, {val_per_class}"
        )
    out = Path(out)
    params = _params(num_classes, train_per_class, val_per_class, size, seed, shift)
    tmp = begin(out, params, overwrite, "synthetic set")
    if tmp is None:
        return out
    from tqdm import tqdm

    # (folder, split whose random numbers it uses, images per class, the nuisances removed)
    trees = [("train", 0, train_per_class, nuisance), ("val", 1, val_per_class, SHIFTS["none"])]
    if shift != "none":
        trees.append((SHIFTED_POOL, 0, train_per_class, SHIFTS["none"]))
    tasks = []  # runs of at most 100 images of one class in one tree
    for folder_name, split_id, count, removed in trees:
        for label in range(num_classes):
            folder = tmp / folder_name / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for start in range(0, count, 100):
                tasks.append((str(folder), split_id, label, start, min(count, start + 100), size,
                              seed, removed.upright, removed.light_shapes))  # fmt: skip
    total = sum(task[4] - task[3] for task in tasks)
    with tqdm(total=total, desc=f"synthetic {out.name}", unit="img", disable=not progress) as bar:
        if workers > 0:
            from .pools import process_pool  # forkserver: the trainer calls this after NCCL starts

            with process_pool(workers, preload=(__name__,)) as pool:
                for n in pool.map(_write_images, tasks):
                    bar.update(n)
        else:
            for task in tasks:
                bar.update(_write_images(task))
    return finish(tmp, out, params)


def _write_images(task: tuple) -> int:
    """Images ``start..stop-1`` of one class in one tree (a worker's task); how many."""
    folder, split_id, label, start, stop, size, seed, upright, light = task
    for i in range(start, stop):
        rng = np.random.default_rng([seed, split_id, label, i])
        image = render(label, size, rng, upright=upright, light_shape=light)
        name = f"{SPLITS[split_id]}_{label:02d}_{i:05d}.JPEG"
        Image.fromarray(image).save(Path(folder) / name, quality=JPEG_QUALITY)
    return stop - start


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2, as the official files; str keys (the loaders accept str or bytes keys).
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_synthetic_cifar(
    out: str | os.PathLike,
    *,
    name: str = "cifar10",
    num_classes: int = 10,
    train_per_class: int = 500,
    test_per_class: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the task at 32 px as torchvision's CIFAR-10 or CIFAR-100 pickles under `out`; return `out`.

    `out` then holds `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` (or
    `cifar-100-python/{train, test, meta}`, the shapes as its fine labels), what
    `load_cifar(out, name)` and `torchvision.datasets.CIFAR10(out)` read: rows of 3072 uint8 in
    CHW order, `labels` (`fine_labels` and `coarse_labels`), `filenames`, and the class names in
    the meta file. Images are `render(label, 32, rng)` for the rng of (seed, split, class, index),
    the JPEG set's pixels at 32 px, stored raw as CIFAR is, classes interleaved.
    """
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"num_classes must be in 1..{len(SHAPES)} (one shape each), got {num_classes}"
        )
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"need train_per_class >= 1 and test_per_class >= 1, got {train_per_class}, {test_per_class}"
        )
    out = Path(out)
    params = dict(_params(num_classes, train_per_class, test_per_class, 32, seed), format=name)
    tmp = begin(out, params, overwrite, "synthetic set")
    if tmp is None:
        return out
    from tqdm import tqdm

    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    label_key, names_key = label_key.decode(), names_key.decode()
    base = tmp / folder
    base.mkdir()
    names = list(SHAPES)[:num_classes]
    total = num_classes * (train_per_class + test_per_class)
    with tqdm(
        total=total, desc=f"synthetic {name} {out.name}", unit="img", disable=not progress
    ) as bar:
        for split_id, (per_class, files) in enumerate(
            ((train_per_class, train_files), (test_per_class, test_files))
        ):
            split = SPLITS[split_id]
            labels = np.tile(np.arange(num_classes), per_class)  # round robin over classes
            index = np.repeat(np.arange(per_class), num_classes)
            rows = np.empty((len(labels), 3 * 32 * 32), dtype=np.uint8)
            for k, (label, i) in enumerate(zip(labels.tolist(), index.tolist())):
                rng = np.random.default_rng([seed, split_id, label, i])
                rows[k] = render(label, 32, rng).transpose(2, 0, 1).reshape(-1)
                bar.update()
            filenames = [f"{names[lab]}_{split}_{i:05d}.png" for lab, i in zip(labels, index)]
            chunks = np.array_split(np.arange(len(labels)), len(files))
            for b, (fname, chunk) in enumerate(zip(files, chunks)):
                batch = {
                    "batch_label": f"{'training' if split_id == 0 else 'testing'} batch "
                    f"{b + 1} of {len(files)}",
                    label_key: labels[chunk].tolist(),
                    "data": rows[chunk],
                    "filenames": [filenames[j] for j in chunk],
                }
                if name == "cifar100":  # CIFAR-100 groups 5 fine classes per coarse class
                    batch["coarse_labels"] = (labels[chunk] // 5).tolist()
                _dump(base / fname, batch)
    meta = {names_key: names}
    if name == "cifar10":
        meta.update(num_cases_per_batch=len(chunks[0]), num_vis=3 * 32 * 32)
    else:
        meta["coarse_label_names"] = [f"group{g}" for g in range(-(-num_classes // 5))]
    _dump(base / meta_file, meta)
    return finish(tmp, out, params)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (gets train/ and val/)")
    p.add_argument(
        "--classes", type=int, default=10, help=f"number of shape classes (1..{len(SHAPES)})"
    )
    p.add_argument("--train_per_class", type=int, default=500)
    p.add_argument("--val_per_class", type=int, default=50)
    p.add_argument(
        "--size", type=int, default=None, help="image side in px (default 64; CIFAR: 32)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shift", choices=tuple(SHIFTS), default="none",
        help="nuisances the train split lacks and val has: "
        + "; ".join(f"{k}: {v.help}" for k, v in SHIFTS.items()),
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at OUT")
    p.add_argument("--workers", type=int, default=0, help="processes (0: this one; folders only)")
    p.add_argument(
        "--format",
        choices=("folders", *CIFAR_LAYOUT),
        default="folders",
        help="folders: OUT/{train,val}/<class>/*.JPEG; cifar10|cifar100: torchvision's pickles",
    )
    a = p.parse_args(argv)
    if a.format != "folders":
        if a.size not in (None, 32):
            p.error(f"--size {a.size}: the CIFAR formats are 32 px")
        if a.shift != "none":
            p.error(f"--shift {a.shift}: only the folders format has a shifted variant")
        out = make_synthetic_cifar(
            a.out, name=a.format, num_classes=a.classes, train_per_class=a.train_per_class,
            test_per_class=a.val_per_class, seed=a.seed, overwrite=a.overwrite,
        )  # fmt: skip
        print(out)
        return
    a.size = a.size or 64
    out = make_synthetic_dataset(
        a.out, num_classes=a.classes, train_per_class=a.train_per_class, val_per_class=a.val_per_class,
        size=a.size, seed=a.seed, shift=a.shift, overwrite=a.overwrite, workers=a.workers,
    )  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
