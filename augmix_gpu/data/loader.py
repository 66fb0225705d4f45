"""Epoch iterators over the DALI pipeline: `build_loader(...)` and `loader.epoch(e, start_step)`.

One DALI pipeline is built per call to `epoch()` and released when the epoch ends. Why:
- the order and the random crops become a pure function of (seed, epoch, rank[, start_step]), so
  "2 epochs straight" equals "1 epoch, a fresh process, then epoch 1" (exact resume);
- train and val pipelines never hold decoder buffers at the same time (GPU memory);
- building costs milliseconds on the CPU, against an epoch of minutes.

Corrupt images met during a run (a header that passed the scan, but a body DALI cannot decode):
`on_corrupt="error"` (default) stops with a `DatasetError` naming the file; `on_corrupt="skip"`
names it in a warning, lists it in `loader.skipped`, and replaces it for the rest of the run by a
neighbour from the same batch (train: a duplicate with its label; eval: a padded slot with
`valid=False`, so the accuracy simply does not count it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch

from .cifar import CifarArrays
from .crops import UNREADABLE_WINDOW, encoded_size, random_resized_crops
from .folders import DatasetError, find_classes, scan_folder
from .pipeline import RANDOM_AREA, RANDOM_ASPECT, RECIPES, build_pipeline
from .sharding import eval_indices, stream_seed, train_indices, train_steps

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _resolve_device(device: str) -> tuple[torch.device, str, int | None]:
    """("auto"|"cpu"|"gpu") -> (torch device, DALI device kind, DALI device_id)."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu"), "cpu", None
    if not torch.cuda.is_available():
        raise ValueError("device='gpu' but torch sees no CUDA device: use device='cpu' or 'auto'")
    index = torch.cuda.current_device()  # the trainer sets it to LOCAL_RANK before building
    return torch.device("cuda", index), "gpu", index


def _constant_batch(data: np.ndarray):
    """A DALI batch callback that returns the one-sample batch `[data]` every time."""
    return lambda _iteration: [data]


class DaliLoader:
    """Sharded, seeded epochs of `(images uint8 [B,3,H,W], labels int64 [B], valid bool [B])`."""

    def __init__(
        self,
        recipe: str,
        *,
        paths: Sequence[str] | None,
        arrays: CifarArrays | None,
        labels: np.ndarray,
        classes: list[str],
        batch_size: int,
        device: str,
        rank: int,
        world_size: int,
        seed: int,
        crop_size: int,
        resize_size: int,
        c_resize: int | None,
        num_threads: int,
        prefetch: int,
        on_corrupt: str,
        random_area: tuple[float, float] = RANDOM_AREA,
        antialias: bool = True,
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if not 0 < random_area[0] <= random_area[1] <= 1:
            raise ValueError(
                f"random_area must satisfy 0 < min <= max <= 1, got {tuple(random_area)}"
            )
        if recipe == "val" and resize_size < crop_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= crop_size ({crop_size})")
        self.recipe, self.batch_size = recipe, int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.classes = list(classes)
        self.device, self._dali_device, self._device_id = _resolve_device(device)
        self._paths = list(paths) if paths is not None else None
        self._arrays = arrays
        self._labels = np.asarray(labels, dtype=np.int64)
        self._n = len(self._labels)
        self._opts = dict(
            crop_size=crop_size, resize_size=resize_size, c_resize=c_resize,
            num_threads=num_threads, prefetch=prefetch, antialias=bool(antialias),
        )  # fmt: skip
        self.random_area = (float(random_area[0]), float(random_area[1]))
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []  # files found corrupt during a run (on_corrupt="skip")
        self._bad: set[int] = set()
        if recipe == "train":
            train_indices(self._n, self.batch_size, self.rank, self.world_size, 0, 0)  # validates
            self._steps = train_steps(self._n, self.batch_size, self.world_size)
            self._num_samples = self._steps * self.batch_size
        else:
            idx, _, self._num_samples = eval_indices(
                self._n, self.batch_size, self.rank, self.world_size
            )
            self._steps = len(idx) // self.batch_size

    def __len__(self) -> int:
        """Steps per epoch for this rank (equal on every rank)."""
        return self._steps

    @property
    def num_samples(self) -> int:
        """Real images this rank yields per epoch (eval: summed over ranks == dataset size)."""
        return self._num_samples

    @property
    def is_train(self) -> bool:
        return self.recipe == "train"

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (indices, valid) for the whole epoch, known-bad files substituted."""
        if self.is_train:
            idx = train_indices(
                self._n, self.batch_size, self.rank, self.world_size, self.seed, epoch
            )
            valid = np.ones(len(idx), dtype=bool)
        else:
            idx, valid, _ = eval_indices(self._n, self.batch_size, self.rank, self.world_size)
        if self._bad:
            idx, valid = idx.copy(), valid.copy()
            for b in range(0, len(idx), self.batch_size):
                sl = slice(b, b + self.batch_size)
                bad = np.isin(idx[sl], list(self._bad))
                if bad.any():
                    good = idx[sl][~bad]
                    if len(good) == 0:
                        raise DatasetError(f"every file of batch {b // self.batch_size} is corrupt")
                    idx[sl][bad] = good[0]
                    if not self.is_train:
                        valid[sl][bad] = False
        return idx, valid

    def _pipeline(self, idx: np.ndarray, epoch: int, start_step: int):
        """A pipeline over `idx` (this rank's samples from `start_step` on)."""
        return build_pipeline(
            self.recipe,
            source=self._source(idx, epoch, start_step),
            encoded=self._paths is not None,
            batch_size=self.batch_size,
            device=self._dali_device,
            device_id=self._device_id,
            seed=stream_seed(self.seed, epoch, self.rank, start_step),
            **self._opts,
        )

    def _source(self, idx: np.ndarray, epoch: int, start_step: int):
        """A DALI batch callback over `idx`; stops after its last batch (no work past the epoch).

        Files: the encoded bytes (DALI decodes them). CIFAR arrays: images, labels and, for
        train, pad-4 crop anchors and flips drawn per (seed, epoch, rank, step), so a resumed
        epoch repeats the uninterrupted one exactly.
        """
        paths, images, labels, bs = self._paths, self._arrays, self._labels, self.batch_size
        steps = len(idx) // bs

        def source(iteration: int):
            if iteration >= steps:
                raise StopIteration
            batch = idx[iteration * bs : (iteration + 1) * bs]
            lab = labels[batch].astype(np.int32)
            if paths is not None:
                files = [np.fromfile(paths[i], dtype=np.uint8) for i in batch]
            else:
                files = images.images[batch]
            if not self.is_train:
                return files, lab
            # Every random choice of this batch, from (seed, epoch, rank, step) alone.
            rng = np.random.default_rng([self.seed, epoch, self.rank, start_step + iteration])
            if paths is not None:
                sizes = [encoded_size(f) for f in files]
                windows = random_resized_crops(
                    [s or (1, 1) for s in sizes], rng, self.random_area, RANDOM_ASPECT
                )
                windows[[s is None for s in sizes]] = UNREADABLE_WINDOW
            else:
                windows = rng.integers(-4, 5, size=(bs, 2), dtype=np.int32)  # (y, x) px, pad 4
            flips = rng.integers(0, 2, size=bs, dtype=np.int32)
            return files, lab, windows, flips

        return source

    def _to_torch(self, tensor_list, dtype: torch.dtype, what: str) -> torch.Tensor:
        from nvidia.dali.backend import TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if not tensor_list.is_dense_tensor():
            shapes = sorted({tuple(s) for s in tensor_list.shape()})
            raise DatasetError(
                f"{what} in one batch have different shapes {shapes[:4]}: images smaller than "
                f"crop_size={self._opts['crop_size']} are kept whole by the 'corrupted' recipe; "
                "lower crop_size or pass c_resize"
            )
        tensor = tensor_list.as_tensor()
        if isinstance(
            tensor_list, TensorListGPU
        ):  # images from the mixed decoder: device to device
            out = torch.empty(tensor.shape(), dtype=dtype, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        out = torch.empty(tensor.shape(), dtype=dtype)  # CPU outputs (labels; the CPU path)
        feed_ndarray(tensor, out)
        return out.to(self.device, non_blocking=True) if self.device.type != "cpu" else out

    def _find_corrupt(self, idx: np.ndarray) -> list[int]:
        """Decode each candidate alone on the CPU; return the indices DALI cannot decode (train:
        also those whose header PIL cannot read, as their crop window could not be drawn)."""
        from nvidia import dali
        from nvidia.dali import fn, types

        bad = []
        for i in dict.fromkeys(int(j) for j in idx):
            data = np.fromfile(self._paths[i], dtype=np.uint8)
            if self.is_train and encoded_size(data) is None:  # no train window could be drawn
                bad.append(i)
                continue
            pipe = dali.Pipeline(
                batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1
            )
            with pipe:
                enc = fn.external_source(
                    source=_constant_batch(data), batch=True, dtype=types.UINT8
                )
                pipe.set_outputs(fn.decoders.image(enc, output_type=types.RGB))
            try:
                pipe.build()
                pipe.run()
            except Exception:  # any failure to decode it alone marks the file bad
                bad.append(i)
            del pipe
        return bad

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches of `epoch`, from batch `start_step` on (mid-epoch resume).

        Train: the batches from `start_step` on are exactly the uninterrupted run's, files and
        pixels: every random choice (crop window, flip; CIFAR's pad-crop anchor) is drawn on the
        host per batch from (seed, epoch, rank, step), none by DALI's own RNG.
        """
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        step = start_step
        while step < len(self):
            idx, valid = self._order(epoch)
            pipe = self._pipeline(idx[step * self.batch_size :], epoch, step)
            try:
                while step < len(self):
                    images, labels = pipe.run()
                    sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
                    batch = (
                        self._to_torch(images, torch.uint8, "images"),
                        self._to_torch(labels, torch.int32, "labels").view(-1).long(),
                        torch.tensor(valid[sl], device=self.device),
                    )
                    step += 1
                    yield batch
            except (RuntimeError, IndexError) as err:  # DALI raises either for a failed decode
                if self._paths is None:
                    raise
                # The failing batch is the current one or one DALI already prefetched.
                lookahead = idx[
                    step * self.batch_size : (step + 1 + self._opts["prefetch"]) * self.batch_size
                ]
                bad = self._find_corrupt(lookahead)
                if not bad:
                    raise
                names = [self._paths[i] for i in bad]
                if self.on_corrupt == "error":
                    raise DatasetError(
                        f"cannot decode {names} (DALI: {str(err).splitlines()[-1] if str(err) else err}): "
                        "delete or replace the file(s), or build the loader with on_corrupt='skip'"
                    ) from None
                warnings.warn(f"skipping corrupt image(s) {names}", stacklevel=2)
                self._bad.update(bad)
                self.skipped.extend(names)
            finally:
                del pipe

    def __repr__(self) -> str:
        return (
            f"DaliLoader(recipe={self.recipe!r}, n={self._n}, batch_size={self.batch_size}, "
            f"rank={self.rank}/{self.world_size}, steps={len(self)}, device={self.device})"
        )


def build_loader(
    source: str | os.PathLike | CifarArrays,
    recipe: str,
    *,
    batch_size: int,
    device: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    crop_size: int = 224,
    resize_size: int = 256,
    c_resize: int | None = None,
    classes: Sequence[str] | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    on_corrupt: str = "error",
    random_area: tuple[float, float] = RANDOM_AREA,
    antialias: bool = True,
    exclude: Collection[str] = (),
) -> DaliLoader:
    """A loader over an ImageNet-layout folder or `CifarArrays`; see the module docstring.

    `exclude`: paths relative to `source` left out (the held-out split of the severity's
    held-out objective).

    `rank`/`world_size` are the GLOBAL ones (torchrun's RANK / WORLD_SIZE). `classes` maps folder
    names to labels (the list saved with a checkpoint); by default the sorted folder names.
    """
    common = dict(
        batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed,
        crop_size=crop_size, resize_size=resize_size, c_resize=c_resize,
        num_threads=num_threads, prefetch=prefetch, on_corrupt=on_corrupt, random_area=random_area,
        antialias=antialias,
    )  # fmt: skip
    if isinstance(source, CifarArrays):
        names = list(source.classes)
        if classes is not None and list(classes) != names:
            raise ValueError(
                f"classes {list(classes)[:3]}... differ from the arrays' {names[:3]}..."
            )
        return DaliLoader(
            recipe, paths=None, arrays=source, labels=source.labels, classes=names, **common
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a folder path or CifarArrays, got {type(source).__name__}")
    samples = scan_folder(source, classes)
    if exclude:
        drop = {os.path.normpath(os.path.join(source, rel)) for rel in exclude}
        samples = [s for s in samples if os.path.normpath(s[0]) not in drop]
    names = list(classes) if classes is not None else find_classes(source)[0]
    labels = np.array([lab for _, lab in samples], dtype=np.int64)
    return DaliLoader(
        recipe, paths=[p for p, _ in samples], arrays=None, labels=labels, classes=names, **common
    )
