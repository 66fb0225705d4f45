"""Which data a run uses, and its loaders: an ImageNet-layout folder, torchvision's CIFAR folders,
or the embedded synthetic task (generated once into a cache folder, with its -C and -P sets).

Only rank 0 generates; the other ranks wait at a barrier, so a torchrun job never writes the
cache twice. A finished cache is recognised by the generator's completion marker, so an
interrupted generation is redone rather than silently used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..augment.severity import OBJECTIVES
from ..data import ResidentLoader, build_loader, make_corrupted_dataset, make_synthetic_dataset
from ..data.cifar import check_cifar_c_labels, load_cifar
from ..data.heldout import HeldoutSet, default_root, make_heldout_set
from ..data.make_p import make_perturbed_dataset
from ..data.pools import preload_workers
from ..data.replay import ReplayLoader
from ..data.synthetic import SHIFTED_POOL
from ..distributed import DistEnv, barrier, broadcast_object

if TYPE_CHECKING:
    from .config import Settings

CACHE_ENV = "AUGMIX_GPU_CACHE"


def cache_root() -> Path:
    """``$AUGMIX_GPU_CACHE`` or ``~/.cache/augmix_gpu``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "augmix_gpu")


@dataclass(frozen=True)
class DataSpec:
    """The run's data: train and val sources, and the robustness sets evaluated after training."""

    train: Any  # folder path or CifarArrays
    val: Any
    description: str
    # benchmark name (its flag: imagenet_c, imagenet_p, cifar_c, ...) -> root, given or generated
    roots: dict[str, Path] = field(default_factory=dict)
    # where the held-out split is drawn from: the train folder, or (a shifted synthetic task) its
    # twins with the test split's nuisances, file for file
    heldout_pool: Path | None = None


def prepare_data(settings: Settings, env: DistEnv) -> DataSpec:
    """Resolve ``--dataset`` / ``--data`` and the robustness flags into sources."""
    data = settings.data
    pool = None
    if data.dataset == "synthetic":
        train, val, description, generated = _synthetic(settings, env)
        if data.synthetic_shift != "none":
            pool = train.parent / SHIFTED_POOL
    elif data.is_cifar:
        train, val, description, generated = _cifar(settings)
    else:
        root = Path(data.data)
        train, val = root / "train", root / "val"
        description, generated = f"ImageNet layout ({root})", {}
    return DataSpec(train, val, description, _robustness_roots(settings, generated), pool)


def _robustness_roots(settings: Settings, generated: dict[str, Path]) -> dict[str, Path]:
    """Given roots win over generated ones; ``--no_c_eval`` / ``--no_p_eval`` drop -C / -P."""
    rob = settings.robustness
    given = {name: Path(root) for name, root in rob.roots().items() if root}
    roots = {**generated, **given}
    if rob.no_c_eval:
        roots.pop("imagenet_c", None)
        roots.pop("cifar_c", None)
    if rob.no_p_eval:
        roots.pop("imagenet_p", None)
    return roots


def _synthetic(settings: Settings, env: DistEnv) -> tuple[Path, Path, str, dict[str, Path]]:
    """The embedded task and its -C (and -P) sets, made by rank 0 into the cache."""
    data, rob = settings.data, settings.robustness
    ntr, nva = data.synthetic_train_per_class, data.synthetic_val_per_class
    seed = data.synthetic_seed  # the data stay fixed while --seed varies the training
    sev = tuple(rob.c_severities)
    shift = data.synthetic_shift
    suffix = "" if shift == "none" else f"-shift-{shift}"
    root = cache_root() / f"synthetic-10c-{ntr}tr-{nva}va-64px-seed{seed}{suffix}"
    # The generated robustness sets come and go together: --no_c_eval skips -P too (a given
    # --imagenet_p is still evaluated).
    make_sets = not rob.no_c_eval
    c_per_class = data.synthetic_c_per_class
    c_root = root / (
        "c-sev" + "".join(map(str, sev)) + (f"-{c_per_class}pc" if c_per_class else "")
    )
    p_root = root / f"p-{data.synthetic_p_per_class}pc-seed{seed}"
    make_p = make_sets and not rob.no_p_eval and not rob.imagenet_p
    if env.is_main:
        # one worker server for the three makers' pools, with what all of them import
        preload_workers(("augmix_gpu.data.synthetic", "augmix_gpu.data.make_c", "imagecorruptions",
                         "augmix_gpu.data.make_p"))  # fmt: skip
        make_synthetic_dataset(root, num_classes=10, train_per_class=ntr, val_per_class=nva,
                               size=64, seed=seed, shift=shift, overwrite=True,
                               workers=data.workers)  # fmt: skip
        if make_sets:
            make_corrupted_dataset(root / "val", c_root, severities=sev, seed=seed,
                                   per_class=c_per_class, workers=data.workers,
                                   overwrite=True)  # fmt: skip
        if make_p:
            _make_synthetic_p(root / "val", p_root, settings)
    barrier(env)
    generated = {"imagenet_c": c_root} if make_sets else {}
    if make_p:
        generated["imagenet_p"] = p_root
    what = "" if shift == "none" else f", shift {shift}"
    return root / "train", root / "val", f"synthetic 10-class 64 px{what} ({root})", generated


def _make_synthetic_p(val: Path, out: Path, settings: Settings) -> None:
    """The demo's -P set: the first ``synthetic_p_per_class`` val images of each class as the 10
    perturbation sequences (x264 preset "medium": ~10 s on 2 cores; the frames are the same as
    with the official "veryslow" up to compression noise)."""
    data = settings.data
    make_perturbed_dataset(val, out, per_class=data.synthetic_p_per_class, seed=data.synthetic_seed,
                           workers=data.workers, preset="medium", overwrite=True)  # fmt: skip


def _cifar(settings: Settings) -> tuple[Any, Any, str, dict[str, Path]]:
    data, name = settings.data, settings.data.dataset
    train = load_cifar(data.data, name=name, train=True)
    val = load_cifar(data.data, name=name, train=False)
    cifar_c = settings.robustness.cifar_c
    if cifar_c is not None:  # before training: a CIFAR-10-C given to a CIFAR-100 run, etc.
        check_cifar_c_labels(Path(cifar_c), len(train.classes), name)
    return train, val, f"{name} ({data.data})", {}


def needs_heldout(settings: Settings) -> bool:
    """Whether the severity's objective reads a held-out set (only then is there an updater)."""
    sev = settings.severity
    return settings.augment.learnable and not OBJECTIVES[sev.severity_objective].from_training_loss


def prepare_heldout(settings: Settings, env: DistEnv, spec: DataSpec):
    """The held-out set of an objective that needs one, or of ``--exclude_heldout`` (None
    otherwise), made by rank 0 once.

    Cached under ``$AUGMIX_GPU_CACHE/heldout-<hash>``, keyed by the training folder and every
    parameter of the split, so a changed tree or flag makes a new one. A shifted synthetic task
    draws it from the training images' twins (``spec.heldout_pool``): the held-out images carry
    the test split's nuisances, and their untwinned originals are left out of training.
    """
    sev = settings.severity
    if not (needs_heldout(settings) or sev.exclude_heldout):
        return None
    params = dict(
        images=sev.heldout_images,
        seed=sev.heldout_seed,
        corruptions=list(sev.heldout_corruptions),
        crop_size=settings.data.crop_size,
        resize_size=settings.data.val_resize,
    )
    pool = spec.heldout_pool or spec.train  # same relative file names: the split is the same
    root = default_root(pool, cache_root(), **params)
    error = None
    if env.is_main:
        try:
            make_heldout_set(pool, root, workers=settings.data.workers,
                             progress=not settings.run.no_progress, **params)  # fmt: skip
        except ValueError as e:  # bad flags found once the tree is known: every rank stops
            error = str(e)
    error = broadcast_object(error, env)
    if error is not None:
        raise ValueError(error)
    return HeldoutSet.read(root)


def build_loaders(settings: Settings, env: DistEnv, spec: DataSpec, heldout=None):
    """Train and val loaders; with a held-out set, also its loader (train minus its files)."""
    data, batch = settings.data, settings.per_rank_batch(env.world_size)
    if data.is_cifar and data.cifar_loader == "resident":
        kw = dict(batch_size=batch, device=env.device, rank=env.rank, world_size=env.world_size,
                  seed=settings.run.seed)  # fmt: skip
        # CIFAR held on the device (no held-out set on CIFAR: validate_settings refuses it).
        return (
            ResidentLoader(spec.train, "train", keep_last=data.last_batch == "keep", **kw),
            ResidentLoader(spec.val, "val", **kw),
            None,
        )
    common = dict(
        batch_size=batch, device="gpu" if env.device.type == "cuda" else "cpu", rank=env.rank,
        world_size=env.world_size, seed=settings.run.seed, crop_size=data.crop_size,
        resize_size=data.val_resize, num_threads=data.workers, on_corrupt=data.on_corrupt,
        read_threads=data.read_threads,
    )  # fmt: skip
    train = build_loader(
        spec.train,
        "train",
        random_area=(data.crop_area_min, 1.0),
        antialias=not data.no_train_antialias,
        exclude=heldout.source_files if heldout is not None else (),
        **common,
    )
    # the val epoch is the same every time: decoded once, replayed (if it fits in memory)
    val = ReplayLoader(build_loader(spec.val, "val", classes=train.classes, **common))
    if heldout is None or not needs_heldout(settings):  # --exclude_heldout alone: nothing reads it
        return train, val, None
    # Prepared at the crop size already: the "corrupted" recipe takes the images as stored.
    common["batch_size"] = settings.severity.heldout_batch or batch
    held = build_loader(heldout.root, "corrupted", classes=train.classes, **common)
    return train, val, held
