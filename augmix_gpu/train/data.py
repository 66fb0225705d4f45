"""Which data a run uses: an ImageNet-layout folder, torchvision's CIFAR folders, or the embedded
synthetic task (generated once into a cache folder, with its -C version).

Only rank 0 generates; the other ranks wait at a barrier, so a torchrun job never writes the
cache twice. A finished cache is recognised by the generator's completion marker, so an
interrupted generation is redone rather than silently used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distributed import DistEnv, barrier, broadcast_object

CACHE_ENV = "AUGMIX_GPU_CACHE"


def cache_root() -> Path:
    """``$AUGMIX_GPU_CACHE`` or ``~/.cache/augmix_gpu``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "augmix_gpu")


@dataclass(frozen=True)
class DataSpec:
    train: Any  # folder path or CifarArrays
    val: Any
    corrupted: Path | None  # ImageNet-C layout root (corruption/severity/class/file), if any
    description: str
    perturbed: Path | None = None  # ImageNet-P layout root (perturbation/class/name.mp4), if any
    cifar_c: Path | None = None  # CIFAR-10-C/100-C folder (<corruption>.npy, labels.npy), if any


def _synthetic(config: dict[str, Any], env: DistEnv) -> DataSpec:
    from ..data import make_corrupted_dataset, make_synthetic_dataset

    ntr, nva = config["synthetic_train_per_class"], config["synthetic_val_per_class"]
    seed = config["synthetic_seed"]  # the data stay fixed while --seed varies the training
    sev = tuple(config["c_severities"])
    root = cache_root() / f"synthetic-10c-{ntr}tr-{nva}va-64px-seed{seed}"
    c_root = None if config["no_c_eval"] else root / ("c-sev" + "".join(map(str, sev)))
    if env.is_main:
        make_synthetic_dataset(
            root,
            num_classes=10,
            train_per_class=ntr,
            val_per_class=nva,
            size=64,
            seed=seed,
            overwrite=True,
        )
        if c_root is not None:
            make_corrupted_dataset(
                root / "val",
                c_root,
                severities=sev,
                seed=seed,
                workers=config["workers"],
                overwrite=True,
            )
    p_root = _synthetic_p(root, config, make=env.is_main)
    barrier(env)
    desc = f"synthetic 10-class 64 px ({root})"
    return DataSpec(root / "train", root / "val", c_root, desc, p_root)


def _synthetic_p(root: Path, config: dict[str, Any], make: bool) -> Path | None:
    """The demo's -P set: the first ``synthetic_p_per_class`` val images of each class as the 10
    perturbation sequences (x264 preset "medium": ~10 s on 2 cores; the frames are the same as
    with the official "veryslow" up to compression noise). ``--no_c_eval`` skips it too: the
    generated robustness sets come and go together (a given ``--imagenet_p`` is still evaluated)."""
    if config.get("no_p_eval") or config.get("imagenet_p") or config.get("no_c_eval"):
        return None
    n, seed = config["synthetic_p_per_class"], config["synthetic_seed"]
    out = root / f"p-{n}pc-seed{seed}"
    if make:
        from ..data.make_p import make_perturbed_dataset

        make_perturbed_dataset(root / "val", out, per_class=n, seed=seed, workers=config["workers"],
                               preset="medium", overwrite=True)  # fmt: skip
    return out


def prepare_data(config: dict[str, Any], env: DistEnv) -> DataSpec:
    """Resolve ``--dataset`` / ``--data`` / ``--imagenet_c`` into loader sources."""
    dataset = config["dataset"]
    if dataset == "synthetic":
        spec = _synthetic(config, env)
        if config["imagenet_c"]:
            spec = DataSpec(
                spec.train, spec.val, Path(config["imagenet_c"]), spec.description, spec.perturbed
            )
        return _with_p(spec, config)
    corrupted = Path(config["imagenet_c"]) if config["imagenet_c"] else None
    if dataset in ("cifar10", "cifar100"):
        from ..data.cifar import check_cifar_c_labels, load_cifar

        train = load_cifar(config["data"], name=dataset, train=True)
        val = load_cifar(config["data"], name=dataset, train=False)
        cifar_c = Path(config["cifar_c"]) if config.get("cifar_c") else None
        if cifar_c is not None:  # before training: a CIFAR-10-C given to a CIFAR-100 run, etc.
            check_cifar_c_labels(cifar_c, len(train.classes), dataset)
        return DataSpec(train, val, corrupted, f"{dataset} ({config['data']})", cifar_c=cifar_c)
    root = Path(config["data"])
    spec = DataSpec(root / "train", root / "val", corrupted, f"ImageNet layout ({root})")
    return _with_p(spec, config)


def _with_p(spec: DataSpec, config: dict[str, Any]) -> DataSpec:
    """``--imagenet_p`` (a given -P tree) wins over a generated one; ``--no_p_eval`` drops both."""
    if config.get("no_p_eval"):
        return DataSpec(spec.train, spec.val, spec.corrupted, spec.description)
    if config.get("imagenet_p"):
        p = Path(config["imagenet_p"])
        return DataSpec(spec.train, spec.val, spec.corrupted, spec.description, p)
    return spec


def prepare_heldout(config: dict[str, Any], env: DistEnv, spec: DataSpec):
    """The held-out set of ``--severity_objective heldout`` (None otherwise), made by rank 0 once.

    Cached under ``$AUGMIX_GPU_CACHE/heldout-<hash>``, keyed by the training folder and every
    parameter of the split, so a changed tree or flag makes a new one.
    """
    if config["aug_type"] != "learnable_augmix_jsd" or config["severity_objective"] != "heldout":
        return None
    from ..data.heldout import HeldoutSet, default_root, make_heldout_set

    params = dict(
        images=config["heldout_images"],
        seed=config["heldout_seed"],
        corruptions=list(config["heldout_corruptions"]),
        crop_size=config["crop_size"],
        resize_size=config["val_resize"],
    )
    root = default_root(spec.train, cache_root(), **params)
    error = None
    if env.is_main:
        try:
            make_heldout_set(
                spec.train,
                root,
                workers=config["workers"],
                progress=not config["no_progress"],
                **params,
            )
        except ValueError as e:  # bad flags found once the tree is known: every rank stops
            error = str(e)
    error = broadcast_object(error, env)
    if error is not None:
        raise ValueError(error)
    return HeldoutSet.read(root)


def build_loaders(config: dict[str, Any], env: DistEnv, spec: DataSpec, heldout=None):
    """Train and val loaders; with a held-out set, also its loader (train minus its files)."""
    from ..data import ResidentLoader, build_loader

    if config["dataset"] in ("cifar10", "cifar100") and config["cifar_loader"] == "resident":
        kw = dict(batch_size=config["batch"] // env.world_size, device=env.device, rank=env.rank,
                  world_size=env.world_size, seed=config["seed"])  # fmt: skip
        # CIFAR held on the device (no held-out set on CIFAR: validate_config refuses it).
        return (
            ResidentLoader(spec.train, "train", **kw),
            ResidentLoader(spec.val, "val", **kw),
            None,
        )
    common = {
        "batch_size": config["batch"] // env.world_size,
        "device": "gpu" if env.device.type == "cuda" else "cpu",
        "rank": env.rank,
        "world_size": env.world_size,
        "seed": config["seed"],
        "crop_size": config["crop_size"],
        "resize_size": config["val_resize"],
        "num_threads": config["workers"],
        "on_corrupt": config["on_corrupt"],
        "read_threads": config["read_threads"],
    }
    train = build_loader(
        spec.train,
        "train",
        random_area=(config["crop_area_min"], 1.0),
        antialias=not config["no_train_antialias"],
        exclude=heldout.source_files if heldout is not None else (),
        **common,
    )
    val = build_loader(spec.val, "val", classes=train.classes, **common)
    if heldout is None:
        return train, val, None
    # Prepared at the crop size already: the "corrupted" recipe takes the images as stored.
    held = build_loader(
        heldout.root,
        "corrupted",
        classes=train.classes,
        **{**common, "batch_size": config["heldout_batch"] or common["batch_size"]},
    )
    return train, val, held
