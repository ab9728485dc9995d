"""The gallery's duplicate review (/duplicates) and its JSON API (/api/duplicates): the groups of
`vecsearch dupes`, paged, with the proposed keepers to accept or change; decisions go to the
database (vecsearch/decisions.py).

A search over the whole table (dupes.find_duplicates) takes seconds to minutes, far longer than
a page view, so it runs once per search (threshold, --under, k, ef_search) in a background
thread and its groups are kept while the images table is unchanged (row count, highest id,
latest load). A page view then costs one query for the table's fingerprint and one joining the
groups' files to the decisions; the page shows progress meanwhile (the API answers 202). The
gallery never deletes or moves a file: `vecsearch dupes --decisions --move-to DIR` writes a
script for that.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

import psycopg
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from .. import db, decisions, dupes
from ..errors import InvalidInput
from ..limits import DEFAULT_K, MAX_EF_SEARCH, MAX_K
from .guard import not_cross_site, same_origin_only
from .schemas import (
    ERRORS,
    DecisionsIn,
    DecisionsOut,
    DupeGroupOut,
    DupeMemberOut,
    DupesComputingOut,
    DupesPageOut,
    urls,
)

log = logging.getLogger("vecsearch.web")

PER_PAGE = 20
MAX_PER_PAGE = 100
CACHED_SEARCHES = 4
# A page view waits this long for a search before showing its progress instead (and reloading):
# under a second, so no answer of the page takes longer (docs/benchmarks.md, the duplicate review).
WAIT_S = 0.8

# The search settings, shared by the page and the API (module level: annotations are resolved by name).
Threshold = Annotated[float, Query(ge=0, lt=2, description=(
    "Cosine distance under which images are near-duplicates (as `vecsearch dupes --threshold`)."))]
Under = Annotated[str | None, Query(max_length=1000, pattern="^[^\x00]*$",
                                    description="Only images under this folder.")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours asked per image.")]
EfSearch = Annotated[int, Query(ge=1, le=MAX_EF_SEARCH, description="The index's search breadth.")]
PageNo = Annotated[int, Query(alias="page", ge=1, le=10**9)]
PerPage = Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="Groups per page.")]


@dataclass
class Search:
    """One search's groups (or its progress, or its error), for one state of the images table."""

    fingerprint: tuple
    done: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, int] = (0, 0)
    result: dupes.DupesResult | None = None
    by_key: dict[str, dupes.Group] = field(default_factory=dict)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)


class SearchCache:
    """The most recent searches, each computed once in a thread of its own."""

    def __init__(self, url) -> None:
        self.url = url  # () -> the database URL now
        self.lock = threading.Lock()
        self.searches: OrderedDict[tuple, Search] = OrderedDict()

    def get(self, key: tuple, fingerprint: tuple) -> Search:
        with self.lock:
            search = self.searches.get(key)
            if search is None or (search.fingerprint != fingerprint and search.done.is_set()):
                search = Search(fingerprint)
                self.searches[key] = search
                threading.Thread(target=self._run, args=(key, search), daemon=True,
                                 name="vecsearch-web-dupes").start()
            self.searches.move_to_end(key)
            while len(self.searches) > CACHED_SEARCHES:
                self.searches.popitem(last=False)
            return search

    def latest(self, key: tuple) -> Search | None:
        with self.lock:
            return self.searches.get(key)

    def _run(self, key: tuple, search: Search) -> None:
        threshold, under, k, ef_search = key

        def progress(done: int, total: int) -> None:
            search.progress = (done, total)

        try:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                db.register_vector(conn)
                result = dupes.find_duplicates(conn, threshold, under=under, k=k, ef_search=ef_search,
                                               jobs=2, progress=progress)
            search.by_key = {decisions.group_key(g): g for g in result.groups}
            search.result = result
        except Exception as e:  # shown on the page; the traceback goes to the log
            log.exception("duplicate search failed")
            search.error = str(e) if isinstance(e, InvalidInput) else f"the duplicate search failed: {e}"
        finally:
            search.done.set()


def fingerprint(conn: psycopg.Connection) -> tuple:
    """What changes when the images table does: rows, the highest id, the latest load."""
    return tuple(conn.execute("SELECT count(*), max(id), max(loaded_at) FROM images").fetchone())


@dataclass(frozen=True)
class GroupView:
    key: str
    keeper: int
    members: list[dupes.Member]
    earlier: dict[int, str]  # member id -> its role in an earlier decision


def page_data(conn: psycopg.Connection, search: Search, page_no: int, per_page: int) -> dict[str, Any]:
    """The pending groups of one page, their proposed keepers, and the counts above them."""
    seen = decisions.review(conn, search.result.groups)
    pending = seen.pending
    pages = max(1, math.ceil(len(pending) / per_page))
    shown = []
    for g in pending[(page_no - 1) * per_page: page_no * per_page]:
        earlier = {m.id: seen.earlier[(m.sha256, m.path)] for m in g.members
                   if (m.sha256, m.path) in seen.earlier}
        shown.append(GroupView(decisions.group_key(g), decisions.proposed_keeper(g, seen.earlier).id,
                               g.members, earlier))
    return {"pending": len(pending), "settled": seen.settled, "images": search.result.images,
            "groups": shown, "page": page_no, "pages": pages, "per_page": per_page,
            "first": (page_no - 1) * per_page}


def store(conn: psycopg.Connection, search: Search, threshold: float, selected: Sequence[str] | None,
          picks: Mapping[str, int], distinct: Collection[str] = ()) -> tuple[int, list[str]]:
    """Store decisions on one search's groups: every pending group (`selected` None) or the
    groups `selected` names; each keeps `picks[key]`, else its proposed keeper, or is "not
    duplicates" if its key is in `distinct`. Returns (groups stored, the selected keys this search
    does not have: groups changed since they were shown)."""
    if selected is None:
        seen = decisions.review(conn, search.result.groups)
        targets = [(decisions.group_key(g), g) for g in seen.pending]
        stale: list[str] = []
    else:
        wanted = list(dict.fromkeys(selected))
        targets = [(key, search.by_key[key]) for key in wanted if key in search.by_key]
        stale = [key for key in wanted if key not in search.by_key]
        seen = decisions.review(conn, [g for _, g in targets])
    choices = [(g, None if key in distinct else
                picks[key] if key in picks else decisions.proposed_keeper(g, seen.earlier).id)
               for key, g in targets]
    return decisions.decide(conn, choices, threshold), stale


def add_pages(app: FastAPI, state, templates: Jinja2Templates) -> None:
    """GET /duplicates (the review) and POST /duplicates (store decisions, then back to it); the
    same as JSON: GET /api/duplicates and POST /api/duplicates/decisions."""
    cache = SearchCache(state.url)

    def search_key(threshold: float, under: str | None, k: int, ef_search: int) -> tuple:
        return (threshold, under or None, k, ef_search)

    def finished(key: tuple) -> Search:
        """The search of `key` for the table as it is now, started if need be; not done yet if it
        took longer than WAIT_S."""
        with state.connection() as conn:
            search = cache.get(key, fingerprint(conn))
        if search.done.wait(WAIT_S) and search.error:
            raise InvalidInput(search.error)
        return search

    @app.get("/duplicates", response_class=HTMLResponse, include_in_schema=False)
    def duplicates_page(
            request: Request, threshold: Threshold = dupes.DEFAULT_THRESHOLD, under: Under = None,
            k: K = DEFAULT_K, ef_search: EfSearch = dupes.EF_SEARCH, page_no: PageNo = 1,
            per_page: PerPage = PER_PAGE,
            stored: Annotated[int | None, Query(ge=0)] = None,
            stale: Annotated[int | None, Query(ge=0)] = None):
        params = {"threshold": threshold, "k": k, "ef_search": ef_search, "per_page": per_page}
        if under:
            params["under"] = under
        search = finished(search_key(threshold, under, k, ef_search))
        if not search.done.is_set():
            return templates.TemplateResponse(request, "duplicates.html", {
                "computing": True, "progress": search.progress, "params": params,
                "elapsed": time.monotonic() - search.started, "rule": dupes.KEEPER_RULE})
        with state.connection() as conn:
            data = page_data(conn, search, page_no, per_page)
        return templates.TemplateResponse(request, "duplicates.html", {
            "computing": False, "data": data, "params": params, "rule": dupes.KEEPER_RULE,
            "stored": stored, "stale": stale, "query": urlencode(params),
            "seconds": search.result.seconds})

    @app.post("/duplicates", include_in_schema=False)
    async def duplicates_decide(request: Request):
        same_origin_only(request)  # a page elsewhere cannot post decisions in the user's name
        form = await request.form()
        return await run_in_threadpool(_decide, form)

    def _decide(form) -> RedirectResponse:
        try:
            threshold = float(form.get("threshold", ""))
            k, ef_search = int(form.get("k", "")), int(form.get("ef_search", ""))
            per_page = int(form.get("per_page", PER_PAGE))
        except ValueError as e:
            raise InvalidInput("the review form lost its search settings: reload /duplicates") from e
        under = form.get("under") or None
        action = form.get("action")
        if action not in ("all", "selected", "distinct"):
            raise InvalidInput("choose what to do: accept all, accept the selected, or not duplicates")
        search = cache.latest(search_key(threshold, under, k, ef_search))
        if search is None or search.result is None:
            raise InvalidInput("this duplicate search is no longer in memory: reload /duplicates")
        picks = {name[5:]: int(value) for name, value in form.multi_items()
                 if name.startswith("keep_") and value.isdigit()}
        selected = None if action == "all" else form.getlist("group")
        with state.connection() as conn:
            stored, stale = store(conn, search, threshold, selected, picks,
                                  distinct=selected if action == "distinct" else ())
        params = {"threshold": threshold, "k": k, "ef_search": ef_search, "per_page": per_page,
                  "stored": stored}
        if under:
            params["under"] = under
        if stale:
            params["stale"] = len(stale)
        return RedirectResponse(f"/duplicates?{urlencode(params)}", status_code=303)

    @app.get("/api/duplicates", response_model=DupesPageOut, tags=["duplicates"],
             summary="Duplicate groups to review", responses={
                 **ERRORS, 202: {"model": DupesComputingOut,
                                 "description": "The search is still running: ask again (Retry-After)"}})
    def api_duplicates(threshold: Threshold = dupes.DEFAULT_THRESHOLD, under: Under = None,
                       k: K = DEFAULT_K, ef_search: EfSearch = dupes.EF_SEARCH, page_no: PageNo = 1,
                       per_page: PerPage = PER_PAGE):
        """The groups of `vecsearch dupes` that no decision settles yet, a page at a time, each with
        its proposed keeper. The first request of a search starts it (in the background, kept
        while the images table is unchanged) and answers 202 with its progress until it is done."""
        search = finished(search_key(threshold, under, k, ef_search))
        if not search.done.is_set():
            done, total = search.progress
            body = DupesComputingOut(searched=done, total=total,
                                     elapsed_s=round(time.monotonic() - search.started, 1))
            return JSONResponse(body.model_dump(), status_code=202, headers={"retry-after": "2"})
        with state.connection() as conn:
            data = page_data(conn, search, page_no, per_page)
        groups = [DupeGroupOut(key=g.key, proposed_keeper=g.keeper, members=[
            DupeMemberOut(id=m.id, path=m.path, sha256=m.sha256, width=m.width, height=m.height,
                          bytes=m.bytes, format=m.format, mtime=m.mtime, distance=m.distance,
                          similarity=1 - m.distance, earlier=g.earlier.get(m.id),
                          page_url=urls(m.id)["page_url"], thumb_url=urls(m.id)["thumb_url"])
            for m in g.members]) for g in data["groups"]]
        return DupesPageOut(threshold=threshold, under=under or None, k=k, ef_search=ef_search,
                            keeper_rule=dupes.KEEPER_RULE, images=data["images"],
                            seconds=round(search.result.seconds, 3), pending=data["pending"],
                            settled=data["settled"], page=page_no, per_page=per_page,
                            pages=data["pages"], groups=groups)

    @app.post("/api/duplicates/decisions", response_model=DecisionsOut, tags=["duplicates"],
              summary="Store duplicate decisions",
              responses={**ERRORS, 403: ERRORS[400] | {"description": "Sent by a page of another site"},
                         409: ERRORS[400] | {"description": "The search is still running"}})
    def api_decide(request: Request, body: DecisionsIn) -> DecisionsOut:
        """Settle groups of one search (the settings GET /api/duplicates was given): `all` accepts
        the proposed keeper of every pending group; `groups` names groups by key, each keeping its
        proposed keeper, the image `keep`, or none (`distinct`: not duplicates). Stored in the
        database (vecsearch_dupe_decisions); no file is moved or deleted."""
        not_cross_site(request)
        if not body.all and not body.groups:
            raise InvalidInput("nothing to decide: give `groups` (by key) or `all`: true")
        if bad := [c.group for c in body.groups if c.distinct and c.keep is not None]:
            raise InvalidInput(f"group {bad[0]}: give either `keep` or `distinct`, not both")
        key = search_key(body.threshold, body.under, body.k, body.ef_search)
        search = cache.latest(key)
        if search is None or search.result is None:
            search = finished(key)
            if not search.done.is_set():
                raise HTTPException(409, "this duplicate search is still running: GET /api/duplicates "
                                         "with the same settings until it answers 200, then post",
                                    headers={"retry-after": "2"})
        picks = {c.group: c.keep for c in body.groups if c.keep is not None}
        distinct = {c.group for c in body.groups if c.distinct}
        with state.connection() as conn:
            stored, stale = store(conn, search, body.threshold,
                                  None if body.all else [c.group for c in body.groups], picks, distinct)
            pending = len(decisions.review(conn, search.result.groups).pending)
        return DecisionsOut(stored=stored, stale=stale, pending=pending)
