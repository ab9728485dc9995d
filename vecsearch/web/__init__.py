"""`vecsearch serve`: a web gallery over the images table, and a JSON API under /api.

The pages are server-rendered (Jinja2) and call the same library functions as the CLI:
`query.similar` for an image's neighbours, `query.search_image` (as `vecsearch search FILE`) for an uploaded
file, `expr.parse`/`expr.evaluate` for vector arithmetic.

Security model:
- binds 127.0.0.1 unless told otherwise, and then answers only to loopback Host names, so a web
  page that rebinds its DNS name to 127.0.0.1 cannot read the gallery;
- files are served by image id only, from the path stored in the images table: no URL carries a
  path, so nothing outside the index can be read (`../`, absolute and encoded paths are 404),
  and only bytes that hash to the stored sha256 are sent or thumbnailed (vecsearch/verified_files.py):
  a file swapped since the load, even for a link with the same size and mtime, is 404;
- uploads are capped in size before they are parsed, and decoded by the loader's own
  decode-safe code; arithmetic terms that name server-side files are refused;
- every error is a page or JSON with one clear message; tracebacks go to the server log only.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import psycopg
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .. import __version__, catalogue, db, thumbs
from ..catalogue import MAX_PER_PAGE, PER_PAGE
from ..config import Settings
from ..errors import (
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    PgvectorMissing,
    SchemaMismatch,
    VecsearchError,
    WeightsUnavailable,
    database_failure,
)
from ..limits import DEFAULT_K, MAX_EF_SEARCH, WEB_DEFAULT_K, WEB_MAX_K, WEB_MAX_UPLOAD_MB, WEB_PORT
from ..output import printable
from . import dupes_page
from . import state as web_state
from .guard import LoopbackHostOnly, SecurityHeaders, UploadLimit, UploadTooLarge, allowed_hosts_for
from .schemas import ERRORS, ImageInfo, ImagePage, SimilarOut

log = logging.getLogger("vecsearch.web")

# The templates and static files ship inside this package (pyproject.toml lists them as package data).
DATA = resources.files(__name__)
DEFAULT_MAX_UPLOAD_BYTES = WEB_MAX_UPLOAD_MB * 1024 * 1024
MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
        "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heic",
        "AVIF": "image/avif"}


# Query parameters shared by pages and API (module level: annotations are resolved by name).
K = Annotated[int, Query(ge=1, le=WEB_MAX_K, description="How many neighbours.")]
# No NUL: PostgreSQL text cannot hold one, and no stored path does.
Contains = Annotated[str | None, Query(max_length=1000, pattern="^[^\x00]*$",
                                       description="Only paths containing this (any case).")]
PageNo = Annotated[int, Query(alias="page", ge=1, le=10**9)]
# Out of range is "no such image" (404), not a database error.
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
PerPage = Annotated[int, Query(ge=1, le=MAX_PER_PAGE)]
# The photo-metadata filters (query.Filters), as `vecsearch similar --taken-after ...`.
TakenAfter = Annotated[str | None, Query(max_length=40, description=(
    "Only photos taken on or after this date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], the camera's local "
    "time)."))]
TakenBefore = Annotated[str | None, Query(max_length=40, description="Only photos taken before this date.")]
Camera = Annotated[str | None, Query(max_length=128, pattern="^[^\x00]*$", description=(
    "Only photos whose camera make or model contains this (any case)."))]


class Rendition(StrEnum):
    thumb = "thumb"
    preview = "preview"
    original = "original"


def create_app(settings: Settings, *, weights: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, host: str = "127.0.0.1",
               pool_size: int = 4) -> FastAPI:
    """The web gallery and JSON API over the database of `settings`.

    `weights` overrides where the recorded model's weights come from ("random", a state-dict
    FILE); the model is loaded on the first search. `host` is the address the server binds:
    on a loopback address the app answers only to loopback Host names.
    """
    state = web_state.State(settings, weights, max_upload_bytes, pool_size)

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
    templates = Jinja2Templates(directory=DATA / "templates")
    templates.env.globals.update(version=__version__, max_upload_bytes=max_upload_bytes,
                                 default_k=WEB_DEFAULT_K, max_k=WEB_MAX_K)
    templates.env.filters["basename"] = lambda p: os.path.basename(p)
    # Every value a page shows, with control and bidirectional characters escaped (as the CLI does):
    # a name with U+202E must not display as another.
    templates.env.finalize = lambda v: printable(v) if type(v) is str else v  # Markup is left as is
    templates.env.filters["filesize"] = _filesize

    def respond(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        return templates.TemplateResponse(request, "error.html",
                                          {"status": status, "message": message},
                                          status_code=status)

    app.add_middleware(UploadLimit, limit=max_upload_bytes, respond=respond)
    app.add_middleware(SecurityHeaders)
    allowed = allowed_hosts_for(host)
    if allowed is not None:
        app.add_middleware(LoopbackHostOnly, allowed=allowed, respond=respond)
    app.mount("/static", StaticFiles(directory=DATA / "static"), name="static")
    _add_error_handlers(app, respond)
    _add_pages(app, state, templates)
    dupes_page.add_pages(app, state, templates)
    _add_media(app, state)
    _add_api(app, state)
    return app


def _add_pages(app: FastAPI, state: web_state.State, templates: Jinja2Templates) -> None:
    """The HTML pages: browse, an image and its neighbours, search by upload, arithmetic."""

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def browse_page(request: Request, q: Contains = None, page_no: PageNo = 1,
                    per_page: PerPage = PER_PAGE):
        data = web_state.browse(state, q, page_no, per_page)
        return page(request, "browse.html", data=data, q=q or "")

    @app.get("/images/{image_id}", response_class=HTMLResponse, include_in_schema=False)
    def image_page(request: Request, image_id: ImageId, k: K = WEB_DEFAULT_K, taken_after: TakenAfter = None,
                   taken_before: TakenBefore = None, camera: Camera = None):
        form = {"taken_after": taken_after or "", "taken_before": taken_before or "", "camera": camera or ""}
        try:
            where = web_state.filters(taken_after, taken_before, camera)
        except InvalidInput as e:  # shown above the neighbours, to fix the filter
            info, result = web_state.neighbours(state, image_id, k)
            return page(request, "image.html", image=info, result=result, k=k, form=form, error=str(e),
                        arith_hint=f"{image_id} + 40*0.5 - 7", status_code=400)
        info, result = web_state.neighbours(state, image_id, k, where=where)
        return page(request, "image.html", image=info, result=result, k=k, form=form,
                    arith_hint=f"{image_id} + 40*0.5 - 7")

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_form(request: Request):
        return page(request, "search.html", result=None, preview=None, k=WEB_DEFAULT_K)

    @app.post("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, file: Annotated[UploadFile, File()],
                    k: Annotated[int, Form(ge=1, le=WEB_MAX_K)] = WEB_DEFAULT_K):
        try:
            data = file.file.read(state.max_upload_bytes + 1)
            result, preview = web_state.upload(state, data, file.filename, k)
        except (InvalidInput, NotFound) as e:  # shown above the form, to try another file
            return page(request, "search.html", result=None, preview=None, k=k, error=str(e),
                        status_code=_status_of(e))
        return page(request, "search.html", result=result, preview=preview, k=k)

    @app.get("/arithmetic", response_class=HTMLResponse, include_in_schema=False)
    def arithmetic_page(request: Request, expr: Annotated[str, Query(max_length=2000)] = "",
                        k: K = WEB_DEFAULT_K):
        try:
            result = web_state.arithmetic(state, expr, k) if expr.strip() else None
        except (InvalidInput, NotFound) as e:  # shown under the expression, to fix it
            return page(request, "arithmetic.html", expr=expr, result=None, k=k, error=str(e),
                        status_code=_status_of(e))
        return page(request, "arithmetic.html", expr=expr, result=result, k=k)



def _add_media(app: FastAPI, state: web_state.State) -> None:
    """Files by image id: the original, or a cached thumbnail or preview, of indexed content only."""

    @app.api_route("/media/{image_id}/{rendition}", methods=["GET", "HEAD"], include_in_schema=False)
    def media(image_id: ImageId, rendition: Rendition):
        with state.connection() as conn:
            row = catalogue.get_image(conn, image_id)
        if rendition is Rendition.original:
            return _original(state, row)
        with state.decode_slots:
            thumb = thumbs.thumbnail(state.settings.home, row, thumbs.SIZES[rendition.value], state.verified)
        return FileResponse(thumb, media_type="image/jpeg",
                            headers={"cache-control": "private, max-age=86400"})



def _original(state: web_state.State, row: dict) -> Response:
    """The indexed file, streamed while it is hashed (only bytes whose sha256 is the indexed one:
    vecsearch/verified_files.py), at most ORIGINALS_AT_ONCE at a time."""
    if not state.original_slots.acquire(blocking=False):
        raise HTTPException(503, "too many originals are being sent right now: try again in a moment",
                            headers={"retry-after": "2"})
    try:
        stream = state.verified.stream(row["id"], row["path"], row["sha256"], row["bytes"])
    except BaseException:
        state.original_slots.release()
        raise
    stream.on_close = state.original_slots.release
    mime = MIME.get(row["format"].upper())
    disposition = "inline" if mime else "attachment"
    name = quote(printable(os.path.basename(row["path"])))  # no bidi override in a save dialog
    # The background task closes a stream whose body never started (the client left first).
    return StreamingResponse(iter(stream), media_type=mime or "application/octet-stream",
                             background=BackgroundTask(stream.close),
                             headers={"content-length": str(stream.size),
                                      "content-disposition": f"{disposition}; filename*=utf-8''{name}"})


def _add_api(app: FastAPI, state: web_state.State) -> None:
    """The JSON API under /api (OpenAPI docs at /api/docs): the same data as the pages."""

    @app.get("/api/images", response_model=ImagePage, tags=["images"], summary="List images",
             responses=ERRORS)
    def api_images(q: Contains = None, page_no: PageNo = 1, per_page: PerPage = PER_PAGE) -> ImagePage:
        """A page of images in load order, optionally only those whose path contains `q`."""
        return web_state.browse(state, q, page_no, per_page)

    @app.get("/api/images/{image_id}", response_model=ImageInfo, tags=["images"],
             summary="Image metadata", responses=ERRORS)
    def api_image(image_id: ImageId) -> ImageInfo:
        """An image's metadata (path, size, format, dimensions, hashes) and its URLs."""
        return web_state.image(state, image_id)

    @app.get("/api/images/{image_id}/similar", response_model=SimilarOut, tags=["search"],
             summary="Neighbours of an image", responses=ERRORS)
    def api_similar(image_id: ImageId, k: K = DEFAULT_K, exact: bool = False,
                    ef_search: Annotated[int | None, Query(ge=1, le=MAX_EF_SEARCH)] = None,
                    taken_after: TakenAfter = None, taken_before: TakenBefore = None,
                    camera: Camera = None) -> SimilarOut:
        """The k nearest images to image `image_id` (itself excluded), as `vecsearch similar`; only
        photos taken in [taken_after, taken_before) by a matching camera where those are given."""
        where = web_state.filters(taken_after, taken_before, camera)
        return web_state.neighbours(state, image_id, k, exact=exact, ef_search=ef_search, where=where)[1]

    @app.post("/api/search", response_model=SimilarOut, tags=["search"],
              summary="Search by an uploaded image", responses=ERRORS)
    def api_search(file: Annotated[UploadFile, File(description="An image file.")],
                   k: Annotated[int, Form(ge=1, le=WEB_MAX_K)] = DEFAULT_K) -> SimilarOut:
        """The k nearest images to an uploaded image file, as `vecsearch search FILE`."""
        return web_state.upload(state, file.file.read(state.max_upload_bytes + 1), file.filename, k)[0]

    @app.get("/api/arithmetic", response_model=SimilarOut, tags=["search"],
             summary="Vector arithmetic", responses=ERRORS)
    def api_arithmetic(expr: Annotated[str, Query(min_length=1, max_length=2000, description=(
            "Weighted sum of image ids, e.g. `12 + 40*0.5 - 7`"))], k: K = DEFAULT_K) -> SimilarOut:
        """The k nearest images to a sum of weighted image vectors (query ids excluded)."""
        return web_state.arithmetic(state, expr, k)


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
        response = respond(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 503's retry-after
        return response

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
        return respond(request, 503, str(database_failure(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return respond(request, 500, "internal error: the server log has the details")


def _openapi_without_422(app: FastAPI) -> None:
    """Validation errors here are 400 {error, status} (see schemas.ERRORS), not FastAPI's 422."""
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
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = WEB_PORT, weights: str | None = None,
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
    # proto TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it every response after the first on a kept-alive connection waited ~40 ms (Nagle against
    # the client's delayed ACK: docs/benchmarks.md, the duplicate review). Accepted sockets inherit both.
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
