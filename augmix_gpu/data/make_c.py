"""Write an ImageNet-C style tree `OUT/<corruption>/<severity>/<class>/<file>.JPEG` from a folder.

Uses the `imagecorruptions` package (distribution `imagecorruptions-imaug`: Hendrycks &
Dietterich's ImageNet-C code, made importable). Images are corrupted at their own size (ImageNet-C
itself corrupts 224x224 centre crops; our synthetic set is 64 px) and saved as JPEG quality 85, as
ImageNet-C was. Each image's randomness is seeded from (seed, corruption, severity, index), so the
output does not depend on `--workers` or on which corruptions are asked for.

Note on small images: the corruptions' constants (blur radii, frost texture crops, zoom factors)
were tuned for 224 px, so at 64 px the blurs are relatively stronger; they still run for every
corruption down to the package's 32 px minimum. `glass_blur` runs a Numba loop, compiled
once per machine and cached on disk (~5 s), then about 1 ms per 64 px image (10 ms at 224 px).

    python -m augmix_gpu.data.make_c SRC OUT --severities 1 2 3 4 5 [--corruptions ...] [--extra] [--seed S] [--per_class N] [--workers N]
    python -m augmix_gpu.data.make_c CIFAR_ROOT OUT --cifar cifar10 [--corruptions ...] [--workers N]

`--cifar cifar10|cifar100` reads the test split of a CIFAR folder (`load_cifar`) and writes the
CIFAR-10-C / CIFAR-100-C layout instead: `OUT/<corruption>.npy`, uint8 `[5N, 32, 32, 3]` with
severity 1 to 5 stacked in that order, and `OUT/labels.npy` uint8 `[5N]`, corrupted with the
constants the published CIFAR-C sets were made with (`cifar_corruptions.py`: hendrycks/robustness
`make_cifar_c.py`'s, much milder than ImageNet-C's).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# One list for the whole project (protocols.py holds it beside the AlexNet reference errors).
from ..protocols import CORRUPTIONS, EXTRA_CORRUPTIONS
from . import cifar_corruptions
from .folders import DatasetError, find_classes, first_per_class, scan_folder
from .publish import MARKER, begin, finish  # noqa: F401  (MARKER: public)

_ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
_SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")  # they take `seed=`; the rest use np.random
JPEG_QUALITY = 85  # ImageNet-C's save quality
CONSTANTS = ("imagenet", "cifar")  # imagecorruptions' (ImageNet-C) or CIFAR-C's (make_cifar_c.py)


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit numpy seed of one output image."""
    keys = [int(seed), _ALL.index(corruption), int(severity), int(index)]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@functools.cache
def _imagecorruptions() -> Callable[..., np.ndarray]:
    """``imagecorruptions.corrupt``, its one Numba function (glass blur's pixel shuffle) cached on
    disk (beside the package, or in ``NUMBA_CACHE_DIR``): compiled anew, it cost every process
    that made a -C set ~5 s, a tenth of the demo's data preparation. The first process on a
    machine compiles and writes it; the others load it."""
    from imagecorruptions import corrupt, corruptions

    shuffle = getattr(corruptions, "_shuffle_pixels_njit_glass_blur", None)
    if hasattr(shuffle, "enable_caching"):  # a Numba dispatcher (not a newer package's rewrite)
        shuffle.enable_caching()
    return corrupt


def compile_numba() -> None:
    """Compile (or load) glass blur's Numba loop for both of its signatures now, into the disk
    cache: ``make install`` runs this, so that no -C set, the demo's first included, pays it."""
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    for severity in (1, 3):  # (float, int, int) and (int, int, int) constants: two signatures
        corrupt_image(grey, "glass_blur", severity, seed=0)


def corrupt_image(
    image: np.ndarray, corruption: str, severity: int, seed: int, constants: str = "imagenet"
) -> np.ndarray:
    """One `[H, W, 3]` uint8 image corrupted deterministically for `seed`, with ImageNet-C's
    constants (`imagecorruptions`) or, `constants="cifar"`, CIFAR-C's (32 px images only)."""
    if constants not in CONSTANTS:
        raise ValueError(f"constants must be one of {CONSTANTS}, got {constants!r}")
    corrupt = _imagecorruptions()
    kwargs = {"seed": seed} if corruption in _SEEDED_BY_ARGUMENT else {}
    state = np.random.get_state()  # noqa: NPY002  both draw from the global generator:
    np.random.seed(seed)  # noqa: NPY002  seed it, and give the caller its state back
    try:
        if constants == "cifar":
            out = cifar_corruptions.corrupt(image, corruption, int(severity))
        else:
            out = corrupt(image, severity=int(severity), corruption_name=corruption, **kwargs)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return out[: image.shape[0], : image.shape[1]]  # some corruptions can overshoot by a pixel


def _work(task: tuple[str, str, str, int, int]) -> None:
    from PIL import Image

    src, dst, corruption, severity, seed = task
    with Image.open(src) as im:
        image = np.asarray(im.convert("RGB"))
    out = corrupt_image(image, corruption, severity, seed)
    Image.fromarray(out).save(dst, quality=JPEG_QUALITY, optimize=True)


def make_corrupted_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    per_class: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Corrupt every image (or the first `per_class` of each class) of the ImageFolder tree `src`
    into `out`; return `out`.

    Written to a temporary folder and renamed into place with a `.complete` marker holding the
    parameters; a finished tree with the same parameters is reused (cache). `workers=0` runs in
    this process, `N > 0` uses N processes.
    """
    unknown = [c for c in corruptions if c not in _ALL]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}: choose from {', '.join(_ALL)}")
    bad_sev = [s for s in severities if int(s) not in range(1, 6)]
    if bad_sev or not severities:
        raise ValueError(f"severities must be a non-empty subset of 1..5, got {list(severities)}")
    everything = scan_folder(src)
    # an image's index (its seed) is its place in the whole folder: a subset's files are the
    # whole set's files, byte for byte
    index_of = {path: i for i, (path, _) in enumerate(everything)}
    samples = first_per_class(everything, per_class)
    classes = find_classes(src)[0]
    src_root, out = Path(src), Path(out)
    small = []
    for path, _ in samples[:1]:
        from PIL import Image

        with Image.open(path) as im:
            if min(im.size) < 32:
                small.append((path, im.size))
    if small:
        raise DatasetError(
            f"{small[0][0]!r} is {small[0][1]} px: the corruptions need >= 32 px per side"
        )
    params = dict(src=str(src_root.resolve()), n=len(samples), severities=[int(s) for s in severities],
                  corruptions=list(corruptions), seed=int(seed), version=1,
                  **({} if per_class is None else {"per_class": int(per_class)}))  # fmt: skip
    tmp = begin(out, params, overwrite, "-C set")
    if tmp is None:
        return out
    tasks = []
    for corruption in corruptions:
        for severity in severities:
            for cls in classes:
                (tmp / corruption / str(severity) / cls).mkdir(parents=True, exist_ok=True)
            for path, _ in samples:
                index = index_of[path]
                rel = Path(path).relative_to(src_root)
                dst = tmp / corruption / str(severity) / rel.parent / (rel.stem + ".JPEG")
                dst.parent.mkdir(parents=True, exist_ok=True)  # nested sub-folders of a class
                tasks.append(
                    (
                        path,
                        str(dst),
                        corruption,
                        int(severity),
                        image_seed(seed, corruption, severity, index),
                    )
                )

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"-C {out.name}", unit="img", disable=not progress)
    if workers > 0:
        from .pools import process_pool  # forkserver: the trainer calls this after CUDA starts

        with process_pool(workers, preload=(__name__, "imagecorruptions")) as pool:
            for _ in pool.map(_work, tasks, chunksize=16):
                bar.update()
    else:
        for task in tasks:
            _work(task)
            bar.update()
    bar.close()
    return finish(tmp, out, params)


def _corrupt_block(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Every image of `images` `[N, 32, 32, 3]` at one corruption and severity, CIFAR-C's way."""
    return np.stack(
        [corrupt_image(im, corruption, severity, image_seed(seed, corruption, severity, i), "cifar")
         for i, im in enumerate(images)]
    )  # fmt: skip


_WORKER_IMAGES: list[np.ndarray] = []  # a worker's copy of the test split, sent once (initializer)


def _init_worker(images: np.ndarray) -> None:
    _WORKER_IMAGES[:] = [images]


def _worker_block(task: tuple[str, int, int]) -> np.ndarray:
    return _corrupt_block(_WORKER_IMAGES[0], *task)


def make_cifar_c(
    cifar_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "cifar10",
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Corrupt the test split of the CIFAR folder `cifar_root` into CIFAR-C `.npy` files; return `out`.

    The five severities are always written (the format stacks them); each image's randomness
    comes from (seed, corruption, severity, index), as in `make_corrupted_dataset`. Written to a
    temporary folder and renamed into place with a `.complete` marker; reused when finished.
    """
    from .cifar import load_cifar

    unknown = [c for c in corruptions if c not in _ALL]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}: choose from {', '.join(_ALL)}")
    test = load_cifar(cifar_root, name, train=False)
    if int(test.labels.max()) > 255:
        raise DatasetError(f"labels up to {int(test.labels.max())} do not fit CIFAR-C's uint8")
    out = Path(out)
    # version 2: CIFAR-C's constants (version 1 used ImageNet-C's at 32 px: such a set is redone)
    params = dict(src=str(Path(cifar_root).resolve()), name=name, n=len(test),
                  corruptions=list(corruptions), seed=int(seed), format="cifar-c", version=2)  # fmt: skip
    tmp = begin(out, params, overwrite, "CIFAR-C set")
    if tmp is None:
        return out
    tasks = [(c, s, int(seed)) for c in corruptions for s in range(1, 6)]
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"CIFAR-C {out.name}", unit="block", disable=not progress)
    blocks: list[np.ndarray] = []
    if workers > 0:
        from .pools import process_pool  # forkserver: the trainer calls this after CUDA starts

        with process_pool(
            workers,
            preload=(__name__, "imagecorruptions"),
            initializer=_init_worker,
            initargs=(test.images,),
        ) as pool:
            for block in pool.map(_worker_block, tasks):
                blocks.append(block)
                bar.update()
    else:
        for task in tasks:
            blocks.append(_corrupt_block(test.images, *task))
            bar.update()
    bar.close()
    for k, corruption in enumerate(corruptions):
        np.save(tmp / f"{corruption}.npy", np.concatenate(blocks[5 * k : 5 * k + 5]))
    np.save(tmp / "labels.npy", np.tile(test.labels, 5).astype(np.uint8))
    return finish(tmp, out, params)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "src", help="ImageFolder tree to corrupt (root/<class>/<image>); or a CIFAR root"
    )
    p.add_argument("out", help="output root: OUT/<corruption>/<severity>/<class>/<file>.JPEG")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument(
        "--cifar",
        choices=("cifar10", "cifar100"),
        default=None,
        help="SRC is a CIFAR folder: write CIFAR-C's OUT/<corruption>.npy + labels.npy",
    )
    p.add_argument("--corruptions", nargs="+", default=None, help="default: the 15 of ImageNet-C")
    p.add_argument(
        "--extra",
        action="store_true",
        help="also the 4 extra ones: " + ", ".join(EXTRA_CORRUPTIONS),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per_class", type=int, default=None, help="first N images of each class")
    p.add_argument("--workers", type=int, default=0, help="processes (0: this one)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    corruptions = list(a.corruptions or CORRUPTIONS) + (list(EXTRA_CORRUPTIONS) if a.extra else [])
    if a.cifar:
        if sorted(a.severities) != [1, 2, 3, 4, 5]:
            p.error("--cifar: CIFAR-C stacks all five severities; drop --severities")
        if a.per_class is not None:
            p.error("--cifar: CIFAR-C corrupts the whole test split; drop --per_class")
        out = make_cifar_c(a.src, a.out, name=a.cifar, corruptions=corruptions, seed=a.seed,
                           workers=a.workers, overwrite=a.overwrite)  # fmt: skip
        print(out)
        return
    out = make_corrupted_dataset(
        a.src, a.out, severities=a.severities, corruptions=corruptions, seed=a.seed,
        per_class=a.per_class, workers=a.workers, overwrite=a.overwrite,
    )  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
