"""Which model made the vectors: the record kept in the `embedding_model` table (no torch here).

A database holds vectors from exactly one network + weights + preprocessing. Mixing two vector
spaces silently ruins every distance, so a load with another model is refused unless the user
asks to re-embed everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from .errors import NotFound, SchemaMismatch
from .limits import DIM

if TYPE_CHECKING:
    import numpy as np

NAME = "torchvision.models.resnet50"
DEFAULT_WEIGHTS = "IMAGENET1K_V2"
# torchvision's checkpoint file name carries the first 8 hex digits of its sha256: a local copy
# of that file given with `--weights FILE` is the same model as the default.
DEFAULT_WEIGHTS_SHA256_PREFIX = "11ad3fa6"
RANDOM_SEED = 0
RANDOM_WEIGHTS = f"random(seed={RANDOM_SEED})"

# ResNet50_Weights.IMAGENET1K_V2.transforms(), written out so the record (and a model check)
# needs no torch; tests/test_embed.py keeps them equal to torchvision's. `decode` names how
# vecsearch.images turns a file into RGB pixels, which moves embeddings too.
RESIZE = 232
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PREPROCESSING = {
    "resize": RESIZE,
    "interpolation": "bilinear",
    "crop": CROP,
    "mean": list(MEAN),
    "std": list(STD),
    "decode": "pillow rgb, exif orientation, first frame, jpeg draft, alpha over white",
}


@dataclass(frozen=True)
class ModelRecord:
    """One row of `embedding_model`: network, weights, preprocessing (JSON) and dimension."""

    name: str
    weights: str
    preprocessing: str
    dim: int

    def describe(self) -> str:
        return f"{self.name}, weights {self.weights}"


def record_for(weights: str) -> ModelRecord:
    """The record of ResNet50 with the given weights label and this vecsearch's preprocessing."""
    return ModelRecord(NAME, weights, json.dumps(PREPROCESSING, sort_keys=True), DIM)


def recorded_model(conn: psycopg.Connection) -> ModelRecord | None:
    row = conn.execute("SELECT name, weights, preprocessing, dim FROM embedding_model").fetchone()
    return ModelRecord(*row) if row else None


def ensure_model(conn: psycopg.Connection, record: ModelRecord, reembed: bool = False) -> None:
    """Record `record` as the database's model, or refuse when another model made its vectors.

    `reembed` (or an empty images table: nothing to mix) replaces a differing record; the caller
    must then re-embed every row, which `vecsearch.load.load(..., reembed=True)` does.
    """
    with conn.transaction():
        # One writer at a time decides (two first loads racing would both see an empty table).
        conn.execute("LOCK TABLE embedding_model IN SHARE ROW EXCLUSIVE MODE")
        current = recorded_model(conn)
        if current == record:
            return
        if current is None:
            conn.execute(
                "INSERT INTO embedding_model (name, weights, preprocessing, dim) VALUES (%s, %s, %s, %s)",
                [record.name, record.weights, record.preprocessing, record.dim])
            return
        empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM images)").fetchone()[0]
        if not (reembed or empty):
            raise SchemaMismatch(mismatch_message(current, record))
        conn.execute(
            "UPDATE embedding_model SET name = %s, weights = %s, preprocessing = %s, dim = %s, "
            "created_at = now()", [record.name, record.weights, record.preprocessing, record.dim])


def mismatch_message(current: ModelRecord, wanted: ModelRecord) -> str:
    if (current.name, current.weights) != (wanted.name, wanted.weights):
        what = f"{current.describe()}, not {wanted.describe()}"
    else:
        what = f"{current.describe()} with other preprocessing (made by another vecsearch version)"
    return (f"the database's vectors were made by {what}: load with the same `--weights`, "
            "or pass `--reembed` to re-embed every image with the new model")


def require_recorded(conn: psycopg.Connection) -> ModelRecord:
    """The model the database records, else NotFound: nothing is loaded yet, so there is no model
    to embed a query image with."""
    record = recorded_model(conn)
    if record is None:
        raise NotFound("the database records no model to embed files with (nothing loaded by "
                       "`vecsearch load` yet): run `vecsearch load DIR` first")
    return record


# Decoded images (images.open_image) -> n x 2048 vectors of the model a record names: an
# embed.Embedders' embed_images, or embed.embed_images_with(one Embedder).
EmbedImages = Callable[[ModelRecord, Sequence[Any]], "np.ndarray"]
