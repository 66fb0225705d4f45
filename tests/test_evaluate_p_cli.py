"""evaluate.py --imagenet_p end to end on the CPU: per-sequence flips against an independent loop
(PyAV + torch, test.py's rules written out), a reference for FR, --compare, the flips picture,
layout errors, and the same counts under torchrun with 2 ranks. Tiny generated -P tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import REPO, ok, run_script
from test_evaluate_cli import MEAN, STD, _fit_head

from augmix_gpu.checkpoint import save_atomic
from augmix_gpu.data import make_synthetic_dataset
from augmix_gpu.models import build_model

av = pytest.importorskip("av")
pytest.importorskip("imagecorruptions")
PERTS = ("gaussian_noise", "rotate", "scale")


@pytest.fixture(scope="module")
def pdata(tmp_path_factory) -> dict[str, Path]:
    """3 classes x 3 val images at 64 px, their -P tree (3 perturbations, difficulties 1-2)."""
    from augmix_gpu.data.make_p import make_perturbed_dataset

    root = tmp_path_factory.mktemp("pdata")
    synth = make_synthetic_dataset(root / "synth", num_classes=3, train_per_class=1,
                                   val_per_class=3, size=64, seed=5, progress=False)  # fmt: skip
    p_dir = make_perturbed_dataset(synth / "val", root / "p", perturbations=PERTS,
                                   difficulties=[1, 2], preset="ultrafast", progress=False)  # fmt: skip
    classes = sorted(p.name for p in (synth / "val").iterdir() if p.is_dir())
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=len(classes))
    _fit_head(model, synth / "val", classes)
    config = {"arch": "tiny_resnet", "aug_type": "none", "all_ops": False, "crop_size": 56,
              "val_resize": 64}  # fmt: skip
    ckpt = save_atomic({"model": model.state_dict(), "classes": classes, "config": config},
                       root / "ckpt.pt")  # fmt: skip
    return {"p": p_dir, "ckpt": ckpt, "classes": classes}


def evaluate_main(argv: list[str]) -> int:
    """evaluate.py's main() in this process (a subprocess costs a torch import each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def args(pdata, out: Path, *extra: str) -> list[str]:
    return ["--ckpt_path", str(pdata["ckpt"]), "--imagenet_p", str(pdata["p"]),
            "--perturbations", *PERTS, "--p_difficulties", "1", "2", "--device", "cpu",
            "--batch", "40", "--workers", "1", "--no_progress", "--out", str(out), *extra]  # fmt: skip


def independent_flips(pdata) -> dict[tuple[str, int], tuple[int, int]]:
    """(flips, comparisons) per (perturbation, difficulty), PyAV + torch, no project code."""
    state = torch.load(pdata["ckpt"], weights_only=False)
    model = build_model("tiny_resnet", num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = {}
    for p in PERTS:
        for d in (1, 2):
            folder = pdata["p"] / (f"{p}_{d}" if "noise" in p and d > 1 else p)
            flips = comps = 0
            for video in sorted(folder.rglob("*.mp4")):
                with av.open(str(video)) as c:
                    x = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
                x = torch.from_numpy(x[:, 4:60, 4:60]).permute(0, 3, 1, 2).float() / 255  # crop 56
                with torch.no_grad():
                    pred = model((x - mean) / std).argmax(1).tolist()
                if "noise" in p:  # every frame against the first
                    pairs = [(pred[0], q) for q in pred[1:]]
                else:  # chains of step d, frame against previous
                    pairs = [(a, b) for i in range(d) for a, b in zip(pred[i::d], pred[i::d][1:])]
                flips += sum(a != b for a, b in pairs)
                comps += len(pairs)
            out[(p, d)] = (flips, comps)
    return out


def test_flips_equal_an_independent_loop_and_reports(pdata, tmp_path, capsys):
    proc = ok(run_script("evaluate.py", args(pdata, tmp_path / "a")))
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    block = res["imagenet_p"]
    ref = independent_flips(pdata)
    for (p, d), (flips, comps) in ref.items():
        got = block["counts"][p][str(d)]
        assert (got["flips"], got["comparisons"], got["sequences"]) == (flips, comps, 9), (p, d)
    assert sum(f for f, _ in ref.values()) > 0  # the model does flip somewhere
    assert (
        block["partial"] and block["mfr"] is None and block["normalisation"]["available"] is False
    )
    assert block["decoder"] == ["auto: cpu (PyAV)"] or block["decoder"] == ["cpu (PyAV)"]
    assert set(block["examples"]) == set(PERTS) and res["preprocessing"]["perturbed"]
    assert "| rotate | 2 | 9 |" in proc.stdout and "FR / mFR / mT5D unavailable" in proc.stdout
    png = tmp_path / "a" / "results_flips.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The run as its own reference: every FR is 100; a subset gives a partial mFR only.
    reference = str(tmp_path / "a" / "results.json")
    assert evaluate_main(args(pdata, tmp_path / "b", "--p_reference", reference)) == 0
    b = json.loads((tmp_path / "b" / "results.json").read_text())["imagenet_p"]
    assert all(v == pytest.approx(100.0) for v in b["fr"].values() if v == v) and b["mfr"] is None
    assert b["mfr_partial"] == pytest.approx(100.0) and b["normalisation"]["reference"] == reference
    capsys.readouterr()
    assert evaluate_main(["--compare", reference, str(tmp_path / "b" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| mFR (partial) | – | 100.00 | – |" in out and "| FP rotate |" in out


def test_missing_perturbation_fails_fast_with_the_path(pdata, tmp_path):
    from augmix_gpu.data import DatasetError

    a = args(pdata, tmp_path)
    a[a.index("--perturbations") + 1 : a.index("--p_difficulties")] = ["rotate", "tilt"]
    with pytest.raises(
        DatasetError, match="missing perturbation folder .*" + str(pdata["p"] / "tilt")
    ):
        evaluate_main(a)
    with pytest.raises(ValueError, match="did you mean rotate"):
        evaluate_main(args(pdata, tmp_path)[:4] + ["--perturbations", "rotat"])
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_counts(pdata, tmp_path):
    assert evaluate_main(args(pdata, tmp_path / "one")) == 0  # in-process: one torch import less
    ok(run_script("evaluate.py", args(pdata, tmp_path / "two"), torchrun=2))
    one = json.loads((tmp_path / "one" / "results.json").read_text())["imagenet_p"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["imagenet_p"]
    for key in ("counts", "flip_probability", "top5_distance", "zipf_distance", "examples"):
        assert two[key] == one[key], key
