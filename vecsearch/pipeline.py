"""The pipeline of `vecsearch load`, one batch of files at a time, and its tally.

  decode workers (embed.map_batches): read + sha256 + decode + resize/crop  (ahead of ...)
  this process: ResNet50 forward, only for content not already in the database  (while ...)
  a writer thread: binary COPY into a temp table, one INSERT ... ON CONFLICT (path) DO UPDATE,
  commit. A crash loses at most the batches in flight; a re-run completes the job.

Table names are unqualified and `search_path` picks the schema, so `vecsearch eval` can load into
a scratch schema with its own `images` and `embedding_model`.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from . import db, exif
from .config import Settings
from .errors import UnreadableImage
from .images import model_input, open_decoded, read_metadata, sha256_of
from .limits import EPOCH
from .progress import Progress

COLUMNS = ("path", "sha256", "bytes", "width", "height", "format", "mtime", "embedding")
COPY_TYPES = ("text", "text", "int8", "int4", "int4", "text", "timestamptz", "vector")
# The photo metadata (migration 0009) travels with the row and is written in the same transaction.
METADATA = (*exif.COLUMNS, "metadata_version")
METADATA_TYPES = (*exif.COPY_TYPES, "int2")
WRITE_QUEUE = 4  # batches waiting for the writer: bounds memory, keeps the model busy
RETRIES = 5  # deadlocks with a concurrent load on overlapping rows are retried
# A row whose content (sha256) may lend its embedding to a file with the same bytes: any row, or with
# --reembed only those this run wrote (loaded_at >= its start). Takes the parameter %(since)s.
REUSABLE = "(%(since)s::timestamptz IS NULL OR loaded_at >= %(since)s)"


@dataclass
class LoadSummary:
    """What a load did. found == new + updated + unchanged + len(failed)."""

    found: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicate: int = 0  # new or updated rows whose content was already embedded (vector reused)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    pruned: int = 0
    embedded: int = 0  # images that went through the model
    index_rebuilt: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    decode_wait: float = 0.0  # seconds the model sat waiting for decoded files (more --workers?)
    write_wait: float = 0.0  # seconds the model sat waiting for the database writer
    model_seconds: float = 0.0  # seconds in the network
    metadata_reread: int = 0  # unchanged files whose metadata alone was read (no re-embedding)
    metadata_warnings: int = 0  # files whose EXIF had values dropped as bad (each warned about)
    engine: str = ""  # where and how the network ran (engine.Choice.describe)
    errors_csv_error: str | None = None  # why the --errors file could not be written

    @property
    def exit_code(self) -> int:
        """0 all loaded, 2 some files skipped as unreadable, 130 interrupted (Ctrl-C)."""
        return 130 if self.interrupted else 1 if self.errors_csv_error else 2 if self.failed else 0

    def describe(self) -> str:
        rate = f", {self.embedded / self.seconds:.1f} images/s" if self.embedded and self.seconds else ""
        text = (f"found {self.found}, new {self.new}, updated {self.updated}, unchanged {self.unchanged}, "
                f"duplicate content {self.duplicate}, failed {len(self.failed)}, pruned {self.pruned} "
                f"(embedded {self.embedded} images in {self.seconds:.1f} s{rate})")
        if self.metadata_reread:
            text += f", metadata re-read {self.metadata_reread}"
        if self.metadata_warnings:
            text += f", metadata warnings {self.metadata_warnings}"
        return ("interrupted: " + text) if self.interrupted else text

    @property
    def limited_by(self) -> str:
        """The stage that set the rate: what the model waited for most, else the model itself."""
        waits = {"decode": self.decode_wait, "database writes": self.write_wait}
        stage, longest = max(waits.items(), key=lambda item: item[1])
        return stage if longest > 0.25 * max(self.model_seconds, 1e-9) else "model"

    def stages(self) -> str:
        return (f"rate limited by {self.limited_by}: model {self.model_seconds:.1f} s, waiting for "
                f"decoded files {self.decode_wait:.1f} s, for database writes {self.write_wait:.1f} s")


def connect(settings: Settings, schema: str = "public") -> psycopg.Connection:
    """A db.connect connection whose unqualified `images`/`embedding_model` are in `schema`."""
    conn = db.connect(settings, session="load")
    set_schema(conn, schema)
    return conn


def set_schema(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))


def fail(summary: LoadSummary, report: Progress, path: str, reason: str) -> None:
    summary.failed.append((path, reason))
    report.failed(path, reason)


def warn_metadata(summary: LoadSummary, report: Progress, path: str,
                  metadata: exif.PhotoMetadata | None) -> None:
    """Count and report the EXIF values a file had dropped as bad (the file itself loads)."""
    if metadata is not None and metadata.warnings:
        summary.metadata_warnings += 1
        report.warned(path, "; ".join(metadata.warnings))


@dataclass
class Row:
    """One file on its way through the pipeline: what the decode worker found, then its vector.

    Known content (its sha256 already in the table) travels without pixels and gets no vector:
    the writer copies the existing row's.
    """

    path: str
    sha256: str | None = None
    bytes: int | None = None
    mtime: datetime | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    metadata: exif.PhotoMetadata | None = None  # None for known content: the writer copies it
    pixels: Any = None  # 224 x 224 x 3 uint8, from the worker, until embedded
    embedding: Any = None  # 2048 float32
    duplicate: bool = False  # its content was embedded already (in the table or in this batch)
    error: str | None = None  # why the file is skipped


def _open_nonblocking(path: str, flags: int) -> int:
    # A FIFO that replaced a file since discovery must not block the load: opened without
    # waiting for a writer, it is then refused as "not a regular file".
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class Reader:
    """Runs in the decode workers: one file -> its row fields and 224x224x3 pixels, or a reason.

    Content already in the database (sha256) is not decoded at all: the row reuses its vector.
    """

    def __init__(self, url: str, schema: str, reuse_since: datetime | None) -> None:
        self.url, self.schema, self.reuse_since = url, schema, reuse_since
        self._conn: psycopg.Connection | None = None

    def __getstate__(self) -> dict:  # spawn-started workers open their own connection
        return {**self.__dict__, "_conn": None}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _known(self, sha: str) -> bool:
        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True)
            set_schema(self._conn, self.schema)
            import multiprocessing
            import multiprocessing.util

            if multiprocessing.parent_process() is not None:  # a worker: close it when it exits
                multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        return self._conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM images WHERE sha256 = %(sha)s AND {REUSABLE})",
            {"sha": sha, "since": self.reuse_since}).fetchone()[0]

    def __call__(self, path: str, decode: bool | None = None) -> Row:
        item = Row(path)
        try:
            with open(path, "rb", opener=_open_nonblocking) as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise UnreadableImage("not a regular file")
                if before.st_size == 0:
                    raise UnreadableImage("empty file (0 bytes)")
                item.sha256 = sha256_of(f)
                item.bytes = before.st_size
                item.mtime = EPOCH + timedelta(microseconds=before.st_mtime_ns // 1000)
                if decode is None and self._known(item.sha256):
                    return item  # no pixels: the writer copies the existing vector
                f.seek(0)
                decoded = open_decoded(f)
                item.width, item.height, item.format = decoded.width, decoded.height, decoded.format
                item.metadata = decoded.metadata
                item.pixels = model_input(decoded.image)
                after = os.fstat(f.fileno())
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise UnreadableImage("the file changed while it was being read: load again")
        except UnreadableImage as e:
            item.error = str(e)
        except FileNotFoundError:
            item.error = "the file vanished during the load"
        except OSError as e:
            item.error = e.strerror or str(e)
        return item


METADATA_BATCH = 500  # rows of metadata re-read per transaction


def reread_metadata(conn: psycopg.Connection, files: Iterable[tuple[str, int, int]], summary: LoadSummary,
                    report: Progress) -> None:
    """Read the photo metadata of files whose rows are current (path, size and mtime match, so
    the vector stays) and write it, METADATA_BATCH rows a transaction: migrated rows, or every row
    with `vecsearch load --reread-metadata`. `files`: (path, size, mtime in ns). Only the headers
    are read (a RAW file whole); a file that cannot be read keeps its row as it is, with a warning."""
    pending: list[list[Any]] = []

    def write() -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"UPDATE images SET ({', '.join(METADATA)}) = ({', '.join(['%s'] * len(METADATA))}) "
                "WHERE path = %s AND bytes = %s AND mtime = %s", pending)
            summary.metadata_reread += cur.rowcount
        pending.clear()

    for path, size, mtime_ns in files:
        try:
            with open(path, "rb", opener=_open_nonblocking) as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise UnreadableImage("not a regular file")
                metadata = read_metadata(f, path)
        except (UnreadableImage, OSError) as e:
            summary.metadata_warnings += 1
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            report.warned(path, f"metadata not read: {reason}")
            continue
        warn_metadata(summary, report, path, metadata)
        pending.append([*metadata.values(), exif.VERSION, path, size,
                        EPOCH + timedelta(microseconds=mtime_ns // 1000)])
        if len(pending) >= METADATA_BATCH:
            write()
    if pending:
        write()


class Writer(threading.Thread):
    """Writes embedded batches in order on its own connection, one transaction per batch."""

    def __init__(self, settings: Settings, schema: str, reuse_since: datetime | None,
                 summary: LoadSummary, report: Progress) -> None:
        super().__init__(name="vecsearch-writer", daemon=True)
        self.conn = connect(settings, schema)
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS vecsearch_stage (path text, sha256 text, bytes bigint, "
            "width integer, height integer, format text, mtime timestamptz, embedding vector(2048), "
            "reduced halfvec, reduced_version integer, taken_at timestamp, taken_offset interval, "
            "camera_make text, camera_model text, lens text, gps_latitude float8, gps_longitude float8, "
            "orientation int2, metadata_version int2) ON COMMIT DELETE ROWS")
        self.projection = None  # compact.Projection of the compact index in use, if any
        self.reuse_since, self.summary, self.report = reuse_since, summary, report
        self.queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.pending: dict[str, int] = {}  # sha256 -> rows queued but not committed yet

    def in_flight(self, shas: Iterable[str]) -> set[str]:
        with self.lock:
            return {s for s in shas if s in self.pending}

    def put(self, rows: list[Row]) -> None:
        with self.lock:
            for row in rows:
                self.pending[row.sha256] = self.pending.get(row.sha256, 0) + 1
        self._put(rows)

    def _put(self, item: Any) -> None:
        while True:
            self.check()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop, and raise the writer's error if it had one."""
        try:
            if self.is_alive():
                self._put(None)
                self.join()
            self.check()
        finally:
            self.conn.close()

    def run(self) -> None:
        try:
            while (rows := self.queue.get()) is not None:
                self._write(rows)
        except BaseException as e:
            self.error = e

    def _write(self, rows: list[Row]) -> None:
        for attempt in range(RETRIES):
            try:
                with self.conn.transaction():
                    returned = self._insert(rows)
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))
        with self.lock:
            for row in rows:
                left = self.pending.pop(row.sha256) - 1
                if left:
                    self.pending[row.sha256] = left
        for row in rows:
            inserted = returned.get(row.path)
            if inserted is None:  # a reused vector's row was deleted meanwhile (a concurrent prune)
                fail(self.summary, self.report, row.path,
                     "its content's earlier copy was removed during the load: load again")
                continue
            if inserted:
                self.summary.new += 1
            else:
                self.summary.updated += 1
            self.summary.duplicate += row.duplicate

    def _in_use(self):
        """The projection of the compact index in use, read under a share lock: a reindex cannot
        swap in another before this batch commits, so its reduced vectors match the graph."""
        from . import compact

        row = self.conn.execute("SELECT version FROM vecsearch_projection WHERE in_use FOR SHARE").fetchone()
        if row is None:
            self.projection = None
        elif self.projection is None or self.projection.version != row[0]:
            self.projection = compact.load(self.conn, row[0])
        return self.projection

    def _insert(self, rows: list[Row]) -> dict[str, bool]:
        from pgvector import HalfVector

        cur = self.conn.cursor()
        known = self._known_content([r.sha256 for r in rows if r.embedding is None])
        projection = self._in_use()
        with cur.copy(f"COPY vecsearch_stage ({', '.join(COLUMNS)}, reduced, reduced_version, "
                      f"{', '.join(METADATA)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([*COPY_TYPES, "halfvec", "int4", *METADATA_TYPES])
            for row in rows:
                values = {c: getattr(row, c) for c in COLUMNS}
                if row.embedding is None:  # known content: the existing row's vector, size, metadata
                    if row.sha256 not in known:
                        continue  # that row was deleted meanwhile: reported below
                    values.update(known[row.sha256])
                if row.metadata is not None:  # read from this file (decoded here after all)
                    values.update(zip(METADATA, [*row.metadata.values(), exif.VERSION], strict=True))
                reduced = None
                if projection is not None:
                    vector = values["embedding"]
                    reduced = HalfVector(projection.reduce(
                        vector.to_numpy() if hasattr(vector, "to_numpy") else vector))
                copy.write_row([*(values[c] for c in COLUMNS), reduced,
                                None if reduced is None else projection.version,
                                *(values[c] for c in METADATA)])
        # loaded_at comes from the SELECT, not now() in DO UPDATE: Citus takes only immutable
        # functions there.
        cur.execute("""
            INSERT INTO images AS i (path, sha256, bytes, width, height, format, mtime, embedding,
                                     reduced, reduced_version, loaded_at, {metadata})
            SELECT path, sha256, bytes, width, height, format, mtime, embedding, reduced,
                   reduced_version, now(), {metadata}
            FROM vecsearch_stage ORDER BY path
            ON CONFLICT (path) DO UPDATE SET
                sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, width = EXCLUDED.width,
                height = EXCLUDED.height, format = EXCLUDED.format, mtime = EXCLUDED.mtime,
                embedding = EXCLUDED.embedding, reduced = EXCLUDED.reduced,
                reduced_version = EXCLUDED.reduced_version, loaded_at = EXCLUDED.loaded_at,
                {updates}
            RETURNING i.path, (i.xmax = 0)
        """.format(metadata=", ".join(METADATA), updates=", ".join(f"{c} = EXCLUDED.{c}" for c in METADATA)))
        return dict(cur.fetchall())

    def _known_content(self, shas: list[str]) -> dict[str, dict]:
        """sha256 -> width, height, format, embedding and photo metadata of a row with that content
        (one loaded in this run when re-embedding): the same bytes have the same EXIF."""
        if not shas:
            return {}
        found = self.conn.execute(f"""
            SELECT DISTINCT ON (sha256) sha256, width, height, format, embedding, {", ".join(METADATA)}
            FROM images
            WHERE sha256 = ANY(%(shas)s) AND {REUSABLE}
            ORDER BY sha256, path
        """, {"shas": shas, "since": self.reuse_since})
        return {sha: dict(zip(("width", "height", "format", "embedding", *METADATA), rest, strict=True))
                for sha, *rest in found}


class Pipeline:
    def __init__(self, settings: Settings, schema: str, embedder, report: Progress,
                 summary: LoadSummary, reuse_since: datetime | None) -> None:
        self.settings, self.schema, self.embedder = settings, schema, embedder
        self.report, self.summary, self.reuse_since = report, summary, reuse_since
        self.reader = Reader(db.database_url(settings), schema, reuse_since)

    def run(self, paths: list[str], workers: int | None) -> None:
        from .embed import default_workers, map_batches

        if workers is None:
            workers = default_workers(gpu=getattr(self.embedder, "on_gpu", False))
        if hasattr(self.embedder, "expect"):  # what the engine's set-up must repay (engine.plan)
            self.embedder.expect(len(paths))
        self.report.start(len(paths))
        # The decode workers are forked first, before this process starts any thread.
        batches = map_batches(self.reader, paths, batch_size=self.embedder.batch_size, workers=workers)
        writer = None
        try:
            with connect(self.settings, self.schema) as conn:
                writer = Writer(self.settings, self.schema, self.reuse_since, self.summary, self.report)
                writer.start()
                while True:
                    waiting = time.monotonic()
                    batch = next(batches, None)
                    self.summary.decode_wait += time.monotonic() - waiting
                    if batch is None:
                        break
                    writer.check()
                    rows, embedded = self._embed(conn, writer, batch)
                    if rows:
                        waiting = time.monotonic()
                        writer.put(rows)
                        self.summary.write_wait += time.monotonic() - waiting
                    self.report.advance(len(batch), embedded)
        finally:
            batches.close()
            self.reader.close()
            try:
                if writer is not None:
                    writer.close()
            finally:
                self.report.stop()
                if self.summary.embedded:
                    self.report.message(self.summary.stages())

    def _embed(self, conn: psycopg.Connection, writer: Writer, batch: list[Row]) -> tuple[list[Row], int]:
        """Embed the batch's new content (once per sha256); rows with known content get no vector."""
        good = []
        for item in batch:
            if item.error is not None:
                fail(self.summary, self.report, item.path, item.error)
            else:
                warn_metadata(self.summary, self.report, item.path, item.metadata)
                good.append(item)
        shas = {item.sha256 for item in good}
        # In flight first, then the database: a batch the writer commits in between is in one of them.
        known = writer.in_flight(shas)
        known |= {s for (s,) in conn.execute(
            f"SELECT DISTINCT sha256 FROM images WHERE sha256 = ANY(%(shas)s) AND {REUSABLE}",
            {"shas": list(shas - known), "since": self.reuse_since})}
        groups: dict[str, list[Row]] = {}
        rows = []
        for item in good:
            if item.sha256 in known:
                item.duplicate, item.pixels = True, None
                rows.append(item)
                continue
            if item.pixels is None:  # the worker saw it in the database; it is gone since
                item = self.reader(item.path, decode=True)
                if item.error is not None:
                    fail(self.summary, self.report, item.path, item.error)
                    continue
                warn_metadata(self.summary, self.report, item.path, item.metadata)
            groups.setdefault(item.sha256, []).append(item)
        if groups:
            import numpy as np

            started = time.monotonic()
            vectors = self.embedder.embed_arrays(np.stack([group[0].pixels for group in groups.values()]))
            self.summary.model_seconds += time.monotonic() - started
            choice = getattr(self.embedder, "choice", None)
            if not self.summary.engine and choice is not None:
                self.summary.engine = choice.describe()
                self.report.message(f"engine: {self.summary.engine}")
            self.summary.embedded += len(groups)
            for group, vector in zip(groups.values(), vectors, strict=True):
                for n, item in enumerate(group):
                    item.pixels, item.embedding, item.duplicate = None, vector, n > 0
                    rows.append(item)
        return rows, len(groups)
