"""The makers' worker processes start clean (forkserver), not as forks of a caller whose CUDA,
NCCL and DALI threads a fork would leave behind, and they make the same files as one process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from augmix_gpu.data import make_corrupted_dataset, make_synthetic_dataset, pools
from augmix_gpu.data.heldout import make_heldout_set

STATE = "as imported"  # changed by a test in this process: a fork would carry the change over


def _state_seen_by_a_worker() -> str:
    return STATE


def test_a_worker_does_not_inherit_the_callers_state(monkeypatch):
    """The hazard itself: whatever this process set up after its imports (a CUDA context, NCCL's
    threads) is not in the worker. A fork would return the changed value."""
    monkeypatch.setattr(f"{__name__}.STATE", "changed by the caller")
    with pools.process_pool(1) as pool:
        assert pool.submit(_state_seen_by_a_worker).result() == "as imported"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pools") / "syn"
    return make_synthetic_dataset(
        root, num_classes=2, train_per_class=4, val_per_class=2, size=48, progress=False
    )


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """The start method of every pool the makers open."""
    methods: list[str] = []
    real = pools.process_pool

    def recording(workers, **kwargs):
        pool = real(workers, **kwargs)
        methods.append(pool._mp_context.get_start_method())
        return pool

    monkeypatch.setattr(pools, "process_pool", recording)
    return methods


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.JPEG"))
    }


def test_the_c_maker_with_workers_equals_one_process(src, tmp_path, started):
    kw = dict(severities=(2,), corruptions=("gaussian_noise", "frost"), seed=1, progress=False)
    one = make_corrupted_dataset(src / "val", tmp_path / "one", workers=0, **kw)
    two = make_corrupted_dataset(src / "val", tmp_path / "two", workers=2, **kw)
    assert started == ["forkserver"]
    assert len(_files(one)) == 2 * 4 and _files(one) == _files(two)


def test_the_heldout_maker_with_workers_equals_one_process(src, tmp_path, started):
    kw = dict(images=4, seed=2, crop_size=32, resize_size=40, progress=False)
    one = make_heldout_set(src / "train", tmp_path / "one", workers=0, **kw)
    two = make_heldout_set(src / "train", tmp_path / "two", workers=2, **kw)
    assert started == ["forkserver"]
    assert len(_files(one.root)) == 4 and _files(one.root) == _files(two.root)


_PROBE = """
import sys
sys.path.insert(0, {tmp!r})
from augmix_gpu.data import pools
if {named!r}:
    pools.preload_workers(["colorsys"])
import probe
with pools.process_pool(1, preload=["probe"]) as pool:
    print(pool.submit(probe.loaded, "colorsys").result())
"""


@pytest.mark.parametrize("named", [True, False])
def test_modules_named_ahead_are_imported_by_the_server_not_by_each_worker(tmp_path, named):
    """The trainer names what its three makers' pools need before the first starts the server
    (later pools cannot add to it): a worker then has the module without importing it. Checked
    both ways, in a fresh interpreter (this one's server may have started already)."""
    (tmp_path / "probe.py").write_text(
        "import sys\n\ndef loaded(name):\n    return name in sys.modules\n"
    )
    script = _PROBE.format(tmp=str(tmp_path), named=named)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(named)


class _Stop(Exception):
    pass


def test_the_trainer_names_all_its_makers_before_its_first_pool(monkeypatch, tmp_path):
    """The embedded task's data preparation opens the synthetic maker's pool first: by then the -C
    and -P makers' modules (and imagecorruptions) must be named for the server."""
    import torch

    from augmix_gpu.distributed import DistEnv
    from augmix_gpu.train import data as train_data
    from augmix_gpu.train.config import resolve_settings

    named: list[list[str]] = []

    def first_maker(*args, **kwargs):
        named.append(list(pools._PRELOAD))
        raise _Stop

    monkeypatch.setattr(pools, "_PRELOAD", [])
    monkeypatch.setattr(train_data, "make_synthetic_dataset", first_maker)
    monkeypatch.setenv("AUGMIX_GPU_CACHE", str(tmp_path))
    with pytest.raises(_Stop):
        train_data.prepare_data(resolve_settings([]), DistEnv(0, 0, 1, torch.device("cpu"), None))
    (preload,) = named
    wanted = {"augmix_gpu.data.synthetic", "augmix_gpu.data.make_c", "augmix_gpu.data.make_p"}
    assert wanted | {"imagecorruptions"} <= set(preload)
