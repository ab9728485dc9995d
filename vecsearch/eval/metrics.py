"""Retrieval metrics (pure functions, on ids) and the image perturbations of `vecsearch eval perturb`.

Metrics, per query, then averaged over queries (macro average):
- precision@k = relevant images among the k nearest / k;
- recall@k    = relevant images among the k nearest / all relevant images;
- F1@k        = 2 P R / (P + R) of that query (0 when both are 0);
- ANN recall@k against exact = |ANN top k & exact top k| / k.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


def precision_recall_f1(retrieved: Sequence[Any], relevant: Collection[Any], k: int
                        ) -> tuple[float, float, float]:
    """precision@k, recall@k and F1@k of one ranked list (fewer than k retrieved count as misses)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    hits = len(set(retrieved[:k]) & set(relevant))
    precision = hits / k
    recall = hits / len(relevant) if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def mean_precision_recall_f1(results: Mapping[Any, Sequence[Any]], relevant: Mapping[Any, Collection[Any]],
                             k: int) -> tuple[float, float, float]:
    """Means over queries (the keys of `results`) of precision@k, recall@k and F1@k."""
    if not results:
        raise ValueError("no queries")
    scores = [precision_recall_f1(results[q], relevant[q], k) for q in results]
    return tuple(sum(s[i] for s in scores) / len(scores) for i in range(3))  # type: ignore[return-value]


def recall_against_exact(ann: Mapping[Any, Sequence[Any]], exact: Mapping[Any, Sequence[Any]],
                         k: int) -> float:
    """Mean over queries of |ANN top k & exact top k| / k (the usual ANN recall@k)."""
    if not ann:
        raise ValueError("no queries")
    return sum(len(set(ann[q][:k]) & set(exact[q][:k])) / k for q in ann) / len(ann)


def label_precision(retrieved_labels: Sequence[str], label: str, k: int) -> float:
    """Fraction of the k nearest whose label is the query's (fewer than k retrieved count as misses)."""
    return sum(1 for x in retrieved_labels[:k] if x == label) / k


# -- perturbations ---------------------------------------------------------------------------


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    keep = rng.uniform(0.6, 0.8)
    cw, ch = max(1, int(w * keep)), max(1, int(h * keep))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), _resampling().BICUBIC)


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(10, 25) * rng.choice([-1, 1])
    return img.rotate(angle, _resampling().BICUBIC, expand=False)


def _color(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    import numpy as np
    from PIL import Image, ImageEnhance

    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.uniform(-0.05, 0.05) * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageFilter

    return img.filter(ImageFilter.GaussianBlur(max(img.size) * rng.uniform(0.01, 0.02)))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import Image

    w, h = img.size
    small = img.resize((max(1, w // 2), max(1, h // 2)), _resampling().BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=int(rng.integers(20, 41)))
    buf.seek(0)
    return Image.open(buf)


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0, rng.uniform(10, 20), a.shape)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.mirror(img)


def _resampling():
    from PIL import Image

    return Image.Resampling


@dataclass(frozen=True)
class Perturbation:
    name: str
    description: str
    apply: Callable[[Image.Image, np.random.Generator], Image.Image]


PERTURBATIONS = {p.name: p for p in [
    Perturbation("crop", "random crop keeping 60-80% of each side, resized back to full size", _crop),
    Perturbation("rotate", "rotation by 10-25 degrees either way, same size, black corners", _rotate),
    Perturbation("color", "colour jitter: brightness, contrast, saturation x0.6-1.4 each, hue +-0.05 turn",
                 _color),
    Perturbation("blur", "Gaussian blur, radius 1-2% of the longer side", _blur),
    Perturbation("jpeg", "halved in size, re-encoded as JPEG at quality 20-40", _jpeg),
    Perturbation("noise", "Gaussian pixel noise, sigma 10-20 (of 255)", _noise),
    Perturbation("flip", "mirrored left-right", _flip),
]}
DEFAULT_PERTURBATIONS = ("crop", "rotate", "color", "blur", "jpeg")


def perturbed(img: Image.Image, name: str, seed: int, index: int) -> Image.Image:
    """`img` (RGB) perturbed by PERTURBATIONS[name], reproducibly for (seed, index, name)."""
    import numpy as np

    kind = list(PERTURBATIONS).index(name)
    return PERTURBATIONS[name].apply(img, np.random.default_rng([seed, index, kind])).convert("RGB")
