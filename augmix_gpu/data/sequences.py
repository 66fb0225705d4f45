"""Batches of whole perturbation sequences, sharded by global rank: one ImageNet-P folder per loader.

The unit is a sequence, not a frame: a rank owns sequences ``r, r+W, r+2W, ...`` (the partition of
``sharding.eval_indices``) and decodes each whole, so its flips are counted on one rank, once.
No padding is needed: nothing collective happens per batch, and the caller checks that every
sequence was counted exactly once after the all-reduce.

Preprocessing is the -C protocol's (``pipeline.py``, recipe ``corrupted``): frames as stored, then
a centre crop of ``crop_size`` where a side is larger (a smaller side is kept whole), with DALI's
anchor rounding; the evaluation loop then applies the model's normalisation. ImageNet-P frames are
224 x 224 already (make_imagenet_p.py: resize 256, centre crop 224), so at 224 nothing is cropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .folders import DatasetError
from .sharding import eval_indices
from .video import VIDEO_EXTENSIONS, build_decoder

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def scan_videos(root: str | os.PathLike, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for ``root/<class>/**/<video>``, classes in the given (checkpoint) order."""
    root = Path(root)
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for d in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        if d not in index:
            raise DatasetError(
                f"class folder {str(root / d)!r} is not among the model's {len(index)} classes"
            )
        for dirpath, dirnames, files in os.walk(root / d):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."):
                    samples.append((os.path.join(dirpath, f), index[d]))
    if not samples:
        raise DatasetError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {str(root)!r}")
    return samples


def centre_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, 3, H, W]`` -> centre ``size x size`` crop; a side smaller than ``size`` stays whole.

    Anchor ``(H - size + 1) // 2``: DALI's ``crop_mirror_normalize`` rounds the half-pixel centre
    up (measured against it in the tests), so frames and -C images are cropped alike.
    """
    h, w = frames.shape[-2:]
    top = max(0, (h - size + 1) // 2)
    left = max(0, (w - size + 1) // 2)
    return frames[..., top : top + min(size, h), left : left + min(size, w)]


class SequenceLoader:
    """This rank's sequences in batches ``(frames uint8 [F,3,h,w], labels [B], index [B], lengths [B])``.

    ``frames`` concatenates the ``B`` sequences' frames (``F = sum(lengths)``); ``index`` is each
    sequence's position in the folder's sorted list (the same on every rank).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        crop_size: int = 224,
        decoder: str = "auto",
        num_threads: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 sequence, got {batch_size}")
        self.root = Path(root)
        self.classes = list(classes)
        self.samples = scan_videos(root, self.classes)
        idx, valid, _ = eval_indices(len(self.samples), batch_size, rank, world_size)
        self.own = idx[valid]
        self.batch_size, self.crop_size = int(batch_size), int(crop_size)
        self.device = torch.device(device)
        self._decoder_kind, self._threads = decoder, num_threads
        self.decoder_name: str | None = None

    def __len__(self) -> int:
        """Batches this rank reads (ranks may differ by one: no collective runs per batch)."""
        return -(-len(self.own) // self.batch_size)

    @property
    def num_sequences(self) -> int:
        """Sequences in the folder (all ranks together)."""
        return len(self.samples)

    @property
    def num_samples(self) -> int:
        """Sequences this rank reads."""
        return len(self.own)

    def paths(self, indices: Sequence[int]) -> list[str]:
        return [self.samples[int(i)][0] for i in indices]

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches; the next batch decodes while the model runs on this one."""
        decoder = build_decoder(
            self._decoder_kind,
            device=self.device,
            batch_size=self.batch_size,
            num_threads=self._threads,
        )
        self.decoder_name = decoder.name
        chunks = [
            self.own[i : i + self.batch_size] for i in range(0, len(self.own), self.batch_size)
        ]
        # One batch decoded ahead, in a thread; a GPU decoder's frames are complete when its
        # decode() returns (video.py waits for its copies before DALI's next run).
        ahead = ThreadPoolExecutor(1)
        try:
            pending: Future | None = (
                ahead.submit(decoder.decode, self.paths(chunks[0])) if chunks else None
            )
            for k, chunk in enumerate(chunks):
                videos = pending.result()
                pending = (
                    ahead.submit(decoder.decode, self.paths(chunks[k + 1]))
                    if k + 1 < len(chunks)
                    else None
                )
                self.decoder_name = decoder.name
                yield self._batch(chunk, videos)
        finally:
            ahead.shutdown(wait=True)
            decoder.close()

    def _batch(self, chunk: np.ndarray, videos: list[torch.Tensor]) -> Batch:
        frames, lengths = [], []
        for i, v in zip(chunk, videos):
            if v.ndim != 4 or v.shape[-1] != 3:
                raise DatasetError(
                    f"{self.samples[int(i)][0]!r} decoded to shape {tuple(v.shape)}, "
                    "expected [frames, H, W, 3]"
                )
            frames.append(centre_crop(v.permute(0, 3, 1, 2), self.crop_size))
            lengths.append(len(v))
        sizes = {tuple(f.shape[-2:]) for f in frames}
        if len(sizes) > 1:
            raise DatasetError(
                f"sequences {self.paths(chunk)[:2]}... have frames of different sizes {sorted(sizes)} "
                f"after the centre crop {self.crop_size}: lower crop_size or re-make the set"
            )
        labels = torch.tensor([self.samples[int(i)][1] for i in chunk], dtype=torch.long)
        return (
            torch.cat(frames).contiguous(),
            labels,
            torch.as_tensor(chunk, dtype=torch.long),
            torch.tensor(lengths, dtype=torch.long),
        )

    def __repr__(self) -> str:
        return (
            f"SequenceLoader({str(self.root)!r}, sequences={self.num_sequences}, "
            f"own={self.num_samples}, batch_size={self.batch_size}, decoder={self._decoder_kind!r})"
        )
