"""`vecsearch serve`: a web gallery over the images table, and a JSON API under /api.

The pages are server-rendered (Jinja2) and call the same library functions as the CLI:
`query.similar` for an image's neighbours, `embed.Embedder` + `query.similar_to` for an uploaded
file, `expr.parse`/`expr.evaluate` for vector arithmetic.

Security model:
- binds 127.0.0.1 unless told otherwise, and then answers only to loopback Host names, so a web
  page that rebinds its DNS name to 127.0.0.1 cannot read the gallery;
- files are served by image id only, from the path stored in the images table: no URL carries a
  path, so nothing outside the index can be read (`../`, absolute and encoded paths are 404),
  and only bytes that hash to the stored sha256 are sent or thumbnailed (vecsearch/indexed.py):
  a file swapped since the load, even for a link with the same size and mtime, is 404;
- uploads are capped in size before they are parsed, and decoded by the loader's own
  decode-safe code; arithmetic terms that name server-side files are refused;
- every error is a page or JSON with one clear message; tracebacks go to the server log only.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import psycopg
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from psycopg.rows import dict_row
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, db, server, thumbs
from .config import Settings
from .errors import (
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    PgvectorMissing,
    SchemaMismatch,
    VecsearchError,
    WeightsUnavailable,
)
from .indexed import Verified
from .limits import DEFAULT_K, MAX_EF_SEARCH, WEB_DEFAULT_K, WEB_MAX_K

log = logging.getLogger("vecsearch.web")

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
POOL_TIMEOUT_S = 5  # waiting for a database connection, before a 503
PER_PAGE = 48
MAX_PER_PAGE = 200
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
        "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
# Strict for the gallery; the OpenAPI page (Swagger UI) needs its inline script and styles.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'")


# Query parameters shared by pages and API (module level: annotations are resolved by name).
K = Annotated[int, Query(ge=1, le=WEB_MAX_K, description="How many neighbours.")]
# No NUL: PostgreSQL text cannot hold one, and no stored path does.
Contains = Annotated[str | None, Query(max_length=1000, pattern="^[^\x00]*$",
                                       description="Only paths containing this (any case).")]
PageNo = Annotated[int, Query(alias="page", ge=1, le=10**9)]
# Out of range is "no such image" (404), not a database error.
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
PerPage = Annotated[int, Query(ge=1, le=MAX_PER_PAGE)]


class UploadTooLarge(InvalidInput):
    """An upload over the server's size limit."""


class Rendition(StrEnum):
    thumb = "thumb"
    preview = "preview"
    original = "original"


# -- JSON shapes (they are also the OpenAPI schema) -------------------------------------------


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


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Invalid input (the message says what to change)"},
    404: {"model": ErrorOut, "description": "No such image or page"},
    413: {"model": ErrorOut, "description": "Upload over the size limit"},
    503: {"model": ErrorOut, "description": "Database or model weights unavailable"},
}


# -- catalogue queries (browse and metadata; neighbours come from vecsearch.query) ------------

_COLUMNS = "id, path, sha256, bytes, width, height, format, mtime, loaded_at"


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
        return cur.execute(f"SELECT {_COLUMNS} FROM images {where} ORDER BY id LIMIT %s OFFSET %s",
                           [*params, limit, offset]).fetchall()


def get_image(conn: psycopg.Connection, image_id: int) -> dict[str, Any]:
    """The metadata row of one image; NotFound if there is no such id."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_COLUMNS} FROM images WHERE id = %s", [image_id]).fetchone()
    if row is None:
        raise NotFound(f"no image with id {image_id}")
    return row


def _urls(image_id: int) -> dict[str, str]:
    return {"page_url": f"/images/{image_id}", "thumb_url": f"/media/{image_id}/thumb",
            "preview_url": f"/media/{image_id}/preview", "original_url": f"/media/{image_id}/original"}


def _info(row: dict[str, Any]) -> ImageInfo:
    return ImageInfo(**row, **_urls(row["id"]))


def _neighbours(neighbours) -> list[NeighbourOut]:
    out = []
    for rank, n in enumerate(neighbours, 1):
        urls = _urls(n.id)
        out.append(NeighbourOut(rank=rank, id=n.id, path=n.path, distance=float(n.distance),
                                similarity=float(n.similarity), page_url=urls["page_url"],
                                thumb_url=urls["thumb_url"]))
    return out


# -- the model, loaded once per process on the first search ------------------------------------


class LazyModel:
    """The embedder of the model the database records, built on first use and then kept.

    One forward pass at a time: a ResNet50 forward already uses every core, and parallel ones
    would only multiply memory. If the database is re-embedded with another model while the
    server runs, the next search notices the new record and loads that model instead.
    """

    def __init__(self, weights: str | None = None):
        self.weights = weights
        self.loads = 0
        self._lock = threading.Lock()
        self._record: Any = None
        self._embedder: Any = None

    def embed_image(self, record: Any, img):
        """The vector of a decoded image, as `Embedder.embed_file` computes it for a file."""
        with self._lock:
            if self._embedder is None or record != self._record:
                from .embed import Embedder

                self._embedder = Embedder.from_record(record, weights=self.weights)
                self._record = record
                self.loads += 1
            return self._embedder.embed_images([img])[0]


def _recorded_model(conn: psycopg.Connection):
    from .models import recorded_model as read

    record = read(conn)
    if record is None:
        raise NotFound("the database has no images (and so no model) yet: load some first with "
                       "`vecsearch load DIR`")
    return record


def _refuse_files(terms) -> None:
    """Arithmetic in the web app names images by id only: a file term would read server files."""
    files = [t for t in terms if not isinstance(t.ref, int)]
    if files:
        raise InvalidInput(f"file terms such as {str(files[0].ref)!r} are not allowed in the web app: "
                           "use image ids, or search by uploading the file")


# -- app state: settings, a connection pool, the model ------------------------------------------


class State:
    def __init__(self, settings: Settings, weights: str | None, max_upload_bytes: int,
                 pool_size: int):
        self.settings = settings
        self.model = LazyModel(weights)
        self.max_upload_bytes = max_upload_bytes
        self.pool_size = pool_size
        self.pool = None
        self.pool_url: str | None = None
        self.opened = False
        self._pool_lock = threading.Lock()
        self.verified = Verified()
        # Decodes at once (thumbnails, uploads): a 90-megapixel PNG takes 270 MB to decode, and
        # a grid page asks for dozens of thumbnails in parallel.
        self.decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))

    def open(self) -> None:
        db.connect(self.settings).close()  # starts the embedded server, migrates, checks pgvector
        self.opened = True

    def close(self) -> None:
        self.opened = False
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _url(self) -> str:
        """Where the database is now. The embedded server's socket moves with its port (`db start
        --tcp --port`), so it is read from its postmaster.pid on each request (a stat and a read)."""
        if self.settings.database_url:
            return self.settings.database_url
        running = server.running(self.settings.home)
        if running is None:  # fail fast, not after the pool's timeout
            raise DatabaseUnavailable("the embedded database server is not running: start it with "
                                      "`vecsearch db start` (the gallery reconnects by itself)")
        return running.url()

    def _pool(self, fresh: bool = False):
        from psycopg_pool import ConnectionPool

        url = self._url()
        with self._pool_lock:
            if fresh or self.pool is None or self.pool_url != url:
                old, self.pool_url = self.pool, url
                self.pool = ConnectionPool(
                    url, min_size=1, max_size=self.pool_size, open=True,
                    kwargs={"autocommit": True, "connect_timeout": 10}, configure=db.register_vector,
                    check=ConnectionPool.check_connection, reset=lambda c: c.execute("RESET ALL"),
                    timeout=POOL_TIMEOUT_S, name="vecsearch-web")
                if old is not None:
                    old.close(timeout=0)
            return self.pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection for one request (never one connection shared across threads)."""
        from psycopg_pool import PoolTimeout

        if not self.opened:
            raise DatabaseUnavailable("the web app's database pool is not open")
        pool = self._pool()
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as e:
            self._pool(fresh=True)  # a pool that kept failing to reconnect starts over next time
            raise DatabaseUnavailable(f"no database connection available: {e}") from e
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(f"database connection lost: {e}") from e


# -- middleware ----------------------------------------------------------------------------------


class _UploadLimit:
    """Refuses request bodies over the limit before anything parses or spools them."""

    def __init__(self, app: ASGIApp, limit: int, respond):
        self.app, self.limit, self.respond = app, limit, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            response = self.respond(Request(scope), 413, _too_large(self.limit))
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # chunked upload without a Content-Length
                raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return (f"the upload is larger than the server's limit of {limit / (1024 * 1024):g} MB "
            "(`vecsearch serve --max-upload-mb`)")


class _LoopbackHostOnly:
    """Answers only requests whose Host is a loopback name (DNS rebinding); others get the usual
    error page or JSON, 400."""

    def __init__(self, app: ASGIApp, allowed: list[str], respond):
        self.app, self.allowed, self.respond = app, set(allowed), respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in self.allowed:
            response = self.respond(Request(scope), 400, f"invalid Host header {host[:100]!r}: this "
                                    "server answers to loopback names only (127.0.0.1, localhost)")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        docs = scope["path"].startswith("/api/docs")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [(b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"),
                            (b"x-frame-options", b"DENY")]
                headers.append((b"content-security-policy", (DOCS_CSP if docs else CSP).encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


# -- the app -------------------------------------------------------------------------------------


def allowed_hosts_for(host: str) -> list[str] | None:
    """Host names to answer to when bound to `host`: loopback names only when bound to loopback."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return [*LOOPBACK_NAMES, host]
    return None


def create_app(settings: Settings, *, weights: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, host: str = "127.0.0.1",
               pool_size: int = 4) -> FastAPI:
    """The web gallery and JSON API over the database of `settings`.

    `weights` overrides where the recorded model's weights come from ("random", a state-dict
    FILE); the model is loaded on the first search. `host` is the address the server binds:
    on a loopback address the app answers only to loopback Host names.
    """
    state = State(settings, weights, max_upload_bytes, pool_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(state.open)
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    # FastAPIOffline: the OpenAPI page's Swagger UI is served from the package, not a CDN, so
    # it works on an offline machine too.
    app = FastAPIOffline(
        title="vecsearch", version=__version__, lifespan=lifespan,
        description="Image similarity search inside PostgreSQL: browse, neighbours, search by "
                    "upload, vector arithmetic.",
        docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json",
        static_url="/api/docs-assets", swagger_ui_oauth2_redirect_url="/api/docs/oauth2-redirect",
    )
    app.state.vs = state
    _openapi_without_422(app)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(version=__version__, max_upload_bytes=max_upload_bytes,
                                 default_k=WEB_DEFAULT_K, max_k=WEB_MAX_K)
    templates.env.filters["basename"] = lambda p: os.path.basename(p)
    templates.env.filters["filesize"] = _filesize

    def respond(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        return templates.TemplateResponse(request, "error.html",
                                          {"status": status, "message": message},
                                          status_code=status)

    app.add_middleware(_UploadLimit, limit=max_upload_bytes, respond=respond)
    app.add_middleware(_SecurityHeaders)
    allowed = allowed_hosts_for(host)
    if allowed is not None:
        app.add_middleware(_LoopbackHostOnly, allowed=allowed, respond=respond)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_error_handlers(app, respond)

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # -- shared request logic (pages and API return the same data) ----------------------------

    def browse_data(q: str | None, page_no: int, per_page: int) -> ImagePage:
        with state.connection() as conn:
            total = count_images(conn, q)
            rows = list_images(conn, q, limit=per_page, offset=(page_no - 1) * per_page)
        return ImagePage(total=total, page=page_no, per_page=per_page,
                         pages=max(1, math.ceil(total / per_page)), path_contains=q or None,
                         images=[_info(r) for r in rows])

    def similar_data(image_id: int, k: int, exact: bool = False,
                     ef_search: int | None = None) -> tuple[ImageInfo, SimilarOut]:
        from .query import similar

        with state.connection() as conn:
            info = _info(get_image(conn, image_id))
            found = similar(conn, image_id, k=k, ef_search=ef_search, exact=exact)
        return info, SimilarOut(query={"id": image_id}, k=k, results=_neighbours(found))

    def upload_data(data: bytes, filename: str | None, k: int) -> tuple[SimilarOut, str | None]:
        from .query import similar_to

        if len(data) > state.max_upload_bytes:
            raise UploadTooLarge(_too_large(state.max_upload_bytes))
        if not data:
            raise InvalidInput("the uploaded file is empty: choose an image file")
        with state.connection() as conn:
            record = _recorded_model(conn)
        with state.decode_slots:
            img = decode_upload(data, filename)  # in memory: an upload never touches the disk
        vector = state.model.embed_image(record, img)
        preview = _data_uri_thumbnail(img)
        with state.connection() as conn:
            found = similar_to(conn, vector, k=k)
        query = {"filename": filename, "bytes": len(data)}
        return SimilarOut(query=query, k=k, results=_neighbours(found)), preview

    def arithmetic_data(text: str, k: int) -> SimilarOut:
        from .expr import evaluate, parse
        from .query import similar_to

        terms = parse(text)
        _refuse_files(terms)
        with state.connection() as conn:
            vector, exclude = evaluate(conn, terms, lambda path: _refuse_files(terms))
            found = similar_to(conn, vector, k=k, exclude=exclude)
        return SimilarOut(query={"expr": text, "exclude": sorted(exclude)}, k=k,
                          results=_neighbours(found))

    # -- HTML pages ---------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def browse_page(request: Request, q: Contains = None, page_no: PageNo = 1,
                    per_page: PerPage = PER_PAGE):
        data = browse_data(q, page_no, per_page)
        return page(request, "browse.html", data=data, q=q or "")

    @app.get("/images/{image_id}", response_class=HTMLResponse, include_in_schema=False)
    def image_page(request: Request, image_id: ImageId, k: K = WEB_DEFAULT_K):
        info, result = similar_data(image_id, k)
        return page(request, "image.html", image=info, result=result, k=k,
                    arith_hint=f"{image_id} + 40*0.5 - 7")

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_form(request: Request):
        return page(request, "search.html", result=None, preview=None, k=WEB_DEFAULT_K)

    @app.post("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, file: Annotated[UploadFile, File()],
                    k: Annotated[int, Form(ge=1, le=WEB_MAX_K)] = WEB_DEFAULT_K):
        try:
            result, preview = upload_data(file.file.read(state.max_upload_bytes + 1), file.filename, k)
        except (InvalidInput, NotFound) as e:  # shown above the form, to try another file
            return page(request, "search.html", result=None, preview=None, k=k, error=str(e),
                        status_code=_status_of(e))
        return page(request, "search.html", result=result, preview=preview, k=k)

    @app.get("/arithmetic", response_class=HTMLResponse, include_in_schema=False)
    def arithmetic_page(request: Request, expr: Annotated[str, Query(max_length=2000)] = "",
                        k: K = WEB_DEFAULT_K):
        try:
            result = arithmetic_data(expr, k) if expr.strip() else None
        except (InvalidInput, NotFound) as e:  # shown under the expression, to fix it
            return page(request, "arithmetic.html", expr=expr, result=None, k=k, error=str(e),
                        status_code=_status_of(e))
        return page(request, "arithmetic.html", expr=expr, result=result, k=k)

    @app.api_route("/media/{image_id}/{rendition}", methods=["GET", "HEAD"], include_in_schema=False)
    def media(image_id: ImageId, rendition: Rendition):
        with state.connection() as conn:
            row = get_image(conn, image_id)
        if rendition is Rendition.original:
            # Only bytes whose sha256 is the indexed one (see vecsearch/indexed.py).
            data = state.verified.read(row["id"], row["path"], row["sha256"], row["bytes"])
            mime = MIME.get(row["format"].upper())
            disposition = "inline" if mime else "attachment"
            name = quote(os.path.basename(row["path"]))
            return Response(data, media_type=mime or "application/octet-stream",
                            headers={"content-disposition": f"{disposition}; filename*=utf-8''{name}"})
        with state.decode_slots:
            thumb = thumbs.thumbnail(settings.home, row, thumbs.SIZES[rendition.value], state.verified)
        return FileResponse(thumb, media_type="image/jpeg",
                            headers={"cache-control": "private, max-age=86400"})

    # -- JSON API -----------------------------------------------------------------------------

    @app.get("/api/images", response_model=ImagePage, tags=["images"], summary="List images",
             responses=_ERRORS)
    def api_images(q: Contains = None, page_no: PageNo = 1, per_page: PerPage = PER_PAGE) -> ImagePage:
        """A page of images in load order, optionally only those whose path contains `q`."""
        return browse_data(q, page_no, per_page)

    @app.get("/api/images/{image_id}", response_model=ImageInfo, tags=["images"],
             summary="Image metadata", responses=_ERRORS)
    def api_image(image_id: ImageId) -> ImageInfo:
        """An image's metadata (path, size, format, dimensions, hashes) and its URLs."""
        with state.connection() as conn:
            return _info(get_image(conn, image_id))

    @app.get("/api/images/{image_id}/similar", response_model=SimilarOut, tags=["search"],
             summary="Neighbours of an image", responses=_ERRORS)
    def api_similar(image_id: ImageId, k: K = DEFAULT_K, exact: bool = False,
                    ef_search: Annotated[int | None, Query(ge=1, le=MAX_EF_SEARCH)] = None) -> SimilarOut:
        """The k nearest images to image `image_id` (itself excluded), as `vecsearch similar`."""
        return similar_data(image_id, k, exact=exact, ef_search=ef_search)[1]

    @app.post("/api/search", response_model=SimilarOut, tags=["search"],
              summary="Search by an uploaded image", responses=_ERRORS)
    def api_search(file: Annotated[UploadFile, File(description="An image file.")],
                   k: Annotated[int, Form(ge=1, le=WEB_MAX_K)] = DEFAULT_K) -> SimilarOut:
        """The k nearest images to an uploaded image file, as `vecsearch search FILE`."""
        return upload_data(file.file.read(state.max_upload_bytes + 1), file.filename, k)[0]

    @app.get("/api/arithmetic", response_model=SimilarOut, tags=["search"],
             summary="Vector arithmetic", responses=_ERRORS)
    def api_arithmetic(expr: Annotated[str, Query(min_length=1, max_length=2000, description=(
            "Weighted sum of image ids, e.g. `12 + 40*0.5 - 7`"))], k: K = DEFAULT_K) -> SimilarOut:
        """The k nearest images to a sum of weighted image vectors (query ids excluded)."""
        return arithmetic_data(expr, k)

    return app


_STATUSES = [(UploadTooLarge, 413), (NotFound, 404), (InvalidInput, 400),
             (DatabaseUnavailable, 503), (PgvectorMissing, 503), (SchemaMismatch, 409),
             (WeightsUnavailable, 503)]


def _status_of(exc: VecsearchError) -> int:
    return next((s for cls, s in _STATUSES if isinstance(exc, cls)), 500)


def _add_error_handlers(app: FastAPI, respond) -> None:
    @app.exception_handler(VecsearchError)
    async def vecsearch_error(request: Request, exc: VecsearchError) -> Response:
        return respond(request, _status_of(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404 and exc.detail == "Not Found":
            return respond(request, 404, f"no such page: {request.url.path}")
        return respond(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        # A path that does not name an image (`/media/../x`, `/images/abc`) is not found.
        if any(e.get("loc", ("",))[0] == "path" for e in errors):
            return respond(request, 404, f"no such page: {request.url.path}")
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                            for e in errors)
        return respond(request, 400, f"invalid request: {message}")

    @app.exception_handler(psycopg.OperationalError)
    async def database_error(request: Request, exc: psycopg.OperationalError) -> Response:
        log.warning("database error on %s: %s", request.url.path, exc)
        return respond(request, 503, f"database unavailable: {str(exc).strip() or type(exc).__name__}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return respond(request, 500, "internal error: the server log has the details")


def _openapi_without_422(app: FastAPI) -> None:
    """Validation errors here are 400 {error, status} (see _ERRORS), not FastAPI's 422."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _filesize(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def decode_upload(data: bytes, filename: str | None):
    """An uploaded file decoded like `vecsearch load` decodes files (same pixel limit, same
    EXIF orientation and RGB conversion); UnreadableImage names the upload, not a server path."""
    from .errors import UnreadableImage
    from .images import open_image

    try:
        return open_image(io.BytesIO(data))
    except UnreadableImage as e:
        name = os.path.basename(filename or "")[:200] or "the upload"
        raise UnreadableImage(f"{name}: {str(e).removeprefix('image: ')}") from e


def _data_uri_thumbnail(img, px: int = 256) -> str:
    """The uploaded image, small, as a data: URI for the results page (it is never stored)."""
    img = img.copy()
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, weights: str | None = None,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, announce=print) -> None:
    """Run the gallery with uvicorn until Ctrl-C; fails fast with one-line errors before that."""
    import socket

    import uvicorn

    if weights not in (None, "default", "random") and not Path(weights).is_file():
        raise InvalidInput(f"--weights {weights}: no such file (give a state-dict file, or 'random')")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InvalidInput(f"--host {host}: {e.strerror}") from e
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise VecsearchError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e
    try:
        db.connect(settings).close()  # database errors now, as one line, not at the first request
    except BaseException:
        sock.close()
        raise
    sock.listen(2048)  # connections queue from now on, so the announced URL works at once
    app = create_app(settings, weights=weights, max_upload_bytes=max_upload_bytes, host=host)
    bound = sock.getsockname()[1]
    if allowed_hosts_for(host) is None:
        announce(f"warning: listening on {host}: anyone who can reach this machine on port {bound} "
                 "can browse and download your indexed images")
    shown = f"[{host}]" if ":" in host else host
    announce(f"vecsearch gallery on http://{shown}:{bound}/ (API docs at /api/docs); Ctrl-C stops it")
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    announce("stopped")
