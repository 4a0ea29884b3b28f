"""The data function: an image folder on disk -> (train, eval) datasets of (image tensor, class index).

``root/<class>/<file>.png`` (torchvision's ImageFolder layout): the class folders, sorted, are the
labels 0, 1, …. Files are decoded with PIL in ``__getitem__``, so with ``data.num_workers=2`` the
decoding runs in the DataLoader's worker processes, beside training. See __init__.py for the command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolder(Dataset):
    """``(path, label)`` pairs -> ``(float tensor (3, S, S) scaled to [-1, 1], label)``; ``flip``: random
    horizontal flips (training augmentation; the DataLoader seeds each worker's RNG)."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, flip: bool = False) -> None:
        self.samples, self.image_size, self.flip = samples, image_size, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


def find_images(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label), …]) of ``root/<class>/<file>``, sorted (the same on every rank)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root}: no such directory. HINT: make one with "
                                "python examples/image_folder/make_images.py --out DIR")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(str(f), label) for label, name in enumerate(classes) for f in sorted((root / name).iterdir())
               if f.suffix.lower() in EXTENSIONS]
    if not samples:
        raise FileNotFoundError(f"data.root={root}: no images in {root}/<class>/ (expected {', '.join(EXTENSIONS)})")
    return classes, samples


def make_data(root: str, image_size: int = 32, eval_fraction: float = 0.2,
              split_seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """A held-out split of the folder fixed by ``split_seed`` (not by the training seed); eval_fraction=0: no eval."""
    _, samples = find_images(root)
    order = np.random.default_rng(split_seed).permutation(len(samples))
    n_eval = int(round(len(samples) * eval_fraction))
    train = [samples[i] for i in order[n_eval:]]
    held_out = [samples[i] for i in order[:n_eval]]
    return ImageFolder(train, image_size, flip=True), ImageFolder(held_out, image_size) if held_out else None
