"""What the web app's pages and API answer, from the library (catalogue, query, expr): each
function takes the app's State (settings, connection pool, embedder) and returns JSON shapes."""

from __future__ import annotations

import base64
import io
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from .. import db, embed, expr, query, server
from ..catalogue import count_images, get_image, list_images
from ..config import Settings
from ..errors import DatabaseUnavailable, InvalidInput, NotFound, UnreadableImage, database_failure
from ..verified_files import Verified
from .guard import UploadTooLarge, too_large
from .schemas import ImageInfo, ImagePage, SimilarOut, image_info, neighbour_list

POOL_TIMEOUT_S = 5  # waiting for a database connection, before a 503


ORIGINALS_AT_ONCE = 8


def decode_slots() -> int:
    """Decodes at once: one a core, as many as a quarter of memory holds at images.MAX_DECODED_BYTES."""
    from ..images import MAX_DECODED_BYTES

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return max(1, min(max(2, os.cpu_count() or 2), memory // 4 // MAX_DECODED_BYTES))


class State:
    def __init__(self, settings: Settings, weights: str | None, max_upload_bytes: int,
                 pool_size: int):
        self.settings = settings
        self.model = embed.Embedders(weights, home=settings.home)  # its engine measurement, if any
        self.max_upload_bytes = max_upload_bytes
        self.pool_size = pool_size
        self.pool = None
        self.pool_url: str | None = None
        self.opened = False
        self._pool_lock = threading.Lock()
        self.verified = Verified()
        # Decodes at once (thumbnails, uploads): each holds up to images.MAX_DECODED_BYTES, and a
        # grid page asks for dozens of thumbnails in parallel; together at most a quarter of memory.
        self.decode_slots = threading.BoundedSemaphore(decode_slots())
        # Originals sent at once (each streams CHUNK by CHUNK); more get 503 and retry.
        self.original_slots = threading.BoundedSemaphore(ORIGINALS_AT_ONCE)

    def open(self) -> None:
        db.connect(self.settings).close()  # starts the embedded server, migrates, checks pgvector
        self.opened = True

    def close(self) -> None:
        self.opened = False
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def url(self) -> str:
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

        url = self.url()
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
            raise database_failure(e) from e


def _refuse_files(terms) -> None:
    """Arithmetic in the web app names images by id only: a file term would read server files."""
    files = [t for t in terms if not isinstance(t.ref, int)]
    if files:
        raise InvalidInput(f"file terms such as {str(files[0].ref)!r} are not allowed in the web app: "
                           "use image ids, or search by uploading the file")


def _no_files(path) -> None:
    """The web app's embed_file: never reached (_refuse_files ran first), refusing all the same."""
    raise InvalidInput(f"file terms such as {str(path)!r} are not allowed in the web app")


# -- what the pages and the API answer (the same data for both) ----------------------------------


def browse(state: State, q: str | None, page_no: int, per_page: int) -> ImagePage:
    with state.connection() as conn:
        total = count_images(conn, q)
        rows = list_images(conn, q, limit=per_page, offset=(page_no - 1) * per_page)
    return ImagePage(total=total, page=page_no, per_page=per_page,
                     pages=max(1, math.ceil(total / per_page)), path_contains=q or None,
                     images=[image_info(r) for r in rows])


def image(state: State, image_id: int) -> ImageInfo:
    with state.connection() as conn:
        return image_info(get_image(conn, image_id))


def filters(taken_after: str | None = None, taken_before: str | None = None,
            camera: str | None = None) -> query.Filters:
    """The photo-metadata filters of a page or API call, from its query parameters (empty ones,
    as a form sends them, are not given); InvalidInput (400) for a bad date."""
    after, before, camera = (v if v and v.strip() else None for v in (taken_after, taken_before, camera))
    return query.Filters(None if after is None else query.parse_when(after, "taken_after"),
                         None if before is None else query.parse_when(before, "taken_before"), camera)


def neighbours(state: State, image_id: int, k: int, exact: bool = False,
               ef_search: int | None = None, where: query.Filters = query.NO_FILTERS
               ) -> tuple[ImageInfo, SimilarOut]:
    with state.connection() as conn:
        info = image_info(get_image(conn, image_id))
        try:
            found = query.similar(conn, image_id, k=k, ef_search=ef_search, exact=exact,
                                  taken_after=where.taken_after, taken_before=where.taken_before,
                                  camera=where.camera)
        except NotFound:
            if where == query.NO_FILTERS:
                raise
            found = []  # no image passes the filters: an empty list, the image itself still shown
    said = {"id": image_id, **{name: value for name, value in zip(
        ("taken_after", "taken_before", "camera"), where.sql(), strict=True) if value is not None}}
    return info, SimilarOut(query=said, k=k, results=neighbour_list(found))


def upload(state: State, data: bytes, filename: str | None, k: int) -> tuple[SimilarOut, str | None]:
    """Neighbours of an uploaded file (decoded in memory, never stored), and its preview."""
    if len(data) > state.max_upload_bytes:
        raise UploadTooLarge(too_large(state.max_upload_bytes))
    if not data:
        raise InvalidInput("the uploaded file is empty: choose an image file")
    decoded = []

    def decode():
        with state.decode_slots:
            decoded.append(decode_upload(data, filename))
        return decoded[0]

    found = query.search_image(state.connection, decode, k, embed_images=state.model.embed_images)
    img = decoded[0]
    result = SimilarOut(query={"filename": filename, "bytes": len(data)}, k=k, results=neighbour_list(found))
    return result, _data_uri_thumbnail(img)


def arithmetic(state: State, text: str, k: int) -> SimilarOut:
    terms = expr.parse(text)
    _refuse_files(terms)
    with state.connection() as conn:
        found, exclude = expr.neighbours_of_terms(conn, terms, k, _no_files)
    return SimilarOut(query={"expr": text, "exclude": sorted(exclude)}, k=k, results=neighbour_list(found))


def decode_upload(data: bytes, filename: str | None):
    """An uploaded file decoded like `vecsearch load` decodes files (same limits, same EXIF
    orientation and RGB conversion); UnreadableImage names the upload, not a server path."""
    from ..images import open_image

    try:
        return open_image(io.BytesIO(data), name=os.path.basename(filename or ""))
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
