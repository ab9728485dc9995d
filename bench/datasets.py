"""Three distributions of 2048-d vectors for the ANN benchmarks, each with held-out queries.

- `easy`: common.cnn_like, the generator bench/ann.py always used (equal clusters, noise 1.0).
- `hard`: cluster sizes drawn from a Zipf law (a few huge clusters, a long tail of tiny ones),
  within-cluster noise larger than the signal (1.5 x the channel scale), and a second level of
  sub-clusters: neighbours are many and close together, which is what makes graph search miss.
- `real`: embeddings of real photos (scikit-image's sample photos) through the test model
  (ResNet50 `--weights random`, the network vecsearch runs, untrained: no weights can be
  downloaded here): random crops at scales 5-100 %, flips, quarter turns and colour changes,
  at 96 x 96 pixels (ResNet50 is fully convolutional; 5x faster than 224). Cached on disk.

Held-out queries are not rows, as `vecsearch search FILE` sends: half are fresh draws from the
same distribution, half near-copies of rows (a small perturbation of a row: for `real`, the same
crop shifted a few pixels and re-lit).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
from common import DIM

SEED = 20261202
NAMES = ("easy", "hard", "real")
CACHE = Path(os.environ.get("VECSEARCH_BENCH_CACHE", Path.home() / ".cache" / "vecsearch-bench"))


@dataclass
class Dataset:
    name: str
    rows: np.ndarray  # n x 2048 float32, L2-normalised
    held_out: np.ndarray  # q x 2048: fresh draws, then near-copies of rows


def _normalise(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def make(name: str, n: int, queries: int, seed: int = SEED) -> Dataset:
    if name == "easy":
        both = common.cnn_like(n + queries // 2, seed)
        rows, fresh = both[:n], both[n:]
        rng = np.random.default_rng(seed + 1)
        return Dataset(name, rows, np.vstack([fresh, _near_copies(rows, queries - len(fresh), rng)]))
    if name == "hard":
        rows, fresh = _hard(n, queries // 2, seed)
        rng = np.random.default_rng(seed + 1)
        return Dataset(name, rows, np.vstack([fresh, _near_copies(rows, queries - len(fresh), rng)]))
    if name == "real":
        return _real(n, queries, seed)
    raise SystemExit(f"unknown distribution {name!r}: choose from {', '.join(NAMES)}")


def _near_copies(rows: np.ndarray, m: int, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    """Rows moved by a perturbation of about `noise` of their length (cosine ~0.99 to the row)."""
    picked = rows[rng.choice(len(rows), size=m, replace=False)]
    jitter = rng.normal(0, noise / np.sqrt(DIM), picked.shape).astype(np.float32)
    return _normalise(np.maximum(picked + jitter, 0))


def _hard(n: int, fresh: int, seed: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-sized clusters with sub-clusters, noise 1.5 x the channel scale."""
    rng = np.random.default_rng(seed)
    clusters = max(50, n // 100)
    space = common.CnnLike(rng, clusters, noise=1.5)
    weights = 1.0 / np.arange(1, clusters + 1) ** 1.1
    weights /= weights.sum()
    # Each cluster has 8 sub-centres a third of the noise away from its centre.
    offsets = rng.normal(0, 0.5, (clusters, 8, DIM)).astype(np.float32) * space.scales

    def draw(m: int) -> np.ndarray:
        c = rng.choice(clusters, size=m, p=weights)
        s = rng.integers(0, 8, m)
        v = space.centres[c] + offsets[c, s] + rng.normal(0, 1.5, (m, DIM)).astype(np.float32) * space.scales
        return _normalise(np.maximum(v, 0))

    rows = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        rows[start:start + min(chunk, n - start)] = draw(min(chunk, n - start))
    return rows, draw(fresh)


# -- real photos -------------------------------------------------------------------------------

SIDE = 96


def photos() -> list:
    """scikit-image's sample photos as RGB Pillow images (greyscale ones converted)."""
    import skimage.data
    from PIL import Image

    src = Path(skimage.data.__file__).parent
    out = []
    for path in sorted(src.iterdir()):
        if path.suffix.lower() in (".png", ".jpg"):
            with Image.open(path) as im:
                if min(im.size) >= 96:
                    out.append(im.convert("RGB"))
    return out


def _crop(images: list, params: np.ndarray) -> np.ndarray:
    """params rows: image, x0, y0, side (fractions of the image), flip, turns, brightness, saturation."""
    from PIL import Image, ImageEnhance

    out = np.empty((len(params), SIDE, SIDE, 3), dtype=np.uint8)
    for i, (img, x0, y0, side, flip, turns, bright, sat) in enumerate(params):
        im = images[int(img)]
        w, h = im.size
        s = side * min(w, h)
        box = (x0 * (w - s), y0 * (h - s))
        tile = im.resize((SIDE, SIDE), Image.BILINEAR, box=(box[0], box[1], box[0] + s, box[1] + s))
        if flip > 0.5:
            tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
        tile = tile.rotate(90 * int(turns))
        tile = ImageEnhance.Color(ImageEnhance.Brightness(tile).enhance(bright)).enhance(sat)
        out[i] = np.asarray(tile)
    return out


def _random_params(rng: np.random.Generator, m: int, count: int) -> np.ndarray:
    return np.column_stack([
        rng.integers(0, count, m), rng.random(m), rng.random(m),
        np.sqrt(rng.uniform(0.05, 1.0, m)),  # side: 5-100 % of the area
        rng.random(m), rng.integers(0, 4, m), rng.uniform(0.6, 1.4, m), rng.uniform(0.3, 1.5, m),
    ])


def _real(n: int, queries: int, seed: int) -> Dataset:
    images = photos()
    rng = np.random.default_rng(seed)
    params = _random_params(rng, n + queries // 2, len(images))
    near = params[rng.choice(n, size=queries - queries // 2, replace=False)].copy()
    near[:, 1:3] = np.clip(near[:, 1:3] + rng.normal(0, 0.02, (len(near), 2)), 0, 1)
    near[:, 6] *= rng.uniform(0.9, 1.1, len(near))
    every = np.vstack([params, near])
    key = hashlib.sha256(every.tobytes() + str(len(images)).encode()).hexdigest()[:16]
    cached = CACHE / f"real-{len(every)}-{key}.npy"
    if cached.exists():
        vectors = np.load(cached)
    else:
        vectors = _embed(images, every)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(cached, vectors)
    return Dataset("real", vectors[:n], vectors[n:])


def _embed(images: list, params: np.ndarray, chunk: int = 512) -> np.ndarray:
    import time
    import warnings

    from vecsearch.embed import Embedder, RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    embedder = Embedder(weights="random", batch_size=64).prepare()
    out = np.empty((len(params), DIM), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, len(params), chunk):
        out[start:start + chunk] = embedder.embed_arrays(_crop(images, params[start:start + chunk]))
        done = min(start + chunk, len(params))
        if done % (20 * chunk) < chunk or done == len(params):
            print(f"  real: embedded {done}/{len(params)} crops "
                  f"({done / (time.perf_counter() - started):.0f}/s)", flush=True)
    return out
