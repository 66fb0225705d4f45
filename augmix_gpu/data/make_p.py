"""Write an ImageNet-P style tree `OUT/<perturbation>[_<difficulty>]/<class>/<name>.mp4` from a folder.

Each image becomes one sequence, written anew after hendrycks/robustness
ImageNet-P/create_p/make_imagenet_p.py (the 224 px generator; its constants are cited per
perturbation in `_FRAMES`):

- 31 frames (translate: 41), H.264 at 1 frame/s in 4:4:4 (what ffmpeg picks for RGB input to
  libx264 in the official command line): `-crf 20` for the moving perturbations, `-tune grain`
  (crf 23) for the noise ones, `--preset veryslow` as there (a faster preset changes the file size,
  not the frames' content, beyond compression noise).
- Noise sequences: frame 0 clean, every later frame with fresh noise; the noise levels change with
  the difficulty, which gets its own folder (`gaussian_noise_2`, ...), as in ImageNet-P.
- The other sequences move smoothly: a brightness, angle, shift, scale, blur or snow parameter
  steps once per frame; their difficulty is a comparison step at evaluation, not a folder.
- Frame size: `--size S` resizes the shorter side to S*256/224 and centre-crops S after the
  perturbation (ImageNet-P: 256 -> 224); by default the image is used as stored and frames are its
  central square. Constants in pixels (blur radii, shifts, snow flake blur) are given for 224 px
  and scale with the frame size; angles, scale factors, brightness steps and noise levels are
  dimensionless and kept. (hendrycks' 64 px generator picked other noise levels by hand,
  hendrycks/robustness issue #23; it is not followed.)

Deterministic for a seed: each video's randomness comes from (seed, perturbation, difficulty,
image index) and x264 is deterministic, so the bytes do not depend on `--workers` or on which
perturbations are asked for. Written to a temporary folder and renamed into place with a
`.complete` marker holding the parameters; a finished tree with the same parameters is reused.
ImageMagick's motion blur (used by motion_blur and snow) is `imagecorruptions`' numpy version of it.

    python -m augmix_gpu.data.make_p SRC OUT [--perturbations ...] [--extra] [--difficulties 1 2 3]
        [--per_class N] [--size S] [--seed S] [--workers N] [--preset veryslow]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..protocols import EXTRA_PERTURBATIONS, PERTURBATIONS, is_noise, perturbation_folder
from .cifar_corruptions import drop_shading
from .folders import DatasetError, find_classes, first_per_class, scan_folder
from .publish import MARKER, begin, finish  # noqa: F401  (MARKER: public)

_ALL = PERTURBATIONS + EXTRA_PERTURBATIONS
FPS = 1  # make_imagenet_p.py: ffmpeg -r 1 -framerate 1
# Per difficulty 1, 2, 3 (make_imagenet_p.py, the commented _2/_3 blocks).
GAUSSIAN_SIGMA = (0.03, 0.05, 0.08)
SHOT_PHOTONS = (300, 120, 60)
SPECKLE_SIGMA = (0.05, 0.10, 0.15)


def video_seed(seed: int, perturbation: str, difficulty: int, index: int) -> int:
    """The 32-bit numpy seed of one output sequence."""
    keys = [int(seed), _ALL.index(perturbation), int(difficulty), int(index)]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


# ----------------------------------------------------------------------------- frame helpers


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by truncation, as `np.uint8(255 * x)` and ToPILImage do there."""
    return (255.0 * np.clip(x, 0.0, 1.0)).astype(np.uint8)


def _crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre `size` square (torchvision CenterCrop's rounding)."""
    h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top : top + size, left : left + size]


def _affine(img: np.ndarray, size: int, **kw) -> np.ndarray:
    """torchvision's affine about the centre on the PIL image (bilinear, fill 0), then crop."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    kw = {"angle": 0.0, "translate": [0.0, 0.0], "scale": 1.0, "shear": [0.0, 0.0], **kw}
    out = TF.affine(Image.fromarray(img), interpolation=TF.InterpolationMode.BILINEAR, **kw)
    return _crop(np.asarray(out), size)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage (Wand in the original), as `imagecorruptions` rewrote it;
    its kernel width needs a whole radius in pixels."""
    from imagecorruptions.corruptions import _motion_blur as blur

    return blur(x, radius=max(1, round(radius)), sigma=sigma, angle=angle)


def _gray(x: np.ndarray) -> np.ndarray:
    """OpenCV's RGB2GRAY weights, [H, W, 1]."""
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]


# ----------------------------------------------------------------------------- perturbations
# Each takes (base image uint8 [H,W,3], frame size S, difficulty, rng, k = S/224) and returns the
# frames. `base` is the image before the centre crop (ImageNet-P: resized to 256).


def _gaussian_noise(base, size, d, rng, k):
    x = _crop(base, size) / 255.0
    sigma = GAUSSIAN_SIGMA[d - 1]
    return [_to_uint8(x)] + [_to_uint8(x + sigma * rng.standard_normal(x.shape)) for _ in range(30)]


def _shot_noise(base, size, d, rng, k):
    x = _crop(base, size) / 255.0
    lam = SHOT_PHOTONS[d - 1]
    return [_to_uint8(x)] + [_to_uint8(rng.poisson(x * lam) / lam) for _ in range(30)]


def _speckle_noise(base, size, d, rng, k):
    x = _crop(base, size) / 255.0
    sigma = SPECKLE_SIGMA[d - 1]
    return [_to_uint8(x)] + [
        _to_uint8(x + x * sigma * rng.standard_normal(x.shape)) for _ in range(30)
    ]


def _motion_blur_seq(base, size, d, rng, k):
    # radius 10, sigma 3 px at 224; the blur direction sweeps (i - 30) * 4 degrees.
    x = _crop(base, size)
    return [
        np.clip(_motion_blur(x, 10 * k, 3 * k, (i - 30) * 4), 0, 255).astype(np.uint8)
        for i in range(31)
    ]


def _zoom_blur(base, size, d, rng, k):
    # frame i: the running mean of zooms 1 + 0.004 j, j = 0..i (a zoom streak that grows).
    total = _crop(base, size) / 255.0
    frames = [_to_uint8(total)]
    for i in range(1, 31):
        total = total + _affine(base, size, scale=1 + 0.004 * i) / 255.0
        frames.append(_to_uint8(total / (i + 1)))
    return frames


def _snow(base, size, d, rng, k):
    # One snow layer per sequence (N(0.05, 0.3), zoom 3, cut at 0.5), motion-blurred with radius
    # 14, sigma 4 px at 224 along an angle that turns 4 degrees per frame from -150.
    from imagecorruptions.corruptions import clipped_zoom

    x = _crop(base, size) / 255.0
    layer = rng.normal(size=(size, size), loc=0.05, scale=0.3)
    layer = clipped_zoom(layer[..., None], 3)[:size, :size]  # it may overshoot by a pixel or two
    layer[layer < 0.5] = 0
    layer = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)  # the PNG it was saved as
    lifted = 0.85 * x + 0.15 * np.maximum(x, _gray(x) * 1.5 + 0.5)
    frames = []
    for i in range(31):
        moving = _motion_blur(layer, 14 * k, 4 * k, i * 4 - 150) / 255.0
        moving = np.clip(moving, 0, 1)[..., None]
        frames.append(_to_uint8(lifted + moving + np.rot90(moving, k=2)))
    return frames


def _brightness(base, size, d, rng, k):
    # HSV value + (i - 15) * 0.02, i = 0..30.
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(_crop(base, size) / 255.0)
    frames = []
    for i in range(31):
        z = hsv.copy()
        z[..., 2] = np.clip(z[..., 2] + (i - 15) * 2 / 100.0, 0, 1)
        frames.append(_to_uint8(hsv2rgb(z)))
    return frames


def _translate(base, size, d, rng, k):
    # 41 frames, horizontal shift i - 20 px at 224 (integer there; sub-pixel, bilinear, below).
    return [_affine(base, size, translate=[(i - 20) * k, 0.0]) for i in range(41)]


def _rotate(base, size, d, rng, k):
    return [_affine(base, size, angle=float(i - 15)) for i in range(31)]  # -15..15 degrees


def _tilt(base, size, d, rng, k):
    # A perspective camera (focal length = the image diagonal) turned by i - 15 degrees about the
    # x and y axes together, OpenCV's warpPerspective (bilinear, fill 0).
    import cv2

    h, w = base.shape[:2]
    f = math.sqrt(w**2 + h**2)
    p1 = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]])
    p2 = np.array([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]])
    t = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]])
    frames = []
    for i in range(31):
        a = np.deg2rad(i - 15)
        c, s = np.cos(a), np.sin(a)
        rx = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]])
        ry = np.array([[c, 0, -s, 0], [0, 1, 0, 0], [s, 0, c, 0], [0, 0, 0, 1]])
        frames.append(_crop(cv2.warpPerspective(base, p2 @ t @ rx @ ry @ p1, (w, h)), size))
    return frames


def _scale(base, size, d, rng, k):
    return [_affine(base, size, scale=(i * 2.5 + 40) / 100.0) for i in range(31)]  # 0.4..1.15


def _gaussian_blur(base, size, d, rng, k):
    from skimage.filters import gaussian

    x = _crop(base, size) / 255.0
    return [
        _to_uint8(gaussian(x, sigma=(0.25 + 0.035 * i) * k, channel_axis=-1, truncate=6.0))
        for i in range(31)
    ]


def _spatter(base, size, d, rng, k):
    # A liquid layer (N(0.65, 0.27), blurred 3.7 px at 224, cut at 0.69) whose drops run down one
    # row-convolution [0.05, 0.1, 0.15, 0.7] per frame, drawn in pale turquoise (175, 238, 238).
    from skimage.filters import gaussian

    x = _crop(base, size) / 255.0
    liquid = gaussian(rng.normal(size=(size, size), loc=0.65, scale=0.27), sigma=3.7 * k)
    liquid[liquid < 0.69] = 0
    colour = np.array([175, 238, 238]) / 255.0
    frames = []
    for _ in range(31):
        m = drop_shading(liquid)
        m = 0.6 * m / max(float(m.max()), 1e-12)
        frames.append(_to_uint8(x + m[..., None] * colour))
        liquid = np.apply_along_axis(
            lambda col: np.convolve(col, np.array([0.05, 0.1, 0.15, 0.7]), mode="same"), 0, liquid
        )
    return frames


def _shear(base, size, d, rng, k):
    return [_affine(base, size, shear=[float(i - 15), 0.0]) for i in range(31)]  # degrees


_FRAMES: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "motion_blur": _motion_blur_seq,
    "zoom_blur": _zoom_blur, "snow": _snow, "brightness": _brightness, "translate": _translate,
    "rotate": _rotate, "tilt": _tilt, "scale": _scale, "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur, "spatter": _spatter, "shear": _shear,
}  # fmt: skip


def base_image(path: str, size: int | None) -> tuple[np.ndarray, int]:
    """(the image to perturb, uint8 [H,W,3]; the frame size S)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            shorter = round(size * 256 / 224)
            w, h = im.size
            scale = shorter / min(w, h)
            im = im.resize((max(shorter, round(w * scale)), max(shorter, round(h * scale))),
                           Image.BILINEAR)  # fmt: skip
        img = np.asarray(im)
    return img, (size if size is not None else min(img.shape[:2]))


def sequence_frames(
    path: str, perturbation: str, difficulty: int, seed: int, size: int | None = None
) -> list[np.ndarray]:
    """The uint8 ``[S, S, 3]`` frames of one sequence, deterministic for ``seed``."""
    base, s = base_image(path, size)
    rng = np.random.default_rng(seed)
    return _FRAMES[perturbation](base, s, int(difficulty), rng, s / 224.0)


def write_video(frames: Sequence[np.ndarray], path: str, noise: bool, preset: str) -> None:
    """H.264 in MP4 at 1 frame/s, 4:4:4, x264 options of make_imagenet_p.py (PyAV's FFmpeg)."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        opts = {"preset": preset}
        opts.update({"tune": "grain"} if noise else {"crf": "20"})
        stream.options = opts
        for f in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(f), "rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _work(task: tuple) -> None:
    src, dst, perturbation, difficulty, seed, size, preset = task
    frames = sequence_frames(src, perturbation, difficulty, seed, size)
    write_video(frames, dst, is_noise(perturbation), preset)


def make_perturbed_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    perturbations: Sequence[str] = PERTURBATIONS,
    difficulties: Sequence[int] = (1,),
    per_class: int | None = None,
    size: int | None = None,
    seed: int = 0,
    workers: int = 0,
    preset: str = "veryslow",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Make the sequences of every (or `per_class`) image of the ImageFolder tree `src`; return `out`.

    Difficulties 2 and 3 add `_2`/`_3` folders for the noise perturbations only (the others are
    read from one folder at every difficulty). `workers=0` runs in this process.
    """
    unknown = [p for p in perturbations if p not in _ALL]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}: choose from {', '.join(_ALL)}")
    if not perturbations:
        raise ValueError("no perturbations asked for")
    if not difficulties or any(int(d) not in (1, 2, 3) for d in difficulties):
        raise ValueError(f"difficulties must be a non-empty subset of 1, 2, 3, got {difficulties}")
    src_root, out = Path(src), Path(out)
    samples = first_per_class(scan_folder(src_root), per_class)
    classes = find_classes(src_root)[0]
    _, s = base_image(samples[0][0], size)
    if s < 16:
        raise DatasetError(f"{samples[0][0]!r} gives {s} px frames: the sequences need >= 16 px")
    params = dict(src=str(src_root.resolve()), n=len(samples), perturbations=list(perturbations),
                  difficulties=sorted({int(d) for d in difficulties}), per_class=per_class,
                  size=size, seed=int(seed), preset=preset, version=1)  # fmt: skip
    tmp = begin(out, params, overwrite, "-P set")
    if tmp is None:
        return out
    tasks = []
    for p in perturbations:
        for folder in sorted({perturbation_folder(p, int(d)) for d in difficulties}):
            diff = int(folder.rsplit("_", 1)[1]) if folder != p else 1
            for cls in classes:
                (tmp / folder / cls).mkdir(parents=True, exist_ok=True)
            for index, (path, _) in enumerate(samples):
                rel = Path(path).relative_to(src_root)
                dst = tmp / folder / rel.parent / (rel.stem + ".mp4")
                dst.parent.mkdir(parents=True, exist_ok=True)
                tasks.append((path, str(dst), p, diff, video_seed(seed, p, diff, index), size,
                              preset))  # fmt: skip

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"-P {out.name}", unit="video", disable=not progress)
    try:
        if workers > 0:
            from .pools import process_pool  # forkserver: the trainer calls this after CUDA starts

            with process_pool(workers, preload=(__name__,)) as pool:
                for _ in pool.map(_work, tasks, chunksize=4):
                    bar.update()
        else:
            for task in tasks:
                _work(task)
                bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return finish(tmp, out, params)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "src", help="ImageFolder tree (root/<class>/<image>), e.g. the synthetic val set"
    )
    p.add_argument("out", help="output root: OUT/<perturbation>[_<difficulty>]/<class>/<name>.mp4")
    p.add_argument("--perturbations", nargs="+", default=None, help="default: the 10 of ImageNet-P")
    p.add_argument("--extra", action="store_true",
                   help="also the 4 validation ones: " + ", ".join(EXTRA_PERTURBATIONS))  # fmt: skip
    p.add_argument("--difficulties", type=int, nargs="+", default=[1], choices=(1, 2, 3))
    p.add_argument("--per_class", type=int, default=None, help="first N images of each class")
    p.add_argument("--size", type=int, default=None, help="frame size (ImageNet-P: 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (0: this one)")
    p.add_argument("--preset", default="veryslow", help="x264 preset (official: veryslow)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    perts = list(a.perturbations or PERTURBATIONS) + (list(EXTRA_PERTURBATIONS) if a.extra else [])
    out = make_perturbed_dataset(
        a.src, a.out, perturbations=perts, difficulties=a.difficulties, per_class=a.per_class,
        size=a.size, seed=a.seed, workers=a.workers, preset=a.preset, overwrite=a.overwrite,
    )  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
