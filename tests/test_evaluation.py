"""Evaluation engine: exact counts with padding masked, layout checks, tables and the heatmap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from augmix_gpu import protocols
from augmix_gpu.data import DatasetError
from augmix_gpu.distributed import DistEnv
from augmix_gpu.eval import metrics as rb
from augmix_gpu.eval.imagenet_c import check_c_layout
from augmix_gpu.eval.loop import evaluate_loader, normalize_uint8
from augmix_gpu.eval.reports import compare_table, markdown_table, write_reports

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


class LookupModel(nn.Module):
    """Logits from a table, indexed by the sample id written into pixel (0, 0) of channel 0."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.round((x[:, 0, 0, 0] * 0.229 + 0.485) * 255).long()  # undo the normalisation
        return self.table[ids]


class FakeLoader:
    """Batches of (images, labels, valid) with the last batch padded by repeating sample 0."""

    def __init__(self, labels: list[int], batch: int, num_samples: int | None = None) -> None:
        self.labels, self.batch = labels, batch
        self.num_samples = len(labels) if num_samples is None else num_samples

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch)

    def epoch(self, epoch: int):
        n = len(self.labels)
        for start in range(0, n, self.batch):
            ids = list(range(start, min(start + self.batch, n)))
            valid = [True] * len(ids) + [False] * (self.batch - len(ids))
            ids += [0] * (self.batch - len(ids))  # padding repeats a real (correct) sample
            images = torch.zeros(self.batch, 3, 4, 4, dtype=torch.uint8)
            images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.uint8)
            yield images, torch.tensor([self.labels[i] for i in ids]), torch.tensor(valid)


def _table(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (n,), generator=g).tolist()
    logits[0, labels[0]] = 50.0  # sample 0 is confidently right: counting its padding copies shows
    return logits, labels


def test_evaluate_loader_counts_match_numpy_and_mask_padding():
    logits, labels = _table(23, 7)
    result = evaluate_loader(
        LookupModel(logits.float()), FakeLoader(labels, batch=5), ENV, progress=False
    )
    # Independent: numpy over the 23 real samples.
    z = logits.float().double().numpy()
    y = np.array(labels)
    order = np.argsort(-z, axis=1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert result.n == 23
    assert result.correct1 == int((order[:, 0] == y).sum())
    assert result.correct5 == int((order[:, :5] == y[:, None]).any(1).sum())
    assert result.nll == pytest.approx(float(-np.log(p[np.arange(23), y]).mean()), rel=1e-5)
    assert result.error == pytest.approx(100 * (23 - result.correct1) / 23)
    np.testing.assert_allclose(np.sort(result.confidences.numpy()), np.sort(p.max(1)), rtol=1e-5)
    assert result.correct.tolist() == (order[:, 0] == y).tolist()
    cal = result.calibration()
    assert cal["rms_calibration_error"] == pytest.approx(
        rb.rms_calibration_error(p.max(1), order[:, 0] == y), abs=1e-4
    )


def test_evaluate_loader_refuses_a_count_mismatch():
    logits, labels = _table(6, 3)
    with pytest.raises(RuntimeError, match="counted 6 images but the loader holds 8"):
        evaluate_loader(
            LookupModel(logits.float()),
            FakeLoader(labels, batch=4, num_samples=8),
            ENV,
            progress=False,
        )


def test_normalize_uint8_uses_imagenet_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_uint8(x)
    want = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert out[0, :, 0, 0].tolist() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- layout checks

CLASSES = ["n01", "n02"]


def _tree(root, corruptions=("fog", "snow"), severities=(1, 2), classes=CLASSES):
    for c in corruptions:
        for s in severities:
            for k in classes:
                d = root / c / str(s) / k
                d.mkdir(parents=True)
                (d / "a.JPEG").write_bytes(b"\xff\xd8\xff")
    return root


def test_layout_ok(tmp_path):
    check_c_layout(_tree(tmp_path), ["fog", "snow"], [1, 2], CLASSES)


def test_layout_missing_corruption(tmp_path):
    _tree(tmp_path)
    with pytest.raises(DatasetError, match=r"missing corruption folder .*frost.*--corruptions"):
        check_c_layout(tmp_path, ["fog", "frost"], [1, 2], CLASSES)


def test_layout_missing_severity(tmp_path):
    _tree(tmp_path)
    with pytest.raises(DatasetError, match=r"missing severity folder .*fog/3'.*--severities"):
        check_c_layout(tmp_path, ["fog", "snow"], [1, 2, 3], CLASSES)


def test_layout_class_not_in_checkpoint(tmp_path):
    _tree(tmp_path)
    (tmp_path / "snow" / "2" / "n99").mkdir()
    (tmp_path / "snow" / "2" / "n99" / "a.JPEG").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(
        DatasetError, match=r"\['n99'\] in .*snow/2.*not among the model's 2 classes"
    ):
        check_c_layout(tmp_path, ["fog", "snow"], [1, 2], CLASSES)


def test_layout_empty_severity_folder(tmp_path):
    _tree(tmp_path, corruptions=("fog",), severities=(1,))
    (tmp_path / "fog" / "2").mkdir()
    with pytest.raises(DatasetError, match=r"empty folder .*fog/2.*one sub-folder per class"):
        check_c_layout(tmp_path, ["fog"], [1, 2], CLASSES)


def test_layout_empty_class_folder(tmp_path):
    _tree(tmp_path)
    (tmp_path / "fog" / "1" / "n02" / "a.JPEG").unlink()
    (tmp_path / "fog" / "1" / "n02" / ".DS_Store").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty class folder .*fog/1/n02.*holds no images"):
        check_c_layout(tmp_path, ["fog", "snow"], [1, 2], CLASSES)


def test_layout_root_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"ImageNet-C root .*nowhere.*is not a folder"):
        check_c_layout(tmp_path / "nowhere", ["fog"], [1], CLASSES)


# ----------------------------------------------------------------------------- reports


def _results(mce_scale: float = 0.5, partial: bool = False, extras: bool = False) -> dict:
    alexnet = {**protocols.ALEXNET_ERRORS, **(protocols.ALEXNET_EXTRA_ERRORS if extras else {})}
    counts = {
        c: {s: (round(a * mce_scale * 1_000_000), 1_000_000) for s in protocols.SEVERITIES}
        for c, a in alexnet.items()
    }
    if partial:
        del counts["fog"]
    block = rb.summarize_corruptions(counts, clean_error=25.0)
    block.update(severities=list(protocols.SEVERITIES), dataset="ImageNet-C")
    block["calibration"] = {"mean_rms_calibration_error": 5.0, "mean_ece": 4.0}
    return {
        "model": {
            "name": f"m{mce_scale}",
            "aug_type": "augmix_jsd",
            "all_ops": False,
            "ops": "paper's 9 ops",
        },
        "clean": {
            "error": 25.0,
            "top5_error": 8.0,
            "nll": 1.0,
            "rms_calibration_error": 3.0,
            "ece": 2.0,
        },
        "preprocessing": {"clean": "resize 256 + crop 224", "corrupted": "as stored + crop 224"},
        "imagenet_c": block,
    }


def test_markdown_table_lists_every_cell_and_headline():
    md = markdown_table(_results())
    assert "| mCE | 50.00 |" in md
    assert "| relative mCE |" in md
    assert "| mean corruption error (unnorm.) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| gaussian_noise |"))
    assert row.count("44.32") == 6 and "| 50.00 |" in row  # 5 severities + mean, CE 50
    assert "Partial" not in md and "ops: paper's 9 ops" in md


def test_partial_results_never_print_an_mce():
    md = markdown_table(_results(partial=True))
    assert "| mCE |" not in md and "| mCE (partial) | 50.00 |" in md
    assert "**Partial**" in md and "fog" in md


def test_compare_table_side_by_side():
    text = compare_table(_results(0.5), _results(0.6), names=("base", "augmix"))
    assert "| metric | base | augmix | augmix - base |" in text
    assert "| mCE | 50.00 | 60.00 | 10.00 |" in text
    assert "| CE gaussian_noise | 50.00 | 60.00 | 10.00 |" in text


def test_extras_have_their_own_mce_line_beside_the_mce():
    """Every corruption at scale x AlexNet's error: the 15 give mCE 100 x scale, the 4 extras
    CE and mCE (extra) 100 x scale; the two lines stay apart in the report and in --compare."""
    md = markdown_table(_results(0.5, extras=True))
    assert "| mCE | 50.00 |" in md and "| mCE (extra) | 50.00 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| spatter (extra) |"))
    assert row.count("35.88") == 6 and row.endswith("| 50.00 | – |")  # 71.7512 / 2; CE 50
    assert "mCE (extra)" not in markdown_table(_results(0.5))  # no extras evaluated: no line
    text = compare_table(_results(0.5, extras=True), _results(0.7, extras=True))
    assert "| mCE (extra) | 50.00 | 70.00 | 20.00 |" in text
    assert "| CE saturate | 50.00 | 70.00 | 20.00 |" in text


def test_write_reports_json_markdown_and_valid_png(tmp_path):
    from PIL import Image

    results = _results()
    paths = write_reports(results, tmp_path / "out", name="r")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    assert paths["markdown"].read_text() == markdown_table(results)
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["heatmap"]) as im:
        im.verify()
    with Image.open(paths["heatmap"]) as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_cifar_c_counts_equal_a_torch_loop(tmp_path):
    """CIFAR-C .npy layout (5 severities stacked) through DALI equals a plain loop over the arrays."""
    from augmix_gpu.eval.run import evaluate_model
    from augmix_gpu.eval.settings import DataSettings, EvalSettings, RunSettings

    rng = np.random.default_rng(0)
    n, classes = 7, ["a", "b", "c"]  # 7 images per severity: ragged batches of 3
    labels = np.tile(rng.integers(0, 3, n), 5)
    for c in ("fog", "contrast"):
        tint = rng.integers(-120, 120, (5 * n, 1, 1, 3))  # per-image colour cast
        np.save(
            tmp_path / f"{c}.npy",
            np.clip(rng.integers(0, 256, (5 * n, 32, 32, 3)) + tint, 0, 255).astype(np.uint8),
        )
    np.save(tmp_path / "labels.npy", labels)
    # Predicts the channel with the largest mean: varied, image-dependent predictions.
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(3))
        model[2].bias.zero_()
    settings = EvalSettings(
        data=DataSettings(cifar_name="cifar10", corruptions=["fog", "contrast"]),
        run=RunSettings(batch=3, device="cpu", workers=1, no_progress=True),
        roots={"cifar_c": tmp_path},
    )
    res = evaluate_model(model, ENV, classes=classes, settings=settings)
    block = res["cifar_c"]
    assert "ce" not in block and block["dataset"] == "CIFAR10-C"
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    errors = []
    for c in ("fog", "contrast"):
        arr = np.load(tmp_path / f"{c}.npy")
        for s in range(1, 6):
            x = torch.from_numpy(arr[(s - 1) * n : s * n]).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                pred = model((x - mean) / std).argmax(1).numpy()
            wrong = int((pred != labels[(s - 1) * n : s * n]).sum())
            assert block["counts"][c][str(s)] == {"wrong": wrong, "total": n}, (c, s)
            errors.append(100 * wrong / n)
    assert len(set(errors)) > 1, errors  # the model does not predict one class everywhere
    assert block["partial"] is True  # 2 of 15 corruptions
    assert block["mean_corruption_error_partial"] == pytest.approx(np.mean(errors))


def test_cifar_c_layout_errors(tmp_path):
    from augmix_gpu.eval.cifar_c import check_cifar_c_layout

    with pytest.raises(DatasetError, match="labels.npy"):
        check_cifar_c_layout(tmp_path, ["fog"])
    np.save(tmp_path / "labels.npy", np.zeros(10, dtype=np.int64))
    with pytest.raises(DatasetError, match=r"missing .*fog\.npy"):
        check_cifar_c_layout(tmp_path, ["fog"])


def test_the_report_names_the_op_subset_a_model_was_trained_with():
    from augmix_gpu.eval.model import ModelCard, describe_model

    card = ModelCard.from_settings({"all_ops": False, "aug_ops": ["rotate", "equalize"]})
    assert describe_model(card, None)["ops"] == "only rotate, equalize"
    assert describe_model(ModelCard.from_settings({"all_ops": False}), None)["ops"] == (
        "paper's 9 ops (no overlap with ImageNet-C)"
    )
