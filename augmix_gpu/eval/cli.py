"""evaluate.py's command line: flags -> ``EvalSettings`` -> load, evaluate, write the reports.

The flags are generated: one group per settings section (``settings.py``, ``checks.add_flags``)
and one ``--<name> DIR`` per registered benchmark (``registry.py``). A user error (bad flags)
exits with argparse's usage line and status 2; bad paths, layouts and names raise ``ValueError``
(evaluate.py prints it as one line).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any

import torch

from ..checks import add_flags, flag_fields
from ..distributed import DistEnv, cleanup, init_distributed
from .model import load_model
from .registry import BENCHMARKS
from .reports import compare_files, markdown_table, write_reports
from .run import evaluate_model, given_benchmarks
from .settings import DataSettings, EvalSettings, ModelSource, RunSettings


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(p, ModelSource, "model")
    add_flags(p, DataSettings, "data")
    roots = p.add_argument_group("benchmarks", "the root folder of each benchmark to evaluate")
    for b in BENCHMARKS:
        roots.add_argument(f"--{b.name}", metavar="DIR", default=argparse.SUPPRESS, help=b.help)
    add_flags(p, RunSettings, "run")
    return p


def parse_settings(argv: list[str] | None = None, description: str | None = None) -> EvalSettings:
    """The settings the flags ``argv`` ask for, checked (argparse's exit 2 on a bad request)."""
    p = build_parser(description)
    typed = vars(p.parse_args(argv))

    def section(cls: type) -> Any:
        return cls(**{f.name: typed[f.name] for f, _, _ in flag_fields(cls) if f.name in typed})

    try:
        settings = EvalSettings(
            model=section(ModelSource), data=section(DataSettings), run=section(RunSettings),
            roots={b.name: typed[b.name] for b in BENCHMARKS if b.name in typed},
        )  # fmt: skip
        if not settings.run.compare:
            if bool(settings.model.ckpt_path) == bool(settings.model.pretrained):
                raise ValueError(
                    "pass exactly one of --ckpt_path or --pretrained (or --compare A.json B.json)"
                )
            given_benchmarks(settings)
    except ValueError as e:
        p.error(str(e))
    return settings


def command_line_args(settings: EvalSettings) -> dict[str, Any]:
    """Every flag and its value as the results JSON records them (None: not given; an empty
    list, "all" for --corruptions and the like, is written None too)."""
    roots = {b.name: settings.roots.get(b.name) for b in BENCHMARKS}
    flags = {**asdict(settings.model), **asdict(settings.data), **roots, **asdict(settings.run)}
    return {k: None if v == [] else v for k, v in flags.items()}


def pretrained_classes(settings: EvalSettings) -> list[str]:
    """``--pretrained``'s label order: the sorted class folders of --val, else CIFAR's class list
    (--cifar), else the class folders of the first benchmark given whose layout has a folder of
    every class (an ImageNet-C cell, say)."""
    from ..data import find_classes, load_cifar

    if settings.data.val:
        return find_classes(settings.data.val)[0]
    if settings.data.cifar:
        return list(load_cifar(settings.data.cifar, settings.data.cifar_name, train=False).classes)
    for b, root in given_benchmarks(settings):
        if b.class_folder is not None:
            return find_classes(b.class_folder(root, settings.data))[0]
    flags = ["--val", "--cifar", *[f"--{b.name}" for b in BENCHMARKS if b.class_folder is not None]]
    raise ValueError(
        f"--pretrained needs {', '.join(flags[:-1])} or {flags[-1]} to read the classes from"
    )


def evaluate_checkpoint(settings: EvalSettings, env: DistEnv) -> int:
    """Load ``settings.model``, evaluate it on every rank, write the reports on rank 0.

    ``env``: the process group this process joined (``train.py --eval_only`` has one already).
    Sizes and the input normalisation: the flags, else what the model says, else ImageNet's."""
    classes = pretrained_classes(settings) if settings.model.pretrained else None
    loaded = load_model(settings.model, env.device, classes=classes)
    model = loaded.model
    if settings.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    card = loaded.card
    data = replace(
        settings.data,
        crop_size=settings.data.crop_size or card.crop_size or 224,
        resize_size=settings.data.resize_size or card.val_resize or 256,
        normalization=settings.data.normalization or card.normalization or "imagenet",
    )
    extra = {"args": command_line_args(settings), "model": loaded.info}
    results = evaluate_model(
        model, env, classes=loaded.classes, settings=replace(settings, data=data), extra_info=extra
    )
    if env.is_main:
        paths = write_reports(results, settings.run.out, settings.run.name)
        print(markdown_table(results))
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """evaluate.py: ``--compare A.json B.json``, or evaluate one model."""
    settings = parse_settings(argv, description)
    if settings.run.compare:
        print(compare_files(*settings.run.compare))
        return 0
    env = init_distributed(settings.run.device)
    try:
        return evaluate_checkpoint(settings, env)
    finally:
        cleanup(env)
