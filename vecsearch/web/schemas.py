"""The web API's JSON shapes (they are also its OpenAPI schema), made from library results."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from .. import query
from ..dupes import DEFAULT_THRESHOLD, EF_SEARCH
from ..limits import DEFAULT_K, MAX_EF_SEARCH, MAX_K
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
    # Photo metadata (EXIF; migration 0009), null where the file has none: taken_at is the camera's
    # local time, taken_offset its UTC offset ("+02:00") where recorded.
    taken_at: datetime | None = None
    taken_offset: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_latitude: float | None = None
    gps_longitude: float | None = None
    orientation: int | None = None
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
    offset = row.get("taken_offset")
    return ImageInfo(**{**row, "taken_offset": None if offset is None else utc_offset(offset)},
                     **urls(row["id"]))


def utc_offset(offset: timedelta) -> str:
    """A UTC offset as EXIF writes it: +02:00, -05:30."""
    minutes = round(offset.total_seconds() / 60)
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def neighbour_list(neighbours: Sequence[Neighbour]) -> list[NeighbourOut]:
    """query.rows (the CLI's rows: rank, id, similarity, path), with the distance and links."""
    return [NeighbourOut(**row, distance=float(n.distance), page_url=urls(n.id)["page_url"],
                         thumb_url=urls(n.id)["thumb_url"])
            for n, row in zip(neighbours, query.rows(neighbours), strict=True)]


class DupeMemberOut(BaseModel):
    id: int
    path: str
    sha256: str
    width: int
    height: int
    bytes: int
    format: str
    mtime: datetime | None
    distance: float = Field(description="Cosine distance to the group's first image (the rule's keeper).")
    similarity: float
    earlier: str | None = Field(description="Its role in an earlier decision (keep, dupe, distinct), "
                                            "for a settled file in a group that gained a new one.")
    page_url: str
    thumb_url: str


class DupeGroupOut(BaseModel):
    key: str = Field(description="The group's name in POST /api/duplicates/decisions (from its files' "
                                 "content and paths).")
    proposed_keeper: int = Field(description="The image id proposed to keep: an earlier decision's "
                                             "keeper, else the rule's (keeper_rule).")
    members: list[DupeMemberOut]


class DupesPageOut(BaseModel):
    status: Literal["done"] = "done"
    threshold: float
    under: str | None
    k: int
    ef_search: int
    keeper_rule: str
    images: int = Field(description="Images searched.")
    seconds: float = Field(description="How long the search took (it is kept while the table is unchanged).")
    pending: int = Field(description="Groups with no decision yet.")
    settled: int
    page: int
    per_page: int
    pages: int
    groups: list[DupeGroupOut]


class DupesComputingOut(BaseModel):
    status: Literal["computing"] = "computing"
    searched: int
    total: int
    elapsed_s: float


class DupeChoice(BaseModel):
    group: str = Field(max_length=64, description="A group's key, from GET /api/duplicates.")
    keep: int | None = Field(None, ge=1, description="The image to keep (the others are its "
                                                      "duplicates); omitted: the proposed keeper.")
    distinct: bool = Field(False, description="True: not duplicates (no keeper).")


class DecisionsIn(BaseModel):
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0, lt=2)
    under: str | None = Field(None, max_length=1000, pattern="^[^\x00]*$")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    ef_search: int = Field(EF_SEARCH, ge=1, le=MAX_EF_SEARCH)
    all: bool = Field(False, description="Accept the proposed keeper of every pending group "
                                         "(`groups` may still choose others, or `distinct`).")
    groups: list[DupeChoice] = Field(default_factory=list, max_length=100_000)


class DecisionsOut(BaseModel):
    stored: int = Field(description="Groups whose decision was stored.")
    stale: list[str] = Field(description="Keys not in this search (the group changed since it was "
                                         "shown): nothing stored for them, review them again.")
    pending: int = Field(description="Groups still without a decision.")
