"""evaluate.py end to end on the CPU: per-(corruption, severity) errors against an independent PIL
loop, sharded counts under torchrun, layout errors, --compare. Tiny generated -C tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import ok, run_script

from augmix_gpu.checkpoint import save_atomic
from augmix_gpu.data import make_corrupted_dataset, make_synthetic_dataset
from augmix_gpu.models import build_model

REPO = Path(__file__).resolve().parent.parent
EVALUATE = [sys.executable, str(REPO / "evaluate.py")]
CORRS = ("gaussian_noise", "brightness")
SEVS = (1, 2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, written out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """3 classes x 5 val images at 64 px, its -C tree (2 corruptions x 2 severities), a checkpoint."""
    root = tmp_path_factory.mktemp("evaldata")
    synth = make_synthetic_dataset(
        root / "synth",
        num_classes=3,
        train_per_class=1,
        val_per_class=5,
        size=64,
        seed=3,
        progress=False,
    )
    c_dir = make_corrupted_dataset(
        synth / "val", root / "c", severities=SEVS, corruptions=CORRS, seed=0, progress=False
    )
    classes = sorted(p.name for p in (synth / "val").iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=len(classes))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorm statistics, so predictions differ per image
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    _fit_head(model, synth / "val", classes)
    config = {
        "arch": "tiny_resnet",
        "aug_type": "augmix_jsd",
        "all_ops": False,
        "crop_size": 64,
        "val_resize": 64,
    }
    ckpt = save_atomic(
        {"model": model.state_dict(), "classes": classes, "config": config}, root / "ckpt.pt"
    )
    return {"root": root, "val": synth / "val", "c": c_dir, "ckpt": ckpt}


def _fit_head(model: torch.nn.Module, val: Path, classes: list[str]) -> None:
    """Fit only the last layer on the clean images (a second), so predictions differ per image
    and the corrupted errors differ per cell: an all-one-class model would make any loop agree."""
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((val / name).iterdir()):
            with Image.open(f) as im:
                xs.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
            ys.append(label)
    x = (torch.stack(xs).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        feats = F.adaptive_avg_pool2d(model.blocks(model.stem(x)), 1).flatten(1)
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model.fc(feats), torch.tensor(ys)).backward()
        opt.step()


def run(args: list[str], *, torchrun: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_script("evaluate.py", args, torchrun=torchrun, timeout=timeout)


def base_args(data: dict[str, Path], out: Path) -> list[str]:
    return [
        "--ckpt_path", str(data["ckpt"]), "--imagenet_c", str(data["c"]),
        "--corruptions", *CORRS, "--severities", *map(str, SEVS),
        "--device", "cpu", "--batch", "3", "--workers", "1", "--no_progress", "--out", str(out),
    ]  # fmt: skip


def independent_loop(data: dict[str, Path]) -> dict[tuple[str, int], tuple[int, int, float]]:
    """PIL decode + torch, no DALI, no project code but the model: (wrong, total, mean NLL) per cell."""
    from PIL import Image

    state = torch.load(data["ckpt"], weights_only=False)
    model = build_model("tiny_resnet", num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = {}
    for c in CORRS:
        for s in SEVS:
            wrong = total = 0
            nll = 0.0
            for label, name in enumerate(state["classes"]):
                for f in sorted((data["c"] / c / str(s) / name).iterdir()):
                    with Image.open(f) as im:
                        x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                    x = (x.float() / 255 - mean) / std  # 64 px images, crop 64: nothing to crop
                    with torch.no_grad():
                        logits = model(x[None])
                    wrong += int(logits.argmax(1).item() != label)
                    nll += float(F.cross_entropy(logits, torch.tensor([label])))
                    total += 1
            out[(c, s)] = (wrong, total, nll / total)
    return out


def test_errors_equal_an_independent_pil_loop(data, tmp_path):
    proc = ok(run(base_args(data, tmp_path) + ["--val", str(data["val"])]))
    res = json.loads((tmp_path / "results.json").read_text())
    ref = independent_loop(data)
    block = res["imagenet_c"]
    for (c, s), (wrong, total, nll) in ref.items():
        assert block["counts"][c][str(s)] == {"wrong": wrong, "total": total}, (c, s)
        assert block["error"][c][str(s)] == pytest.approx(100 * wrong / total)
        assert block["nll"][c][str(s)] == pytest.approx(nll, rel=2e-3, abs=2e-3), (c, s)
    assert total == 15
    # A subset is reported as partial, never as an mCE.
    assert block["partial"] is True and block["mce"] is None and block["mce_partial"] is not None
    # Provenance: op set, preprocessing and hash are recorded.
    assert res["model"]["all_ops"] is False and res["model"]["aug_type"] == "augmix_jsd"
    assert len(res["model"]["sha256"]) == 64
    assert res["preprocessing"]["crop_size"] == 64 and res["preprocessing"]["c_resize"] is None
    assert res["run"]["world_size"] == 1 and res["run"]["images_per_s"] > 0
    assert res["clean"]["n"] == 15 and 0 <= res["clean"]["error"] <= 100
    assert "rms_calibration_error" in res["clean"] and "mean_ece" in block["calibration"]
    # Markdown table on stdout, heatmap next to the JSON.
    assert "| gaussian_noise |" in proc.stdout and "**Partial**" in proc.stdout
    assert (tmp_path / "results_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_counts(data, tmp_path):
    ok(run(base_args(data, tmp_path / "one")))
    proc = ok(run(base_args(data, tmp_path / "two"), torchrun=2))
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["run"]["world_size"] == 2
    # 15 images per cell, batch 3 per rank: rank 0 reads 8 + 1 padded slot, rank 1 7 + 2.
    assert two["imagenet_c"]["counts"] == one["imagenet_c"]["counts"]
    for c in CORRS:
        for s in map(str, SEVS):
            assert two["imagenet_c"]["nll"][c][s] == pytest.approx(
                one["imagenet_c"]["nll"][c][s], rel=1e-5
            )
    cal1, cal2 = one["imagenet_c"]["calibration"], two["imagenet_c"]["calibration"]
    assert cal2["mean_rms_calibration_error"] == pytest.approx(
        cal1["mean_rms_calibration_error"], abs=1e-4
    )
    assert proc.stdout.count("| gaussian_noise |") == 1  # only rank 0 prints


def test_bad_layout_fails_before_evaluation_with_the_path(data, tmp_path):
    args = base_args(data, tmp_path)[:4] + [
        "--severities",
        "1",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    proc = run(args + ["--corruptions", "gaussian_noise", "fog"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing corruption folder" in proc.stderr and str(data["c"] / "fog") in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_unknown_corruption_name_suggests_the_right_one(data, tmp_path):
    proc = run(
        base_args(data, tmp_path)[:4] + ["--corruptions", "gausian_noise", "--device", "cpu"]
    )
    assert proc.returncode == 1 and "did you mean gaussian_noise" in proc.stderr


def test_compare_prints_side_by_side(tmp_path):
    for name, err in (("a", 30.0), ("b", 20.0)):
        (tmp_path / name).mkdir()
        res = {"clean": {"error": err, "nll": 1.0}, "model": {"name": name}}
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    proc = ok(
        run(
            [
                "--compare",
                str(tmp_path / "a" / "results.json"),
                str(tmp_path / "b" / "results.json"),
            ]
        )
    )
    assert "| metric | a | b | b - a |" in proc.stdout
    assert "| clean error | 30.00 | 20.00 | -10.00 |" in proc.stdout


def test_argument_errors():
    proc = run(["--val", "x"])
    assert proc.returncode == 2 and "exactly one of --ckpt_path or --pretrained" in proc.stderr
    proc = run(["--ckpt_path", "x.pt"])
    assert proc.returncode == 2 and "nothing to evaluate" in proc.stderr


def test_pretrained_weights_file(data, tmp_path):
    """--pretrained: a plain state dict; labels from the sorted class folders; a wrong head refused."""
    state = torch.load(data["ckpt"], weights_only=False)
    torch.save(state["model"], tmp_path / "w.pth")
    args = ["--pretrained", str(tmp_path / "w.pth"), "--arch", "tiny_resnet", "--crop_size", "64"]
    args += base_args(data, tmp_path / "out")[2:]
    ok(run(args))
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ref = json.loads(
        json.dumps({c: {str(s): v for s, v in d.items()} for c, d in _counts(data).items()})
    )
    assert res["imagenet_c"]["counts"] == ref
    assert res["model"]["aug_type"] is None and res["model"]["sha256"]

    wrong_head = build_model("tiny_resnet", num_classes=5).state_dict()
    torch.save(wrong_head, tmp_path / "w5.pth")
    proc = run(["--pretrained", str(tmp_path / "w5.pth")] + args[2:])
    assert proc.returncode == 1 and "with 3 classes" in proc.stderr and "fc.weight" in proc.stderr


def _counts(data: dict[str, Path]) -> dict[str, dict[int, dict[str, int]]]:
    out: dict[str, dict[int, dict[str, int]]] = {}
    for (c, s), (wrong, total, _) in independent_loop(data).items():
        out.setdefault(c, {})[s] = {"wrong": wrong, "total": total}
    return out
