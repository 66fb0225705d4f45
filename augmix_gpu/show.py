"""Picture of what AugMix draws: original, each chain and the mixed views, per severity.

    python -m augmix_gpu.show IMAGE --severity 1 3 6 --out grid.png

One row per severity. The ops, level fractions, signs and weights are drawn once (``--seed``) and
reused at every severity, so the rows differ only by the magnitude: the picture shows what severity
does. Chain titles read ``op(parameter)`` in the op's own unit. Needs matplotlib (the ``plot``
extra).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .augment.augmix import AugMixBatch, AugMixParams

__all__ = ["describe_chain", "load_image", "main", "make_grid"]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "augmix_gpu.show needs matplotlib: pip install 'augmix-gpu[plot]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_image(path: str | Path, size: int = 224) -> Tensor:
    """An image file as uint8 ``[3, size, size]``: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except (FileNotFoundError, OSError) as err:
        raise SystemExit(f"cannot read image {str(path)!r}: {err}") from err
    if size > 0:
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return (
        torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        .view(img.height, img.width, 3)
        .permute(2, 0, 1)
    )


def _fmt(name: str, p: float, width: int, height: int) -> str:
    """One applied op with its parameter in the op's own unit."""
    if name == "rotate":
        return f"rotate {p:+.1f}°"
    if name in ("translate_x", "translate_y"):
        return f"{name} {p * (width if name.endswith('x') else height):+.1f}px"
    if name.startswith("shear"):
        return f"{name} {p:+.2f}"
    if name == "posterize":
        return f"posterize {4 - p:.2f} bits"
    if name == "solarize":
        return f"solarize t={256 - p:.0f}"
    if name in ("autocontrast", "equalize"):
        return name
    return f"{name} x{p:.2f}"


def describe_chain(
    aug: AugMixBatch,
    params: AugMixParams,
    severity: float,
    view: int,
    chain: int,
    sample: int = 0,
    size=(224, 224),
) -> list[str]:
    """The ops of one chain as text, e.g. ``["rotate +12.0°", "posterize 2.80 bits"]``."""
    depth = int(params.depth[view, chain, sample])
    lines = []
    for t in range(depth):
        op = aug.ops[int(params.ops[view, chain, t, sample])]
        level = 0.1 + float(params.level_u[view, chain, t, sample]) * (severity - 0.1)
        p = float(op.parameter(torch.tensor(level)))
        if op.signed:
            p *= float(params.signs[view, chain, t, sample])
        lines.append(_fmt(op.name, p, size[1], size[0]))
    return lines


def make_grid(
    image: Tensor,
    severities: Sequence[float],
    *,
    seed: int = 0,
    all_ops: bool = False,
    width: int = 3,
    depth: int = -1,
):
    """A matplotlib figure: per severity, the original, each chain of view 1, and the views."""
    plt = _require_matplotlib()
    aug = AugMixBatch(width=width, depth=depth, all_ops=all_ops, normalize=False)
    x = image.unsqueeze(0)
    params = aug.sample_params(1, torch.Generator().manual_seed(seed))
    cols = 1 + width + aug.num_views
    fig, axes = plt.subplots(
        len(severities), cols, figsize=(2.0 * cols, 2.8 * len(severities)), squeeze=False
    )
    h, w = image.shape[-2:]
    for r, s in enumerate(severities):
        with torch.no_grad():
            chains = aug.chains(x, params, float(s))[0, :, 0]  # view 1: [width, 3, H, W]
            views = aug.apply(x, params, float(s))[1:]
        panels = [(image.float() / 255, "original" if r == 0 else "", f"severity {s:g}")]
        for i in range(width):
            text = "\n".join(describe_chain(aug, params, float(s), 0, i, size=(h, w)))
            title = f"chain {i + 1} (w={float(params.weights[0, 0, i]):.2f})"
            panels.append((chains[i], title, text))
        for v, view in enumerate(views):
            panels.append((view[0], f"view {v + 1} (m={float(params.mix[v, 0]):.2f})", ""))
        for c, (img, title, text) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(text, fontsize=10)
            elif text:
                ax.set_xlabel(text, fontsize=6.5)
    ops = "all 13 ops" if all_ops else "the paper's 9 ops"
    fig.suptitle(
        f"AugMixBatch: width {width}, depth {depth}, {ops}, seed {seed} (chains of view 1)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m augmix_gpu.show", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("image", help="an image file (any format PIL reads)")
    parser.add_argument(
        "--severity", type=float, nargs="+", default=[1.0, 3.0, 6.0], help="one row each"
    )
    parser.add_argument("--out", default="augmix_grid.png", help="output PNG")
    parser.add_argument(
        "--size", type=int, default=224, help="resize+centre-crop side; 0 keeps the image"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn ops/levels/weights")
    parser.add_argument("--width", type=int, default=3, help="chains per view")
    parser.add_argument("--depth", type=int, default=-1, help="ops per chain; -1: 1..3 at random")
    parser.add_argument(
        "--all-ops", action="store_true", help="add color/contrast/brightness/sharpness"
    )
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)
    bad = [s for s in args.severity if not 0 < s <= 10]
    if bad:
        parser.error(f"--severity: expected values in (0, 10], got {bad}")
    fig = make_grid(
        load_image(args.image, args.size),
        args.severity,
        seed=args.seed,
        all_ops=args.all_ops,
        width=args.width,
        depth=args.depth,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
