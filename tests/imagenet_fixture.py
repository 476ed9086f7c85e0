"""A tiny ImageNet-layout tree for end-to-end tests: ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``.

1000 class folders named like real WordNet ids (``n`` + 8 digits, sorted as ImageFolder sorts
them), file names in ImageNet's style (``<wnid>_<n>.JPEG`` for train, ``ILSVRC2012_val_<n>.JPEG``
for val), a few small JPEGs of varied sizes and aspect ratios per class, so the real
Resize(256) → CenterCrop(224) transform has something to do. Written in a couple of seconds: a
few dozen distinct JPEGs are encoded once and their bytes are written to every folder (the content
is random noise; these tests check plumbing, shapes and indices, never accuracy).

Assumption: real ImageNet wnids are 8-digit ids starting ``n0`` or ``n1``; these are drawn from
that range with a fixed seed (not the real list, which the tests do not need).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 1000
# (width, height): landscape, portrait, square, tiny, non-multiple-of-8 sides.
SIZES = ((64, 48), (48, 64), (56, 56), (33, 21), (90, 60), (40, 75), (128, 96), (70, 70))


def wnids(num_classes: int = NUM_CLASSES, seed: int = 0) -> list[str]:
    """``num_classes`` distinct real-looking WordNet ids, sorted (ImageFolder's class order)."""
    ids = random.Random(seed).sample(range(1_000_000, 15_000_000), num_classes)
    return sorted(f"n{i:08d}" for i in ids)


def jpeg_blobs(n: int = 32, seed: int = 0) -> list[bytes]:
    """``n`` distinct small JPEG files (random RGB noise), cycling through :data:`SIZES`."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
        blobs.append(buf.getvalue())
    return blobs


def write_imagenet_tree(root: Path, train_per_class: int = 3, val_per_class: int = 1,
                        num_classes: int = NUM_CLASSES, seed: int = 0) -> Path:
    """Write the tree under ``root`` and return it. Image i of a class gets blob
    ``(class + i) mod n``, so neighbouring classes differ and every size occurs in every split."""
    blobs = jpeg_blobs(seed=seed)
    val_counter = 0
    for c, wnid in enumerate(wnids(num_classes, seed)):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                if split == "train":
                    name = f"{wnid}_{1000 + 7 * i}.JPEG"
                else:
                    val_counter += 1
                    name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
                (folder / name).write_bytes(blobs[(c + i) % len(blobs)])
    return root


def corrupt(path: Path, how: str = "truncate") -> Path:
    """Damage one JPEG: ``truncate`` keeps its first 40% (the header decodes, the data does not),
    ``garbage`` overwrites it with bytes that are no image at all."""
    data = path.read_bytes()
    path.unlink()  # a new file: a hard-linked copy of a shared tree stays intact
    path.write_bytes(data[: max(16, int(len(data) * 0.4))] if how == "truncate" else b"not a jpeg" * 20)
    return path
