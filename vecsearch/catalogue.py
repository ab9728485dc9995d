"""The images table as a catalogue: count, page through and look up images (metadata, no vectors).

The web gallery's browse pages and API, and `vecsearch similar`'s table title, read it here.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from .errors import NotFound

PER_PAGE = 48
MAX_PER_PAGE = 200
COLUMNS = ("id, path, sha256, bytes, width, height, format, mtime, loaded_at, taken_at, taken_offset, "
           "camera_make, camera_model, lens, gps_latitude, gps_longitude, orientation")


def _contains_clause(contains: str | None) -> tuple[str, list[str]]:
    if not contains:
        return "", []
    escaped = contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "WHERE path ILIKE '%%' || %s || '%%'", [escaped]


def count_images(conn: psycopg.Connection, contains: str | None = None) -> int:
    """How many images there are, or how many whose path contains `contains` (any case)."""
    where, params = _contains_clause(contains)
    return conn.execute(f"SELECT count(*) FROM images {where}", params).fetchone()[0]


def list_images(conn: psycopg.Connection, contains: str | None = None, *, limit: int = PER_PAGE,
                offset: int = 0) -> list[dict[str, Any]]:
    """One page of images in id order (load order), optionally filtered by path substring."""
    where, params = _contains_clause(contains)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"SELECT {COLUMNS} FROM images {where} ORDER BY id LIMIT %s OFFSET %s",
                           [*params, limit, offset]).fetchall()


def get_image(conn: psycopg.Connection, image_id: int) -> dict[str, Any]:
    """The metadata row of one image; NotFound if there is no such id."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {COLUMNS} FROM images WHERE id = %s", [image_id]).fetchone()
    if row is None:
        raise NotFound(f"no image with id {image_id}")
    return row
