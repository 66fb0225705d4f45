"""Decode perturbation sequences (MP4) into uint8 frames: PyAV on the CPU, DALI on the GPU.

ImageNet-P ships each sequence as one H.264 MP4 (hendrycks/robustness ImageNet-P/create_p: 1 fps,
libx264). Two decoders give the same frames (``tests/test_video.py``):

- ``"cpu"``: PyAV, whose wheels ship their own FFmpeg (no system FFmpeg, no OpenCV), decoding to
  RGB24 in a thread pool (PyAV releases the GIL while decoding).
- ``"dali"``: DALI's ``decoders.video`` fed with the file bytes through ``external_source``, like
  the image loader. ``device="mixed"`` decodes on the GPU (NVDEC: H.264, HEVC, AV1, ...);
  DALI's CPU backend reads VP8/VP9/MJPEG only, so H.264 needs the GPU or ``"cpu"``.

``"auto"`` takes DALI on a CUDA device and PyAV otherwise; if DALI cannot decode a file (NVDEC
does not read every profile, e.g. H.264 4:4:4), it warns once and falls back to PyAV.
A file that cannot be read, or holds no frame, stops with a ``DatasetError`` naming it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .folders import DatasetError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
DECODERS = ("auto", "cpu", "dali")


def _pyav():
    try:
        import av
    except ImportError:
        raise ImportError(
            "reading ImageNet-P videos on the CPU needs PyAV: pip install av "
            "(its wheels ship their own FFmpeg)"
        ) from None
    return av


def read_video_cpu(path: str | os.PathLike) -> np.ndarray:
    """All frames of ``path`` as uint8 ``[T, H, W, 3]`` RGB (PyAV)."""
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{str(path)!r} holds no video stream: re-extract or delete it")
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DatasetError(
            f"cannot decode video {str(path)!r} ({type(e).__name__}: {e}): re-extract or delete it"
        ) from None
    if not frames:
        raise DatasetError(f"video {str(path)!r} holds no frames: re-extract or delete it")
    return np.stack(frames)


class CpuVideoDecoder:
    """PyAV in ``num_threads`` threads; frames stay on the CPU."""

    name = "cpu (PyAV)"

    def __init__(self, num_threads: int = 2) -> None:
        _pyav()  # fail now, not at the first batch
        self._pool = ThreadPoolExecutor(max(1, int(num_threads)))

    def decode(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """One uint8 ``[T, H, W, 3]`` tensor per path."""
        return [torch.from_numpy(a) for a in self._pool.map(read_video_cpu, paths)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class DaliVideoDecoder:
    """DALI ``decoders.video`` on ``device`` ("mixed": GPU, output on the GPU; "cpu")."""

    def __init__(self, batch_size: int, device: str, device_id: int | None, num_threads: int):
        if device not in ("mixed", "cpu"):
            raise ValueError(f"device must be 'mixed' or 'cpu', got {device!r}")
        self.name = f"dali ({device})"
        self._args = (int(batch_size), device, device_id, max(1, int(num_threads)))
        self._pipe = None

    def _build(self):
        from nvidia import dali
        from nvidia.dali import fn, types

        batch_size, device, device_id, threads = self._args
        pipe = dali.Pipeline(
            batch_size=batch_size,
            num_threads=threads,
            device_id=device_id if device == "mixed" else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
            pipe.set_outputs(fn.decoders.video(encoded, device=device))
        pipe.build()
        return pipe

    def decode(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """One uint8 ``[T, H, W, 3]`` tensor per path, on the GPU for ``mixed``."""
        from nvidia.dali.backend import TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray

        data = []
        for p in paths:
            data.append(np.fromfile(p, dtype=np.uint8))
            if data[-1].size == 0:
                raise DatasetError(f"empty video {str(p)!r} (0 bytes): re-extract or delete it")
        try:
            if self._pipe is None:
                self._pipe = self._build()
            self._pipe.feed_input("encoded", data)
            (out,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # a failed DALI pipeline cannot be reused
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            raise DatasetError(
                f"DALI cannot decode the batch starting with {str(paths[0])!r} ({last}): "
                "use --p_decoder cpu (PyAV), or re-encode the videos"
            ) from None
        frames = []
        gpu = isinstance(out, TensorListGPU)
        device = torch.device("cuda", self._args[2]) if gpu else None
        for i, p in enumerate(paths):
            shape = tuple(out[i].shape())
            if shape[0] == 0:
                raise DatasetError(f"video {str(p)!r} holds no frames: re-extract or delete it")
            if gpu:
                t = torch.empty(shape, dtype=torch.uint8, device=device)
                feed_ndarray(out[i], t, cuda_stream=torch.cuda.current_stream(device))
            else:
                t = torch.from_numpy(np.array(out[i]))
            frames.append(t)
        if gpu:
            # feed_ndarray only queues the copies. This pipeline runs on the legacy executor
            # (exec_async=False, exec_pipelined=False), whose output buffers are valid until the
            # next run(): the next batch's decode (SequenceLoader's read-ahead thread) could
            # overwrite them while these copies still wait in the queue. Wait for them here, in
            # the decoding thread, once per batch of sequences.
            torch.cuda.current_stream(device).synchronize()
        return frames

    def close(self) -> None:
        self._pipe = None


class AutoVideoDecoder:
    """DALI on the GPU, falling back to PyAV (with one warning) when DALI refuses a file."""

    def __init__(self, dali: DaliVideoDecoder, cpu: CpuVideoDecoder) -> None:
        self._dali, self._cpu, self._use_dali = dali, cpu, True
        self.name = f"auto: {dali.name}"

    def decode(self, paths: Sequence[str]) -> list[torch.Tensor]:
        if self._use_dali:
            try:
                return self._dali.decode(paths)
            except DatasetError as e:
                frames = self._cpu.decode(paths)  # a file PyAV cannot read either raises here
                warnings.warn(f"{e}; decoding the rest with PyAV on the CPU", stacklevel=2)
                self._use_dali, self.name = False, "auto: cpu (PyAV) after DALI failed"
                return frames
        return self._cpu.decode(paths)

    def close(self) -> None:
        self._dali.close()
        self._cpu.close()


def build_decoder(kind: str, *, device: torch.device, batch_size: int, num_threads: int = 2):
    """A decoder with ``decode(paths) -> [uint8 [T,H,W,3]]`` and ``close()``; see the module doc."""
    if kind not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {kind!r}")
    on_gpu = device.type == "cuda"
    index = device.index if device.index is not None else 0
    if kind == "cpu":
        return CpuVideoDecoder(num_threads)
    dali = DaliVideoDecoder(batch_size, "mixed" if on_gpu else "cpu", index, num_threads)
    if kind == "dali":
        return dali
    return (
        AutoVideoDecoder(dali, CpuVideoDecoder(num_threads))
        if on_gpu
        else CpuVideoDecoder(num_threads)
    )
