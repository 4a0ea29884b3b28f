"""Write a tiny, learnable image folder: ``OUT/<class>/<nnnnn>.png``, the layout torchvision's ImageFolder reads.

    python examples/image_folder/make_images.py --out /tmp/shapes --per-class 300

then train on it: the command in examples/image_folder/__init__.py (and examples/README.md).

Three classes of RGB images with random colours, period, phase and pixel noise: ``hstripes``
(horizontal stripes), ``vstripes`` (vertical stripes) and ``checker`` (a checkerboard).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("hstripes", "vstripes", "checker")


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of the given class."""
    period = int(rng.integers(3, max(4, size // 3)))
    rows, cols = np.mgrid[0:size, 0:size] + rng.integers(0, period, size=2)[:, None, None]
    bands = {"hstripes": rows // period, "vstripes": cols // period,
             "checker": rows // period + cols // period}[kind] % 2
    fg, bg = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    if np.abs(fg - bg).sum() < 150:  # keep the pattern visible
        bg = 255 - fg
    image = np.where(bands[..., None] == 1, fg, bg) + rng.normal(0, 20, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write(out: Path, per_class: int, size: int = 32, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for kind in CLASSES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = out / kind / f"{i:05d}.png"
            Image.fromarray(pattern(kind, size, rng)).save(path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the folder to write (created)")
    p.add_argument("--per-class", type=int, default=300, help="images per class")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {len(paths)} images of {args.size}x{args.size} in {len(CLASSES)} classes to {args.out}")


if __name__ == "__main__":
    main()
