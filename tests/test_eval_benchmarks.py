"""ImageNet-R, -A, -V2 and -Sketch on small generated folders of their released layouts: errors
against an independent PIL + torch loop (R and A: the logits masked to the subset), V2's integer
folders, refused folders named, every layout checked before any image is read, the registry and
the typed settings, and the same counts under torchrun with 2 gloo ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cli_runner import REPO, ok, run_script
from test_evaluate_cli import MEAN, STD, _fit_head

from augmix_gpu.checkpoint import save_atomic
from augmix_gpu.data import DatasetError, list_images, make_synthetic_dataset
from augmix_gpu.distributed import DistEnv
from augmix_gpu.eval import imagenet_a, imagenet_r, imagenet_sketch, imagenet_v2
from augmix_gpu.eval.registry import BENCHMARKS
from augmix_gpu.eval.run import evaluate_model, given_benchmarks
from augmix_gpu.eval.settings import DataSettings, EvalSettings, RunSettings
from augmix_gpu.models import build_model

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
SUBSET_R = (1, 3, 4, 7, 9)  # which of the 10 synthetic classes the ImageNet-R-style folder holds
SUBSET_A = (0, 2, 5)


def _copy_classes(val: Path, out: Path, names: dict[str, str]) -> Path:
    """``out/<new name>/`` holds the val images of each class ``names`` maps."""
    for cls, folder in names.items():
        shutil.copytree(val / cls, out / folder)
    return out


def _model(classes: list[str], val: Path) -> nn.Module:
    """A small ResNet whose predictions vary per image and are often wrong: its head fitted on the
    clean images, then blurred with noise (a model right everywhere would make any loop agree)."""
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=len(classes))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    _fit_head(model, val, classes)
    with torch.no_grad():
        model.fc.weight.add_(
            torch.randn(model.fc.weight.shape, generator=g) * 0.3 * model.fc.weight.std()
        )
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """10 classes x 3 val images at 48 px, copied into the four released layouts; a checkpoint."""
    root = tmp_path_factory.mktemp("folders")
    synth = make_synthetic_dataset(root / "synth", num_classes=10, train_per_class=1,
                                   val_per_class=3, size=48, seed=2, progress=False)  # fmt: skip
    val = synth / "val"
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())
    r = _copy_classes(val, root / "imagenet-r", {classes[i]: classes[i] for i in SUBSET_R})
    a = _copy_classes(val, root / "imagenet-a", {classes[i]: classes[i] for i in SUBSET_A})
    v2 = _copy_classes(val, root / "imagenetv2-matched-frequency-format-val",
                       {c: str(i) for i, c in enumerate(classes)})  # fmt: skip
    sketch = _copy_classes(val, root / "sketch", {c: c for c in classes})
    model = _model(classes, val)
    config = {"arch": "tiny_resnet", "aug_type": "none", "all_ops": False, "crop_size": 48,
              "val_resize": 48}  # fmt: skip
    ckpt = save_atomic({"model": model.state_dict(), "classes": classes, "config": config},
                       root / "ckpt.pt")  # fmt: skip
    return {"val": val, "r": r, "a": a, "v2": v2, "sketch": sketch, "ckpt": ckpt,
            "classes": classes, "model": model}  # fmt: skip


def independent_loop(data: dict, root: Path, label_of, scored=None) -> dict:
    """PIL decode + torch, no project code but the model: wrong top-1 / top-5, mean NLL, n.

    ``label_of(folder)``: the model's class index; ``scored``: the model's class indices whose
    logits count (the official ``output[:, indices_in_1k]``), the label its position among them."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    wrong = wrong5 = n = 0
    nll = 0.0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = label_of(folder.name)
        for f in sorted(folder.iterdir()):
            from PIL import Image

            with Image.open(f) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
            with torch.no_grad():  # 48 px images, resize 48 + crop 48: the pixels as decoded
                logits = data["model"](((x.float() / 255 - mean) / std)[None])
            target = label
            if scored is not None:
                logits, target = logits[:, list(scored)], list(scored).index(label)
            top = logits.topk(min(5, logits.shape[1])).indices[0].tolist()
            wrong += top[0] != target
            wrong5 += target not in top
            nll += float(F.cross_entropy(logits, torch.tensor([target])))
            n += 1
    return {"wrong": wrong, "wrong5": wrong5, "nll": nll / n, "n": n}


def evaluate_main(argv: list[str]) -> int:
    """evaluate.py's main() in this process (a subprocess costs a torch import each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def args(data: dict, out: Path) -> list[str]:
    return ["--ckpt_path", str(data["ckpt"]), "--imagenet_r", str(data["r"]),
            "--imagenet_a", str(data["a"]), "--imagenet_v2", str(data["v2"]),
            "--imagenet_sketch", str(data["sketch"]), "--device", "cpu", "--batch", "4",
            "--workers", "1", "--no_progress", "--out", str(out)]  # fmt: skip


def _check_block(block: dict, ref: dict) -> None:
    assert block["n"] == ref["n"]
    assert block["error"] == pytest.approx(100 * ref["wrong"] / ref["n"])
    assert block["top5_error"] == pytest.approx(100 * ref["wrong5"] / ref["n"])
    assert block["nll"] == pytest.approx(ref["nll"], rel=2e-3, abs=2e-3)


def test_errors_equal_an_independent_loop(data, tmp_path, capsys):
    assert evaluate_main(args(data, tmp_path) + ["--val", str(data["val"])]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    classes = data["classes"]
    index = classes.index
    ref_r = independent_loop(data, data["r"], index, scored=SUBSET_R)  # classes[i] is class i
    _check_block(res["imagenet_r"], ref_r)
    _check_block(res["imagenet_a"], independent_loop(data, data["a"], index, scored=SUBSET_A))
    _check_block(res["imagenet_v2"], independent_loop(data, data["v2"], int))
    _check_block(res["imagenet_sketch"], independent_loop(data, data["sketch"], index))
    assert res["imagenet_r"]["classes"] == 5 and res["imagenet_a"]["classes"] == 3
    # The mask matters here: scored over all 10 classes, the R images would fare worse.
    unmasked = independent_loop(data, data["r"], index)
    assert unmasked["wrong"] > ref_r["wrong"] > 0
    # V2's folder i and Sketch's wnid folders hold the val images with their own labels.
    for key in ("imagenet_v2", "imagenet_sketch"):
        assert res[key]["n"] == res["clean"]["n"] == 30
        assert res[key]["error"] == pytest.approx(res["clean"]["error"])
    assert "resize shorter side 48 + centre crop 48" in res["preprocessing"]["imagenet_r"]
    assert res["run"]["images"] == 30 + 15 + 9 + 30 + 30
    out = capsys.readouterr().out
    assert f"| ImageNet-R error | {100 * ref_r['wrong'] / 15:.2f} |" in out
    assert "ImageNet-A (9 images; the 3 class folders present" in out
    reference = str(tmp_path / "results.json")
    assert evaluate_main(["--compare", reference, reference]) == 0
    assert "| ImageNet-Sketch error |" in capsys.readouterr().out


def test_v2_integer_folders_map_to_their_class_index(tmp_path):
    """Folder "10" holds class 10, not the 3rd name in string order (ImageFolder's mistake)."""
    classes = [f"n{i:08d}" for i in range(12)]
    for i in range(12):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "a.jpeg").write_bytes(b"\xff\xd8\xff")
    plan = imagenet_v2.check_layout(tmp_path, classes, DataSettings())
    paths, labels = list_images(tmp_path, plan.folder_classes)
    assert [int(Path(p).parent.name) for p in paths] == labels.tolist()
    assert labels.tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]  # listed in name order
    assert plan.scored is None


@pytest.mark.parametrize("folder", ["12", "007", "n01440764"])
def test_v2_refuses_folders_that_are_not_class_indices(tmp_path, folder):
    for name in ("0", folder):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jpeg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(
        DatasetError, match=rf"\['{folder}'\] in '{tmp_path}' .*class indices 0..11"
    ):
        imagenet_v2.check_layout(tmp_path, [f"c{i}" for i in range(12)], DataSettings())


@pytest.mark.parametrize("module", [imagenet_r, imagenet_a, imagenet_sketch])
def test_a_folder_outside_the_model_classes_is_refused(data, tmp_path, module):
    root = _copy_classes(data["val"], tmp_path / "set", {data["classes"][3]: "n99999999"})
    with pytest.raises(
        DatasetError, match=rf"\['n99999999'\] in '{root}'.*not among the model's 10"
    ):
        module.check_layout(root, data["classes"], DataSettings())


@pytest.mark.parametrize("module", [imagenet_r, imagenet_a])
def test_imagenet_models_are_scored_on_the_official_200(tmp_path, module):
    """A model of ImageNet's wnids: the official 200 logits, whichever folders are present."""
    wnids = module.WNIDS
    assert len(set(wnids)) == 200 and list(wnids) == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    others = ["n00000001", "n99999998"]  # ImageNet classes outside the subset
    classes = sorted({*wnids, *others})
    for w in (wnids[0], wnids[-1]):
        (tmp_path / w).mkdir()
        (tmp_path / w / "a.JPEG").write_bytes(b"\xff\xd8\xff")
    plan = module.check_layout(tmp_path, classes, DataSettings())
    assert plan.folder_classes == list(wnids)
    assert plan.scored == [classes.index(w) for w in wnids]
    (tmp_path / others[1]).mkdir()
    (tmp_path / others[1] / "a.JPEG").write_bytes(b"\xff\xd8\xff")
    title = module.BENCHMARK.title
    with pytest.raises(DatasetError, match=rf"\['{others[1]}'\] .*not among {title}'s 200 classes"):
        module.check_layout(tmp_path, classes, DataSettings())


def test_official_lists_match_their_sources():
    """Spot checks against the official files: ImageNet-A's index 6 of the 1000 (stingray) is
    its first class; ImageNet-R's first classes are goldfish and great white shark; 86 shared."""
    assert imagenet_a.WNIDS[:3] == ("n01498041", "n01531178", "n01534433")
    assert imagenet_r.WNIDS[:3] == ("n01443537", "n01484850", "n01494475")
    assert len(set(imagenet_r.WNIDS) & set(imagenet_a.WNIDS)) == 86


def test_every_layout_is_checked_before_any_image_is_read(data, tmp_path, monkeypatch):
    import augmix_gpu.data as data_module

    def no_reading(*_a, **_k):
        raise AssertionError("an image loader was built before every layout was checked")

    monkeypatch.setattr(data_module, "build_loader", no_reading)
    bad = _copy_classes(data["val"], tmp_path / "v2", {data["classes"][0]: "10"})
    settings = EvalSettings(
        data=DataSettings(val=data["val"], crop_size=48, resize_size=48),
        run=RunSettings(device="cpu", no_progress=True),
        roots={"imagenet_r": data["r"], "imagenet_sketch": data["sketch"], "imagenet_v2": bad},
    )
    with pytest.raises(DatasetError, match=rf"\['10'\] in '{bad}'"):
        evaluate_model(data["model"], ENV, classes=data["classes"], settings=settings)


def test_registry_gives_every_benchmark_a_flag_and_a_block():
    from augmix_gpu.eval.cli import parse_settings

    names = [b.name for b in BENCHMARKS]
    assert names == ["imagenet_c", "cifar_c", "imagenet_p", "imagenet_r", "imagenet_a",
                     "imagenet_v2", "imagenet_sketch"]  # fmt: skip
    argv = ["--ckpt_path", "x.pt"] + [a for n in names[2:] for a in (f"--{n}", f"/d/{n}")]
    settings = parse_settings(argv)
    assert settings.roots == {n: f"/d/{n}" for n in names[2:]}
    assert settings.data.severities == [] and settings.run.batch == 128


def test_settings_built_by_code_are_checked_like_flags(tmp_path):
    s = EvalSettings(data=DataSettings(val=tmp_path, severities=(1, 2)),
                     roots={"imagenet_r": tmp_path, "imagenet_p": None})  # fmt: skip
    assert s.data.val == str(tmp_path) and s.data.severities == [1, 2]
    assert s.roots == {"imagenet_r": str(tmp_path)}
    with pytest.raises(ValueError, match=r"--precision 'bf16-mixed': expected one of"):
        RunSettings(precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"--batch 0: must be >= 1"):
        RunSettings(batch=0)
    with pytest.raises(
        ValueError, match="unknown benchmark 'imagenet-r' .*did you mean imagenet_r"
    ):
        given_benchmarks(EvalSettings(roots={"imagenet-r": tmp_path}))
    with pytest.raises(ValueError, match="--cifar_c and --imagenet_r need different models"):
        given_benchmarks(EvalSettings(roots={"imagenet_r": tmp_path, "cifar_c": tmp_path}))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        given_benchmarks(EvalSettings())


@pytest.mark.slow
def test_torchrun_two_ranks_count_every_image_once(data, tmp_path):
    assert evaluate_main(args(data, tmp_path / "one")) == 0
    ok(run_script("evaluate.py", args(data, tmp_path / "two"), torchrun=2))
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["run"]["world_size"] == 2
    for key in ("imagenet_r", "imagenet_a", "imagenet_v2", "imagenet_sketch"):
        for field in ("n", "top1", "top5", "error"):  # 15, 9, 30 images: ragged, padded shards
            assert two[key][field] == one[key][field], (key, field)
        assert two[key]["nll"] == pytest.approx(one[key]["nll"], rel=1e-5)
        assert two[key]["ece"] == pytest.approx(one[key]["ece"], abs=1e-4)


def test_pretrained_reads_its_classes_from_a_folder_of_every_class(data, tmp_path):
    """torchvision-style weights carry no class list: the Sketch folders give it, R's cannot."""
    torch.save(data["model"].state_dict(), tmp_path / "w.pth")
    base = ["--pretrained", str(tmp_path / "w.pth"), "--arch", "tiny_resnet", "--crop_size", "48",
            "--resize_size", "48", "--device", "cpu", "--no_progress", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(
        ValueError, match="needs --val, --cifar, --imagenet_c, --imagenet_p or --imagenet_sketch"
    ):
        evaluate_main(base + ["--imagenet_r", str(data["r"])])
    sets = ["--imagenet_r", str(data["r"]), "--imagenet_sketch", str(data["sketch"])]
    assert evaluate_main(base + sets) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    ref = independent_loop(data, data["r"], data["classes"].index, scored=SUBSET_R)
    _check_block(res["imagenet_r"], ref)
    assert res["model"]["aug_type"] is None and res["imagenet_sketch"]["n"] == 30
