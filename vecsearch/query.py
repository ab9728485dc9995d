"""Neighbour queries: the k images nearest to an image id or to any vector.

Both call the SQL functions of migration 0002 (`vecsearch_similar`, `vecsearch_similar_to`), so
the CLI, the web app and an analyst in psql get the same answers: HNSW candidates on
`embedding::halfvec(2048)`, re-ranked by the exact full-precision distance, with iterative index
scans under filters and an exact scan when the index cannot supply k rows.

This is the `vecsearch similar` path: psycopg only. A query by id sends no vector at all (the
database reads the query vector itself); numpy and torch are never imported here.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from . import db
from .errors import InvalidInput, NotFound, SchemaMismatch
from .limits import MAX_EF_SEARCH, MAX_K

if TYPE_CHECKING:
    import numpy as np

COLUMNS = ("rank", "id", "similarity", "path")


@dataclass(frozen=True)
class Neighbour:
    id: int
    path: str
    distance: float  # cosine distance, 0 (same direction) .. 2

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance


def similar(conn: psycopg.Connection, image_id: int, k: int = 10, *, ef_search: int | None = None,
            exact: bool = False, under: str | Path | None = None) -> list[Neighbour]:
    """The k images nearest to image `image_id` by cosine distance, itself excluded."""
    params = _params(k, ef_search, under)
    rows = conn.execute(
        "SELECT id, path, distance FROM vecsearch_similar(%s::bigint, k => %s::integer, "
        "ef_search => %s::integer, under => %s::text, exact => %s::boolean)",
        [image_id, k, params["ef_search"], params["under"], exact],
    ).fetchall()
    if not rows:
        _explain_empty(conn, image_id=image_id, under=under)
    return [Neighbour(*row) for row in rows]


def similar_to(conn: psycopg.Connection, vector: Any, k: int = 10, *, exclude: Sequence[int] = (),
               ef_search: int | None = None, exact: bool = False, under: str | Path | None = None
               ) -> list[Neighbour]:
    """The k images nearest to `vector` (floats, numpy array or pgvector Vector), `exclude` left out."""
    params = _params(k, ef_search, under)
    try:
        rows = conn.execute(
            "SELECT id, path, distance FROM vecsearch_similar_to(%s::vector, k => %s::integer, "
            "ef_search => %s::integer, under => %s::text, exact => %s::boolean, "
            "exclude => %s::bigint[])",
            [_as_vector(vector), k, params["ef_search"], params["under"], exact,
             [int(i) for i in exclude]],
        ).fetchall()
    except psycopg.errors.DataException as e:  # e.g. a vector with NaN
        raise InvalidInput(f"invalid query vector: {e.diag.message_primary or e}") from e
    if not rows:
        _explain_empty(conn, under=under)
    return [Neighbour(*row) for row in rows]


def search_file(conn: psycopg.Connection, path: str | Path, k: int = 10, *, weights: str | None = None,
                embedder: Any = None, ef_search: int | None = None, exact: bool = False,
                under: str | Path | None = None, device: str = "auto", precision: str = "auto",
                home: Path | None = None) -> list[Neighbour]:
    """Neighbours of an image file, embedded with the model the database records.

    `embedder`: an embed.Embedder to use (it must be the recorded model), else one is built
    (`weights`: the weights file, for a database loaded with one; `device`, `precision`, `home`:
    its engine, embed.Embedder's). A row for the very same file (same absolute path) is left
    out: the query never finds itself.
    """
    file = absolute(path)
    check_args(k, ef_search)  # fail on bad arguments before loading a model
    embed = file_embedder(conn, weights, embedder=embedder, device=device, precision=precision, home=home)
    vector = embed(file)
    return similar_to(conn, vector, k, exclude=ids_of_paths(conn, [file]), ef_search=ef_search,
                      exact=exact, under=under)


def file_embedder(conn: psycopg.Connection, weights: str | None = None, *, embedder: Any = None,
                  device: str = "auto", precision: str = "auto", home: Path | None = None
                  ) -> Callable[[Path], np.ndarray]:
    """A function embedding image files with the recorded model (built on first use, then cached)."""

    def embed_file(path: Path) -> np.ndarray:
        if not Path(path).is_file():
            raise NotFound(f"no such image file: {path}")
        from . import models

        record = models.recorded_model(conn)
        if record is None:
            raise NotFound("the database records no model to embed files with (nothing loaded yet): "
                           "run `vecsearch load DIR` first")
        if embedder is None:
            return embedders(weights, device, precision, home).embed_file(record, Path(path))
        if embedder.record != record:
            raise SchemaMismatch(models.mismatch_message(record, embedder.record))
        return embedder.embed_file(Path(path))

    return embed_file


class Embedders:
    """The embedder of the model a database records, built on first use (torch is imported then,
    and building takes seconds) and kept. One forward pass at a time: a ResNet50 forward already
    uses every core. A database re-embedded with another model meanwhile gets that model on the
    next call. `weights`: where the recorded model's weights come from (None: its own source);
    `device`, `precision`, `home`: its engine (embed.Embedder's).
    """

    def __init__(self, weights: str | None = None, device: str = "auto", precision: str = "auto",
                 home: Path | None = None) -> None:
        self.weights = weights
        self.engine = {"device": device, "precision": precision, "home": home}
        self.loads = 0
        self._lock = threading.Lock()
        self._record: Any = None
        self._embedder: Any = None

    def embed_images(self, record: Any, images: Sequence[Any]) -> np.ndarray:
        """Decoded images (images.open_image) -> n x 2048 vectors of the model `record` names."""
        with self._lock:
            if self._embedder is None or record != self._record:
                from .embed import Embedder

                self._embedder = Embedder.from_record(record, weights=self.weights, **self.engine)
                self._record = record
                self.loads += 1
            return self._embedder.embed_images(images)

    def embed_file(self, record: Any, path: Path) -> np.ndarray:
        """One image file, decoded exactly as `vecsearch load` decodes it."""
        from .images import open_image

        return self.embed_images(record, [open_image(path)])[0]


@functools.lru_cache(maxsize=4)
def embedders(weights: str | None = None, device: str = "auto", precision: str = "auto",
              home: Path | None = None) -> Embedders:
    """This process's Embedders for a weights source and engine (the CLI's; the web app keeps its own)."""
    return Embedders(weights, device, precision, home)


def neighbours_of_terms(conn: psycopg.Connection, terms: Sequence[Any], k: int,
                        embed_file: Callable[[Path], np.ndarray], *, ef_search: int | None = None,
                        exact: bool = False, under: str | Path | None = None
                        ) -> tuple[list[Neighbour], list[int]]:
    """Neighbours of a parsed expression (expr.parse) and the ids it excludes: an image id alone
    is `similar`; anything else is the normalised weighted sum, its ids and files left out."""
    from . import expr

    options = {"ef_search": ef_search, "exact": exact, "under": under}
    if expr.is_single_id(terms):
        return similar(conn, terms[0].ref, k, **options), [terms[0].ref]
    vector, exclude = expr.evaluate(conn, terms, embed_file)
    return similar_to(conn, vector, k, exclude=exclude, **options), exclude


def ids_of_paths(conn: psycopg.Connection, paths: Sequence[Path | str]) -> list[int]:
    """Ids of the rows stored under these (absolute) paths, if any."""
    if not paths:
        return []
    rows = conn.execute("SELECT id FROM images WHERE path = ANY(%s::text[])",
                        [[str(p) for p in paths]]).fetchall()
    return [r[0] for r in rows]


def absolute(path: str | Path) -> Path:
    """Absolute and normalised, symlinks kept: the form in which paths are stored.

    InvalidInput for a path that is not valid UTF-8: no stored path can be such a one.
    """
    from .output import check_utf8

    return Path(os.path.abspath(os.path.expanduser(check_utf8(str(path)))))


def under_prefix(directory: str | Path) -> str:
    """The path prefix of the files under `directory` (absolute, with a trailing separator)."""
    prefix = str(absolute(directory))
    return prefix if prefix.endswith(os.sep) else prefix + os.sep


def check_args(k: int, ef_search: int | None = None) -> int | None:
    """Validate k and ef_search (before any slow work); returns the ef_search to pass (None: the
    database's own, `vecsearch db recall --tune`, else limits.DEFAULT_EF_SEARCH)."""
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K}, not {k}")
    return None if ef_search is None else check_ef_search(ef_search)


def check_ef_search(ef_search: int) -> int:
    """`ef_search` if hnsw.ef_search accepts it, else InvalidInput (before any slow work)."""
    if not 1 <= ef_search <= MAX_EF_SEARCH:
        raise InvalidInput(f"ef-search must be between 1 and {MAX_EF_SEARCH}, not {ef_search}")
    return ef_search


def rows(neighbours: Sequence[Neighbour]) -> list[dict[str, Any]]:
    """Neighbours as output rows with COLUMNS (for output.render and JSON APIs)."""
    return [{"rank": rank, "id": n.id, "similarity": n.similarity, "path": n.path}
            for rank, n in enumerate(neighbours, 1)]


def _params(k: int, ef_search: int | None, under: str | Path | None) -> dict[str, Any]:
    return {"ef_search": check_args(k, ef_search),
            "under": under_prefix(under) if under is not None else None}


def _as_vector(vector: Any) -> Any:
    from pgvector import Vector  # no numpy import: pgvector checks sys.modules for it

    if not isinstance(vector, Vector):
        is_array = type(vector).__module__ == "numpy"
        vector = Vector(vector.ravel() if is_array else [float(x) for x in vector])
    if vector.dimensions() != db.DIM:
        raise InvalidInput(f"the query vector has {vector.dimensions()} dimensions, the database "
                           f"stores {db.DIM}")
    return vector


def _explain_empty(conn: psycopg.Connection, *, image_id: int | None = None,
                   under: str | Path | None = None) -> None:
    """No rows came back: raise the error that says why, or return if there simply are none."""
    has_images, has_id = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM images), EXISTS (SELECT 1 FROM images WHERE id = %s::bigint)",
        [image_id if image_id is not None else -1]).fetchone()
    if not has_images:
        raise NotFound("the database has no images: run `vecsearch load DIR` first")
    if image_id is not None and not has_id:
        raise NotFound(f"no image with id {image_id}: ids are listed by `vecsearch db psql -c "
                       "'SELECT id, path FROM images'`")
    if under is not None:
        raise NotFound(f"no other images under {under_prefix(under)}")
