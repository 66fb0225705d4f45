"""The held-out set of the ``heldout`` severity objective: a split of the TRAINING images,
corrupted once by validation-only corruptions, cached like the embedded data.

Why these choices:
- From the training set, never from val: val measures the result, so nothing may be tuned on it.
  The split is a seeded choice of ``count`` training files (``--heldout_seed``, fixed across
  training seeds like ``--synthetic_seed``); the trainer removes them from its training list, and
  ``heldout.json`` records which they are.
- Corrupted by ImageNet-C's 4 extra corruptions (speckle_noise, gaussian_blur, spatter,
  saturate), which Hendrycks & Dietterich held out as validation corruptions, never by the 15
  evaluated ones (:func:`check_heldout_corruptions` refuses them).
- Each image is prepared as ImageNet-C prepared its images (resize the shorter side, centre crop,
  then corrupt) and gets one (corruption, severity), assigned round-robin over the corruptions and
  severities 1-5, so every pair is equally represented; randomness is seeded per image exactly as
  the -C maker seeds it (:func:`augmix_gpu.data.make_c.image_seed`).
- Written to a temporary folder and renamed into place with a marker holding the parameters
  (:mod:`augmix_gpu.data.publish`), so an interrupted preparation is redone and a finished one is
  reused; ``heldout.json`` lists the files held out and each one's corruption.

    python -m augmix_gpu.data.heldout TRAIN_DIR OUT --images 10000 [--seed 0] [--workers 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..protocols import CORRUPTIONS, EXTRA_CORRUPTIONS
from .folders import DatasetError, scan_folder
from .make_c import JPEG_QUALITY, corrupt_image, image_seed
from .publish import begin, finish

MANIFEST = "heldout.json"
MAX_FRACTION = 0.5  # more than half the training set held out would starve the network
DEFAULT_IMAGES = 10_000  # ~0.8 % of ImageNet's 1.28M; capped at 10 % of smaller sets
DEFAULT_FRACTION = 0.1
VERSION = 1


def check_heldout_corruptions(corruptions: Sequence[str]) -> list[str]:
    """The held-out corruptions, refused if any is one of the 15 evaluation corruptions."""
    names = list(corruptions)
    leaked = [c for c in names if c in CORRUPTIONS]
    if leaked:
        raise ValueError(
            f"--heldout_corruptions {leaked}: evaluation corruption(s), which no objective may "
            f"see; use validation corruptions such as {', '.join(EXTRA_CORRUPTIONS)}"
        )
    unknown = [c for c in names if c not in EXTRA_CORRUPTIONS]
    if unknown or not names:
        raise ValueError(
            f"--heldout_corruptions {names}: choose one or more of {', '.join(EXTRA_CORRUPTIONS)}"
        )
    return names


def heldout_count(num_train: int, images: float) -> int:
    """``--heldout_images`` -> a number of images: a count (>= 1), a fraction (< 1), or 0 for
    the default ``min(10000, 10 %)``; the fraction held out must lie in (0, 0.5]."""
    if images < 0:
        raise ValueError(f"--heldout_images {images}: must be a count >= 1, a fraction, or 0")
    if images == 0:
        count = min(DEFAULT_IMAGES, int(DEFAULT_FRACTION * num_train))
    elif images < 1:
        count = int(round(images * num_train))
    else:
        count = int(images)
    fraction = count / max(num_train, 1)
    if not 0 < fraction <= MAX_FRACTION or count < 1:
        raise ValueError(
            f"--heldout_images {images}: holds out {count} of {num_train} training images "
            f"(fraction {fraction:.3g}); the held-out fraction must be in (0, {MAX_FRACTION}]"
        )
    return count


def choose_heldout(paths: Sequence[str], count: int, seed: int) -> list[int]:
    """Indices (into the sorted training list) of the held-out images, a pure function of seed."""
    rng = np.random.default_rng([int(seed), 0x4E1D])  # a stream of its own, apart from training's
    return sorted(int(i) for i in rng.choice(len(paths), size=count, replace=False))


@dataclass(frozen=True)
class HeldoutSet:
    """A prepared held-out set: an ImageFolder tree ``root`` and the training files it removed."""

    root: Path
    source_files: tuple[str, ...]  # the training files held out, relative to the train folder
    corruptions: tuple[str, ...]

    @classmethod
    def read(cls, root: str | os.PathLike) -> HeldoutSet:
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(
            root,
            tuple(f["source"] for f in manifest["files"]),
            tuple(manifest["params"]["corruptions"]),
        )


def _prepare_one(task: tuple[str, str, int, int, str, int, int]) -> None:
    from PIL import Image

    src, dst, crop, resize, corruption, severity, seed = task
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        im = im.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - crop) // 2, (h - crop) // 2
        image = np.asarray(im.crop((left, top, left + crop, top + crop)))
    out = corrupt_image(image, corruption, severity, seed)
    Image.fromarray(out).save(dst, quality=JPEG_QUALITY, optimize=True)


def default_root(train_dir: str | os.PathLike, cache: str | os.PathLike, **params) -> Path:
    """``cache/heldout-<hash of the train folder and the parameters>``."""
    key = json.dumps({"train_dir": str(Path(train_dir).resolve()), **params}, sort_keys=True)
    return Path(cache) / f"heldout-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def make_heldout_set(
    train_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: float = 0,
    seed: int = 0,
    corruptions: Sequence[str] = EXTRA_CORRUPTIONS,
    crop_size: int = 224,
    resize_size: int = 256,
    workers: int = 0,
    progress: bool = True,
) -> HeldoutSet:
    """Prepare (or reuse) the held-out set of ``train_dir`` in ``out``; see the module docstring."""
    corruptions = check_heldout_corruptions(corruptions)
    if crop_size < 32:
        raise ValueError(f"crop_size {crop_size}: the corruptions need >= 32 px per side")
    train_dir, out = Path(train_dir), Path(out)
    samples = scan_folder(train_dir)
    count = heldout_count(len(samples), images)
    chosen = choose_heldout([p for p, _ in samples], count, seed)
    params = dict(train_dir=str(train_dir.resolve()), num_train=len(samples), count=count,
                  seed=int(seed), corruptions=corruptions, crop_size=int(crop_size),
                  resize_size=int(resize_size), version=VERSION)  # fmt: skip
    # Only a held-out set (its manifest there) is replaced when its parameters changed.
    tmp = begin(out, params, (out / MANIFEST).is_file(), "held-out set")
    if tmp is None:
        return HeldoutSet.read(out)
    severities = (1, 2, 3, 4, 5)
    files, tasks = [], []
    for j, index in enumerate(chosen):
        path = Path(samples[index][0])
        rel = path.relative_to(train_dir)
        corruption = corruptions[j % len(corruptions)]
        severity = severities[(j // len(corruptions)) % len(severities)]
        dst = tmp / rel.parent / (rel.stem + ".JPEG")
        dst.parent.mkdir(parents=True, exist_ok=True)
        files.append({"source": str(rel), "corruption": corruption, "severity": severity})
        tasks.append((str(path), str(dst), crop_size, resize_size, corruption, severity,
                      image_seed(seed, corruption, severity, index)))  # fmt: skip

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"held-out set {out.name}", unit="img", disable=not progress)
    if workers > 0:
        from .pools import process_pool  # forkserver: the trainer calls this after CUDA starts

        with process_pool(workers, preload=(__name__, "imagecorruptions")) as pool:
            for _ in pool.map(_prepare_one, tasks, chunksize=16):
                bar.update()
    else:
        for task in tasks:
            _prepare_one(task)
            bar.update()
    bar.close()
    (tmp / MANIFEST).write_text(json.dumps({"params": params, "files": files}, indent=1))
    return HeldoutSet.read(finish(tmp, out, params))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train_dir", help="ImageFolder training tree (root/<class>/<image>)")
    p.add_argument("out", help="output ImageFolder tree of corrupted held-out images")
    p.add_argument("--images", type=float, default=0, help="count, fraction (<1), or 0: default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corruptions", nargs="+", default=list(EXTRA_CORRUPTIONS))
    p.add_argument("--crop_size", type=int, default=224)
    p.add_argument("--resize_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="processes (0: this one)")
    a = p.parse_args(argv)
    try:
        held = make_heldout_set(
            a.train_dir, a.out, images=a.images, seed=a.seed, corruptions=a.corruptions,
            crop_size=a.crop_size, resize_size=a.resize_size, workers=a.workers,
        )  # fmt: skip
    except (ValueError, DatasetError) as e:
        raise SystemExit(f"heldout: error: {e}") from None
    print(f"{held.root}: {len(held.source_files)} images held out of {a.train_dir}")


if __name__ == "__main__":
    main()
