"""Video reading: PyAV frames, DALI's decoder giving the same frames (CPU: VP9; GPU: H.264), the
centre crop equal to DALI's, the sequence loader's batches, and bad input named by its path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CUDA_AT_START, natural_image

from augmix_gpu.data import DatasetError
from augmix_gpu.data.make_p import write_video
from augmix_gpu.data.sequences import SequenceLoader, centre_crop
from augmix_gpu.data.video import DaliVideoDecoder, build_decoder, read_video_cpu
from augmix_gpu.eval.imagenet_p import check_p_layout

av = pytest.importorskip("av")


def frames(n: int = 6, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    """A smooth image drifting right one pixel per frame."""
    img = natural_image(size + n, seed)
    return [img[:size, i : i + size].copy() for i in range(n)]


def write_vp9(path, fr: list[np.ndarray]) -> None:
    """Lossless VP9: DALI's CPU video decoder reads VP8/VP9/MJPEG (not H.264)."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libvpx-vp9", rate=1)
        s.width, s.height, s.pix_fmt, s.options = (
            fr[0].shape[1],
            fr[0].shape[0],
            "yuv444p",
            {"lossless": "1"},
        )
        for f in fr:
            for p in s.encode(av.VideoFrame.from_ndarray(f, "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_pyav_reads_an_h264_sequence_back(tmp_path):
    fr = frames()
    write_video(fr, str(tmp_path / "a.mp4"), noise=False, preset="ultrafast")
    out = read_video_cpu(tmp_path / "a.mp4")
    assert out.shape == (6, 48, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.stack(fr)).mean() < 3  # crf 20, 4:4:4: close to the input


def test_dali_cpu_decoder_gives_the_pyav_frames(tmp_path):
    fr = frames(5, 40)
    write_vp9(tmp_path / "v.mp4", fr)
    write_vp9(tmp_path / "w.mp4", frames(3, 40, seed=1))
    ref = [read_video_cpu(tmp_path / n) for n in ("v.mp4", "w.mp4")]
    dali = DaliVideoDecoder(batch_size=4, device="cpu", device_id=None, num_threads=1)
    got = dali.decode([str(tmp_path / "v.mp4"), str(tmp_path / "w.mp4")])  # a ragged batch
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.numpy(), r)
    assert np.abs(ref[0].astype(int) - np.stack(fr)).max() <= 2  # lossless up to RGB<->YUV


@pytest.mark.cuda
@pytest.mark.skipif(
    not CUDA_AT_START,
    reason="DALI decodes H.264 on the GPU only (NVDEC; its CPU backend reads VP8/VP9/MJPEG): "
    "no CUDA device here",
)
def test_dali_gpu_decoder_gives_the_pyav_frames_on_h264(tmp_path):
    write_video(frames(), str(tmp_path / "a.mp4"), noise=False, preset="ultrafast")
    ref = read_video_cpu(tmp_path / "a.mp4")
    dali = build_decoder("dali", device=torch.device("cuda", 0), batch_size=1)
    (got,) = dali.decode([str(tmp_path / "a.mp4")])
    assert got.is_cuda and got.shape == ref.shape
    # NVDEC and FFmpeg may convert YUV -> RGB with different rounding: within 2 levels.
    assert np.abs(got.cpu().numpy().astype(int) - ref).max() <= 2


def _constant(x: np.ndarray):
    return lambda _iteration: [x]


def test_centre_crop_matches_dali_crop_mirror_normalize():
    from nvidia import dali
    from nvidia.dali import fn, types

    for h, w, size in [(65, 67, 56), (64, 64, 56), (57, 66, 56), (50, 70, 56)]:
        x = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=None)
        with pipe:
            e = fn.external_source(source=_constant(x), batch=True, layout="HWC")
            pipe.set_outputs(fn.crop_mirror_normalize(
                e, crop=(size, size), out_of_bounds_policy="trim_to_shape", dtype=types.UINT8,
                output_layout="CHW"))  # fmt: skip
        pipe.build()
        want = np.array(pipe.run()[0].as_tensor())[0]
        got = centre_crop(torch.from_numpy(x).permute(2, 0, 1)[None], size)[0].numpy()
        np.testing.assert_array_equal(got, want)


def _tree(root, lengths=(4, 5, 6)):
    for k, n in enumerate(lengths):
        d = root / "rotate" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        write_video(frames(n, 20, seed=k), str(d / f"s{k}.mp4"), noise=False, preset="ultrafast")
    return root


def test_sequence_loader_batches_ragged_sequences(tmp_path):
    root = _tree(tmp_path)
    loader = SequenceLoader(root / "rotate", ["c0", "c1"], batch_size=2, crop_size=16,
                            decoder="cpu")  # fmt: skip
    batches = list(loader.epoch())
    assert len(loader) == len(batches) == 2 and loader.decoder_name == "cpu (PyAV)"
    images, labels, index, lengths = batches[0]
    # sorted by class then name: c0/s0 (4 frames), c0/s2 (6 frames)
    assert images.shape == (10, 3, 16, 16) and lengths.tolist() == [4, 6]
    assert labels.tolist() == [0, 0] and index.tolist() == [0, 1]
    assert batches[1][3].tolist() == [5] and batches[1][1].tolist() == [1]
    whole = read_video_cpu(loader.paths([0])[0])
    np.testing.assert_array_equal(images[:4].permute(0, 2, 3, 1).numpy(), whole[:, 2:18, 2:18])
    shard = SequenceLoader(root / "rotate", ["c0", "c1"], batch_size=2, rank=1, world_size=2)
    assert shard.own.tolist() == [1] and shard.num_sequences == 3


def test_unreadable_and_empty_videos_are_named(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(DatasetError, match=r"cannot decode video .*bad\.mp4"):
        read_video_cpu(bad)
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w", format="mp4") as c:  # a header, a stream, no frame
        s = c.add_stream("libx264", rate=1)
        s.width = s.height = 16
        c.start_encoding()
    with pytest.raises(DatasetError, match=r"empty\.mp4.* holds no (frames|video stream)"):
        read_video_cpu(empty)


def test_layout_errors_name_the_path(tmp_path):
    root = _tree(tmp_path, lengths=(3, 3))
    assert check_p_layout(root, ["rotate"], [1, 2], ["c0", "c1"]) == {
        ("rotate", 1): root / "rotate",
        ("rotate", 2): root / "rotate",
    }
    with pytest.raises(DatasetError, match=r"missing perturbation folder .*gaussian_noise_2"):
        check_p_layout(root, ["gaussian_noise"], [2], ["c0", "c1"])
    with pytest.raises(DatasetError, match=r"\['c1'\] in .*rotate.* not among the model's 1"):
        check_p_layout(root, ["rotate"], [1], ["c0"])
    (root / "rotate" / "c1" / "z.mp4").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty video .*c1/z\.mp4"):
        check_p_layout(root, ["rotate"], [1], ["c0", "c1"])
    with pytest.raises(DatasetError, match=r"ImageNet-P root .*nowhere.* is not a folder"):
        check_p_layout(tmp_path / "nowhere", ["rotate"], [1], ["c0"])
