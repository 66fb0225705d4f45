"""Input checks shared by the package, and typed settings whose flags are declared once.

Every check raises ``ValueError`` whose message says what was received and what is expected, so a
wrong call fails at the boundary with a fix instead of deep inside a kernel.

Settings (``train/config.py``, ``eval/settings.py``) are dataclasses whose fields are declared with
:func:`flag`: the name, type, default, help and check of a setting live in that one declaration,
and the command line is generated from it (:func:`add_flags`).
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Flag",
    "add_flags",
    "at_least",
    "check_flag_value",
    "check_image_batch",
    "check_in_range",
    "check_int_at_least",
    "check_positive",
    "flag",
    "flag_fields",
    "positive",
]


def check_image_batch(x: object, name: str = "x", *, check_values: bool = True) -> None:
    """Check that ``x`` is an RGB image batch: uint8 ``[B,3,H,W]`` or float ``[B,3,H,W]`` in [0,1].

    Float batches are checked for NaN/inf and range with one fused ``aminmax`` pass and one host
    sync (the only sync it costs); uint8 needs no value check. ``check_values=False`` skips it.
    """
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name}: expected a torch.Tensor image batch [B,3,H,W], got {type(x).__name__}"
        )
    shape = tuple(x.shape)
    if x.dim() != 4:
        hint = ": add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{name}: expected a [B,3,H,W] batch, got shape {shape}{hint}")
    if shape[1] != 3:
        hint = (
            ": the batch looks channels-last, use x.permute(0, 3, 1, 2)"
            if shape[3] == 3
            else ": convert the images to RGB"
        )
        raise ValueError(f"{name}: expected 3 (RGB) channels in dim 1, got shape {shape}{hint}")
    if shape[0] == 0 or shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {shape}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(
            f"{name}: expected dtype uint8 (0..255) or a floating dtype (values in [0,1]), "
            f"got {x.dtype}: convert with x.to(torch.uint8) or x.float() / 255"
        )
    if check_values and x.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{name}: expected finite values in [0,1], got NaN")
        if lo < 0.0 or hi > 1.0:
            hint = ": divide 0..255 images by 255" if hi > 1.0 and math.isfinite(hi) else ""
            raise ValueError(
                f"{name}: expected float values in [0,1], got values in [{lo:g}, {hi:g}]{hint}"
            )


def check_positive(value: float, name: str) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ``ValueError``."""
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_in_range(value: float, name: str, low: float, high: float) -> float:
    """Return ``float(value)`` if ``low <= value <= high``, else raise ``ValueError``."""
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return v


def check_int_at_least(value: int, name: str, minimum: int) -> int:
    """Return ``value`` if it is an int (not bool) ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


# --- typed settings: a flag declared once ------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """What the command line needs to know of one setting, beside its name, type and default.

    ``check(value)`` returns what is wrong (``"must be >= 1"``; for a list, of the whole list) or
    None; ``convert`` maps an
    accepted spelling to the canonical value (``"bf16-mixed"`` -> ``"bf16"``); ``nargs``/``const``
    as in argparse (``"?"`` with a ``const`` for a flag that may be given alone).
    """

    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    convert: Callable[[Any], Any] | None = None
    nargs: str | None = None
    const: Any = None
    hidden: bool = False


def flag(default: Any, help: str = "", **kw: Any) -> Any:
    """A dataclass field that is also a command-line flag ``--<field name>`` (see :class:`Flag`)."""
    meta = {"flag": Flag(help, **kw)}
    if isinstance(default, (list, tuple)):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def flag_fields(section: type) -> list[tuple[Any, Any, Flag]]:
    """``(field, resolved type, Flag)`` of every flag of a settings dataclass, in order."""
    hints = typing.get_type_hints(section)
    return [(f, hints[f.name], f.metadata["flag"]) for f in fields(section) if "flag" in f.metadata]


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``list[int]`` -> int; ``str`` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_flags(parser: argparse.ArgumentParser, section: type, title: str | None = None) -> None:
    """One ``--<name>`` per field of ``section``, in an argument group; every default is
    SUPPRESSed (``parse_args`` returns only the flags typed) and written into the help."""
    group = parser.add_argument_group(title or section.__name__, section.__doc__)
    for f, hint, meta in flag_fields(section):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        kw["help"] = argparse.SUPPRESS if meta.hidden else _help(meta.help, hint, default)
        if hint is bool:  # --x and --no-x, so a preset's true can be switched off on the command
            # line (not for the negative names: --no-no_c_eval would read as a riddle)
            negative = f.name.startswith("no_")
            kw["action"] = "store_true" if negative else argparse.BooleanOptionalAction
        else:
            kw["type"] = _base_type(hint)
            if typing.get_origin(hint) is list:
                kw["nargs"] = meta.nargs or "+"
            elif meta.nargs:
                kw["nargs"], kw["const"] = meta.nargs, meta.const
            if meta.choices:
                kw["choices"] = meta.choices
        group.add_argument(f"--{f.name}", **kw)


def _help(text: str, hint: Any, default: Any) -> str:
    shown = "" if hint is bool or default is None else f" (default: {default})"
    return (text + shown).replace("%", "%%")


def check_flag_value(name: str, value: Any, hint: Any, meta: Flag) -> Any:
    """The canonical value of flag ``name``, or a ``ValueError`` saying what is wrong (values that
    come from a preset file have not been through argparse, so their type is checked here)."""
    if meta.convert is not None:
        value = meta.convert(value)
    if value is None or hint is Any:
        return value
    base = _base_type(hint)
    items = value if typing.get_origin(hint) is list else [value]
    if typing.get_origin(hint) is list and not isinstance(value, list):
        raise ValueError(f"--{name} {value!r}: expected a list of {base.__name__}")
    for item in items:
        ok = isinstance(item, base) and not (base is not bool and isinstance(item, bool))
        if base is float and isinstance(item, int) and not isinstance(item, bool):
            ok = True
        if not ok:
            raise ValueError(f"--{name} {item!r}: expected {base.__name__}")
        if meta.choices and item not in meta.choices:
            raise ValueError(f"--{name} {item!r}: expected one of {list(meta.choices)}")
    problem = meta.check(value) if meta.check is not None else None  # a list: the whole list
    if problem:
        # a check may say it all, naming the flag itself
        raise ValueError(
            problem if problem.startswith(f"--{name} ") else f"--{name} {value!r}: {problem}"
        )
    if base is float:  # a TOML or JSON integer for a float setting (`warmup_epochs = 0`)
        return [float(i) for i in value] if isinstance(value, list) else float(value)
    return value
