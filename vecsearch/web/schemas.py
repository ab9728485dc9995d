"""The web API's JSON shapes (they are also its OpenAPI schema), made from library results."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from ..query import Neighbour


class ImageInfo(BaseModel):
    id: int
    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    mtime: datetime
    loaded_at: datetime
    page_url: str
    thumb_url: str
    preview_url: str
    original_url: str


class ImagePage(BaseModel):
    total: int
    page: int
    per_page: int
    pages: int
    path_contains: str | None
    images: list[ImageInfo]


class NeighbourOut(BaseModel):
    rank: int
    id: int
    path: str
    distance: float
    similarity: float
    page_url: str
    thumb_url: str


class SimilarOut(BaseModel):
    query: dict[str, Any]
    k: int
    results: list[NeighbourOut]


class ErrorOut(BaseModel):
    error: str
    status: int


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Invalid input (the message says what to change)"},
    404: {"model": ErrorOut, "description": "No such image or page"},
    413: {"model": ErrorOut, "description": "Upload over the size limit"},
    503: {"model": ErrorOut, "description": "Database or model weights unavailable"},
}


def urls(image_id: int) -> dict[str, str]:
    return {"page_url": f"/images/{image_id}", "thumb_url": f"/media/{image_id}/thumb",
            "preview_url": f"/media/{image_id}/preview", "original_url": f"/media/{image_id}/original"}


def image_info(row: dict[str, Any]) -> ImageInfo:
    return ImageInfo(**row, **urls(row["id"]))


def neighbour_list(neighbours: Sequence[Neighbour]) -> list[NeighbourOut]:
    out = []
    for rank, n in enumerate(neighbours, 1):
        links = urls(n.id)
        out.append(NeighbourOut(rank=rank, id=n.id, path=n.path, distance=float(n.distance),
                                similarity=float(n.similarity), page_url=links["page_url"],
                                thumb_url=links["thumb_url"]))
    return out
