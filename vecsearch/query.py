"""Neighbour queries: the k images nearest to an image id or to any vector.

Both call the SQL functions `vecsearch_similar` and `vecsearch_similar_to` (wrappers over
`vecsearch_nearest`, the one neighbour query: the newest migration defining it is its reference),
so the CLI, the web app and an analyst in psql get the same answers: graph candidates re-ranked by
the exact full-precision distance, iterative index scans under filters, an exact scan when the
index cannot supply k rows. Arguments are checked by limits.check_query, paths by vecsearch.paths.

This is the `vecsearch similar` path: psycopg only. A query by id sends no vector at all (the
database reads the query vector itself); numpy and torch are never imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from . import db, models
from .errors import InvalidInput, NotFound
from .limits import check_query
from .paths import absolute, under_prefix

COLUMNS = ("rank", "id", "similarity", "path")


@dataclass(frozen=True)
class Neighbour:
    id: int
    path: str
    distance: float  # cosine distance, 0 (same direction) .. 2

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance


MAX_CAMERA = 128  # the longest camera text a row can hold (migration 0009)


@dataclass(frozen=True)
class Filters:
    """The photo-metadata filters of a neighbour query (migration 0009), None where not given:
    taken_at >= taken_after and < taken_before (the camera's local time), camera a
    case-insensitive substring of make and model. Rows without those values never pass."""

    taken_after: datetime | None = None
    taken_before: datetime | None = None
    camera: str | None = None

    def __post_init__(self) -> None:
        if self.taken_after and self.taken_before and self.taken_after >= self.taken_before:
            raise InvalidInput(f"--taken-after {self.taken_after.isoformat(' ')} is not before "
                               f"--taken-before {self.taken_before.isoformat(' ')}: no photo is both")
        if self.camera is not None and not 0 < len(self.camera.strip()) <= MAX_CAMERA:
            raise InvalidInput(f"--camera must be 1 to {MAX_CAMERA} characters (part of a camera's make "
                               "or model, e.g. 'canon' or 'iphone 15')")

    def sql(self) -> list[Any]:
        """The values of the SQL functions' taken_after, taken_before and camera arguments."""
        return [self.taken_after, self.taken_before, None if self.camera is None else self.camera.strip()]

    def describe(self) -> str:
        said = [f"taken after {self.taken_after.isoformat(' ')}" if self.taken_after else "",
                f"taken before {self.taken_before.isoformat(' ')}" if self.taken_before else "",
                f"by a camera matching {self.camera!r}" if self.camera else ""]
        return ", ".join(s for s in said if s)


NO_FILTERS = Filters()


def parse_when(text: str, option: str = "--taken-after") -> datetime:
    """An ISO date or date-time (2024-01-01, 2024-01-01T18:30, 2024-01-01 18:30:00) as the local
    time taken_at is compared with; InvalidInput naming `option` otherwise."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{option} {text!r} is not a date: give YYYY-MM-DD or "
                           "YYYY-MM-DDTHH:MM[:SS]") from None
    if when.tzinfo is not None:
        raise InvalidInput(f"{option} {text!r} has a UTC offset: give the local time the camera showed "
                           "(taken_at is compared as it was recorded), without one")
    return when


def similar(conn: psycopg.Connection, image_id: int, k: int = 10, *, ef_search: int | None = None,
            exact: bool = False, under: str | Path | None = None, taken_after: datetime | None = None,
            taken_before: datetime | None = None, camera: str | None = None) -> list[Neighbour]:
    """The k images nearest to image `image_id` by cosine distance, itself excluded; `under`,
    `taken_after`, `taken_before`, `camera`: only images that pass those filters (Filters)."""
    params = _params(k, ef_search, under)
    filters = Filters(taken_after, taken_before, camera)
    rows = conn.execute(
        "SELECT id, path, distance FROM vecsearch_similar(%s::bigint, k => %s::integer, "
        "ef_search => %s::integer, under => %s::text, exact => %s::boolean, "
        "taken_after => %s::timestamp, taken_before => %s::timestamp, camera => %s::text)",
        [image_id, k, params["ef_search"], params["under"], exact, *filters.sql()],
    ).fetchall()
    if not rows:
        _explain_empty(conn, image_id=image_id, under=under, filters=filters)
    return [Neighbour(*row) for row in rows]


def similar_to(conn: psycopg.Connection, vector: Any, k: int = 10, *, exclude: Sequence[int] = (),
               ef_search: int | None = None, exact: bool = False, under: str | Path | None = None,
               taken_after: datetime | None = None, taken_before: datetime | None = None,
               camera: str | None = None) -> list[Neighbour]:
    """The k images nearest to `vector` (floats, numpy array or pgvector Vector), `exclude` left
    out; filters as `similar`."""
    params = _params(k, ef_search, under)
    filters = Filters(taken_after, taken_before, camera)
    try:
        rows = conn.execute(
            "SELECT id, path, distance FROM vecsearch_similar_to(%s::vector, k => %s::integer, "
            "ef_search => %s::integer, under => %s::text, exact => %s::boolean, "
            "exclude => %s::bigint[], taken_after => %s::timestamp, taken_before => %s::timestamp, "
            "camera => %s::text)",
            [_as_vector(vector), k, params["ef_search"], params["under"], exact,
             [int(i) for i in exclude], *filters.sql()],
        ).fetchall()
    except psycopg.errors.DataException as e:  # e.g. a vector with NaN
        raise InvalidInput(f"invalid query vector: {e.diag.message_primary or e}") from e
    if not rows:
        _explain_empty(conn, under=under, filters=filters)
    return [Neighbour(*row) for row in rows]


def search_image(connect: Callable[[], AbstractContextManager[psycopg.Connection]],
                 decode: Callable[[], Any], k: int = 10, *, embed_images: models.EmbedImages,
                 exclude_paths: Sequence[Path] = (), ef_search: int | None = None,
                 exact: bool = False, under: str | Path | None = None,
                 taken_after: datetime | None = None, taken_before: datetime | None = None,
                 camera: str | None = None) -> list[Neighbour]:
    """Neighbours of an image, embedded with the model the database records: the one search by
    image, behind `vecsearch search FILE` and the gallery's upload.

    Arguments are checked, then the model record read, before `decode()` (images.open_image's
    image) and the network run; no connection from `connect` is held while they run, so a web
    app's pool serves other pages meanwhile. Rows stored under `exclude_paths` are left out.
    """
    check_query(k, ef_search)  # fail on bad arguments before loading a model
    Filters(taken_after, taken_before, camera)
    with connect() as conn:
        record = models.require_recorded(conn)
    vector = embed_images(record, [decode()])[0]
    with connect() as conn:
        return similar_to(conn, vector, k, exclude=ids_of_paths(conn, exclude_paths),
                          ef_search=ef_search, exact=exact, under=under, taken_after=taken_after,
                          taken_before=taken_before, camera=camera)


def search_file(conn: psycopg.Connection, path: str | Path, k: int = 10, *, weights: str | None = None,
                embedder: Any = None, device: str = "auto", precision: str = "auto",
                home: Path | None = None, **options: Any) -> list[Neighbour]:
    """Neighbours of an image file (search_image; `options` are its query options).

    `embedder`: an embed.Embedder to use (it must be the recorded model), else this process's
    cached one is built (`weights`: the weights file, for a database loaded with one; `device`,
    `precision`, `home`: its engine, embed.Embedder's). A row for the very same file (same
    absolute path) is left out: the query never finds itself.
    """
    from .embed import recorded_model_embedder
    from .images import open_image

    file = absolute(path)
    embed_images = recorded_model_embedder(weights, embedder=embedder, device=device,
                                           precision=precision, home=home)

    check_query(k, options.get("ef_search"))
    if not file.is_file():
        raise NotFound(f"no such image file: {file}")
    return search_image(lambda: nullcontext(conn), lambda: open_image(file), k, embed_images=embed_images,
                        exclude_paths=[file], **options)


def ids_of_paths(conn: psycopg.Connection, paths: Sequence[Path | str]) -> list[int]:
    """Ids of the rows stored under these (absolute) paths, if any."""
    if not paths:
        return []
    rows = conn.execute("SELECT id FROM images WHERE path = ANY(%s::text[])",
                        [[str(p) for p in paths]]).fetchall()
    return [r[0] for r in rows]


def rows(neighbours: Sequence[Neighbour]) -> list[dict[str, Any]]:
    """Neighbours as output rows with COLUMNS (for output.render and JSON APIs)."""
    return [{"rank": rank, "id": n.id, "similarity": n.similarity, "path": n.path}
            for rank, n in enumerate(neighbours, 1)]


def _params(k: int, ef_search: int | None, under: str | Path | None) -> dict[str, Any]:
    return {"ef_search": check_query(k, ef_search),
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
                   under: str | Path | None = None, filters: Filters = NO_FILTERS) -> None:
    """No rows came back: raise the error that says why, or return if there simply are none."""
    has_images, has_id = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM images), EXISTS (SELECT 1 FROM images WHERE id = %s::bigint)",
        [image_id if image_id is not None else -1]).fetchone()
    if not has_images:
        raise NotFound("the database has no images: run `vecsearch load DIR` first")
    if image_id is not None and not has_id:
        raise NotFound(f"no image with id {image_id}: ids are listed by `vecsearch db psql -c "
                       "'SELECT id, path FROM images'`")
    if filters != NO_FILTERS:
        where = f" under {under_prefix(under)}" if under is not None else ""
        raise NotFound(f"no other images{where} {filters.describe()}")
    if under is not None:
        raise NotFound(f"no other images under {under_prefix(under)}")
