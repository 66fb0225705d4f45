"""The one DALI pipeline builder: train / val / corrupted recipes over JPEG files or CIFAR arrays.

The GPU and CPU paths are this same graph with another device string: `device="gpu"` decodes with
`device="mixed"` (nvJPEG, host Huffman + device IDCT) on `device_id`, and every later op then runs
on the GPU because its input lives there; `device="cpu"` decodes with libjpeg-turbo
(`device_id=None`, a CPU-only pipeline). DALI is imported inside the functions so that importing
`augmix_gpu.data` stays cheap and CUDA-free.

Why an external source and not `readers.file`: the reader wraps around at the end of its list and
DALI prefetches `prefetch` batches past the epoch end (wasted decoding, 2 batches per epoch per
rank); a callback that stops ends the pipeline's work exactly at the epoch end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RECIPES = ("train", "val", "corrupted")
# torchvision RandomResizedCrop defaults (Szegedy et al. 2015, "Inception" crop).
RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_PAD = 4  # px; the CIFAR AugMix recipe's RandomCrop(32, padding=4), zero fill


def build_pipeline(
    recipe: str,
    *,
    source: Callable[[int], tuple],
    encoded: bool,
    batch_size: int,
    device: str,
    device_id: int | None,
    seed: int,
    num_threads: int,
    prefetch: int,
    crop_size: int = 224,
    resize_size: int = 256,
    c_resize: int | None = None,
    antialias: bool = True,
) -> Any:
    """A built `nvidia.dali.Pipeline` with outputs `(images uint8 [B,3,H,W] CHW, labels int32 [B])`.

    `source(iteration)` is a DALI batch callback (raising `StopIteration` after the last batch);
    the caller has already shuffled and sharded, and draws every random choice of the batch (so
    a batch is exactly reproducible from its step, and the same on the CPU and GPU paths). With
    `encoded=True` it returns `(list of B encoded files as uint8 1-D arrays, labels [B] int32)`
    plus, for `train`, `(windows [B,4] int32 as (x, y, w, h) from `crops.random_resized_crops`,
    flips [B] int32)`; otherwise CIFAR-style `(images [B,H,W,3] uint8, labels [B] int32)` plus,
    for `train`, `(anchors [B,2] int32 as (y, x) in [-4, 4], flips [B] int32)`.

    `antialias` applies to the train recipe's resize only (val and -C always antialias: they are
    the evaluation protocol). Without it the CPU path spends ~0.2 ms less per 224 px image and the
    crops differ from PIL's by 33-50 dB PSNR (the benchmark and the README have the figures).
    """
    from nvidia import dali

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu' here, got {device!r}")
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=seed,
        prefetch_queue_depth=prefetch,
    )
    with pipe:
        if encoded and recipe == "train":
            images, lab = _jpeg_train(source, device, crop_size, antialias)
        elif encoded:
            shorter = resize_size if recipe == "val" else c_resize
            images, lab = _jpeg_eval(source, device, crop_size, shorter)
        else:
            images, lab = _arrays(source, device, recipe)
        if device == "gpu":  # every output on the device: the loader copies them in stream order
            lab = lab.gpu()
        pipe.set_outputs(images, lab)
    pipe.build()
    return pipe


def _decoder(device: str) -> dict[str, Any]:
    """The JPEG decoder's arguments: nvJPEG (`"mixed"`) for the GPU path, else libjpeg-turbo."""
    from nvidia.dali import types

    # EXIF orientation is not applied: torchvision's ImageFolder (PIL) does not apply it either,
    # and the train windows are drawn on the header's (unrotated) size. RGB output: greyscale and
    # CMYK JPEGs (ImageNet has both) come out as 3 channels, CMYK converted as PIL converts it.
    # Fancy (triangular) chroma upsampling on the GPU too: libjpeg-turbo's and PIL's default, so
    # the mixed decoder's pixels match the CPU path's and torchvision's instead of nvJPEG's
    # nearest-neighbour chroma (the README's loader section has the measured difference).
    return dict(
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,
        jpeg_fancy_upsampling=True,
    )


def _to_chw() -> dict[str, Any]:
    """The output stage's arguments: uint8, channels first."""
    from nvidia.dali import types

    return dict(dtype=types.UINT8, output_layout="CHW")


def _jpeg_train(
    source: Callable[[int], tuple], device: str, crop_size: int, antialias: bool
) -> tuple[Any, Any]:
    """JPEG files, train recipe: decode the drawn window only, resize it to the crop, flip."""
    from nvidia.dali import fn, types

    encoded_files, lab, windows, flips = fn.external_source(
        source=source, num_outputs=4, batch=True, dtype=[types.UINT8] + [types.INT32] * 3
    )
    # ROI decode: only the window is decoded (libjpeg-turbo / nvJPEG crop).
    images = fn.decoders.image_slice(
        encoded_files,
        windows[0:2],
        windows[2:4],
        normalized_anchor=False,
        normalized_shape=False,
        axis_names="WH",
        **_decoder(device),
    )
    # Linear + antialias = PIL's bilinear on downscaling, as torchvision does.
    images = fn.resize(images, resize_x=crop_size, resize_y=crop_size, antialias=bool(antialias))
    return fn.crop_mirror_normalize(images, mirror=flips, **_to_chw()), lab


def _jpeg_eval(
    source: Callable[[int], tuple], device: str, crop_size: int, shorter: int | None
) -> tuple[Any, Any]:
    """JPEG files, val / corrupted recipe: decode, resize the shorter side (if set), centre crop."""
    from nvidia.dali import fn, types

    encoded_files, lab = fn.external_source(
        source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32]
    )
    images = fn.decoders.image(encoded_files, **_decoder(device))
    if shorter is not None:
        images = fn.resize(images, resize_shorter=shorter, antialias=True)
    # `trim_to_shape`: an image smaller than the crop is kept whole (the -C protocol
    # crops only what is larger); the val recipe always has shorter >= crop.
    images = fn.crop_mirror_normalize(
        images,
        crop=(crop_size, crop_size),
        out_of_bounds_policy="trim_to_shape",
        **_to_chw(),
    )
    return images, lab


def _arrays(source: Callable[[int], tuple], device: str, recipe: str) -> tuple[Any, Any]:
    """CIFAR-style uint8 `[H,W,3]` arrays: the train recipe pads, crops and flips; the others
    only transpose to CHW."""
    from nvidia.dali import fn, types

    if recipe == "train":
        images, lab, anchors, flips = fn.external_source(
            source=source, num_outputs=4, batch=True, layout=["HWC", "", "", ""]
        )
    else:
        images, lab = fn.external_source(
            source=source, num_outputs=2, batch=True, layout=["HWC", ""]
        )
    hw = images.shape(dtype=types.INT32)[0:2]  # a CPU node: argument inputs live on the CPU
    if device == "gpu":
        images = images.gpu()
    if recipe != "train":
        return fn.crop_mirror_normalize(images, **_to_chw()), lab
    # Pad 4 px with zeros then crop back to the input size == a window at anchor in
    # [-4, 4] with out-of-bounds pixels filled with 0.
    images = fn.slice(
        images,
        start=anchors,
        shape=hw,
        axis_names="HW",
        out_of_bounds_policy="pad",
        fill_values=0,
    )
    return fn.crop_mirror_normalize(images, mirror=flips, **_to_chw()), lab
