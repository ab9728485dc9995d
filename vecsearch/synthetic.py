"""Synthetic pictures: the photos the tests and benchmarks load (made with Pillow and numpy, so
no image files need to ship), in any size, format and mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(path: Path, seed: int, size: tuple[int, int] = (320, 240),
               fmt: str | None = None, mode: str = "RGB") -> Path:
    """A synthetic picture (gradient, shapes, noise); different seeds look clearly different."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([
        (np.sin(xx / (5 + 40 * rng.random()) + rng.random() * 6) * 127 + 128),
        (np.cos(yy / (5 + 40 * rng.random()) + rng.random() * 6) * 127 + 128),
        ((xx + yy) * rng.random() * 2) % 256,
    ], axis=-1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, max(11, w // 2)), y0 + rng.integers(10, max(11, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path
