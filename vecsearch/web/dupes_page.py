"""The gallery's duplicate review (/duplicates): the groups of `vecsearch dupes`, paged, with the
proposed keepers to accept or change; decisions go to the database (vecsearch/decisions.py).

A search over the whole table (dupes.find_duplicates) takes seconds to minutes, far longer than
a page view, so it runs once per search (threshold, --under, k, ef_search) in a background
thread and its groups are kept while the images table is unchanged (row count, highest id,
latest load). A page view then costs one query for the table's fingerprint and one joining the
groups' files to the decisions; the page shows progress meanwhile. The gallery never deletes or
moves a file: `vecsearch dupes --decisions --move-to DIR` writes a script for that.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

import psycopg
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from .. import db, decisions, dupes
from ..errors import InvalidInput
from ..limits import DEFAULT_K, MAX_EF_SEARCH, MAX_K
from .guard import same_origin_only

log = logging.getLogger("vecsearch.web")

PER_PAGE = 20
MAX_PER_PAGE = 100
CACHED_SEARCHES = 4
WAIT_S = 3.0  # a page view waits this long for a search before showing its progress instead


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


def add_pages(app: FastAPI, state, templates: Jinja2Templates) -> None:
    """GET /duplicates (the review) and POST /duplicates (store decisions, then back to it)."""
    cache = SearchCache(state._url)

    def search_key(threshold: float, under: str | None, k: int, ef_search: int) -> tuple:
        return (threshold, under or None, k, ef_search)

    @app.get("/duplicates", response_class=HTMLResponse, include_in_schema=False)
    def duplicates_page(
            request: Request,
            threshold: Annotated[float, Query(ge=0, lt=2)] = dupes.DEFAULT_THRESHOLD,
            under: Annotated[str | None, Query(max_length=1000, pattern="^[^\x00]*$")] = None,
            k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
            ef_search: Annotated[int, Query(ge=1, le=MAX_EF_SEARCH)] = dupes.EF_SEARCH,
            page_no: Annotated[int, Query(alias="page", ge=1, le=10**9)] = 1,
            per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = PER_PAGE,
            stored: Annotated[int | None, Query(ge=0)] = None,
            stale: Annotated[int | None, Query(ge=0)] = None):
        key = search_key(threshold, under, k, ef_search)
        params = {"threshold": threshold, "k": k, "ef_search": ef_search, "per_page": per_page}
        if under:
            params["under"] = under
        with state.connection() as conn:
            search = cache.get(key, fingerprint(conn))
        if not search.done.wait(WAIT_S):
            return templates.TemplateResponse(request, "duplicates.html", {
                "computing": True, "progress": search.progress, "params": params,
                "elapsed": time.monotonic() - search.started, "rule": dupes.KEEPER_RULE})
        if search.error:
            raise InvalidInput(search.error)
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
        picks = {name[5:]: value for name, value in form.multi_items() if name.startswith("keep_")}
        selected = form.getlist("group")
        with state.connection() as conn:
            if action == "all":
                seen = decisions.review(conn, search.result.groups)
                targets = [(decisions.group_key(g), g) for g in seen.pending]
                earlier = seen.earlier
            else:
                targets = [(key, search.by_key[key]) for key in selected if key in search.by_key]
                earlier = decisions.review(conn, [g for _, g in targets]).earlier
            stale = len(selected) - len(targets) if action != "all" else 0
            choices = []
            for key, g in targets:
                if action == "distinct":
                    choices.append((g, None))
                    continue
                pick = picks.get(key)
                keep = int(pick) if pick and pick.isdigit() else decisions.proposed_keeper(g, earlier).id
                choices.append((g, keep))
            stored = decisions.decide(conn, choices, threshold)
        params = {"threshold": threshold, "k": k, "ef_search": ef_search, "per_page": per_page,
                  "stored": stored}
        if under:
            params["under"] = under
        if stale:
            params["stale"] = stale
        return RedirectResponse(f"/duplicates?{urlencode(params)}", status_code=303)
