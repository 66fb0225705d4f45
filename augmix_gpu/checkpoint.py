"""Atomic checkpoints and exact resume.

A checkpoint is one ``torch.save``'d dict written to a temporary file in the same folder, flushed
to disk and renamed over the target, so a crash or SIGTERM mid-write never leaves a truncated file.
It holds everything a run needs to continue bit-for-bit: model, optimizer, scaler, scheduler,
augmenter (severity parameters and its random generator), epoch, step, RNG states, and the class
list so evaluation maps folders to the same indices.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` via temp file + fsync + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error for bad paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: our own files hold numpy RNG states and the config dict.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"checkpoint {str(path)!r} could not be read ({e})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this project (no 'model' entry)")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global state is what libraries use
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, class names, resolved training config) from a checkpoint."""
    from .models import build_model

    state = load_checkpoint(path)
    config = state.get("config", {})
    classes = state.get("classes")
    if not classes:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no class list; it cannot map folders to labels"
        )
    model = build_model(config.get("arch", "resnet50"), num_classes=len(classes))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), list(classes), config
