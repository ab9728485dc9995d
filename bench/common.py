"""What the database benchmarks share: synthetic CNN-like vectors, a bulk loader, a throwaway server.

CNN-like: ResNet pooled features come after a ReLU (non-negative, about a third exactly zero),
cluster by content, and have channels of very different scales; L2-normalised as vecsearch stores
them. A generator draws from cluster centres built once, so a script can stream millions of rows
or materialise a matrix, and a fixed seed gives the same vectors on every run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vecsearch import db, hnsw, server  # noqa: E402
from vecsearch.config import Settings  # noqa: E402

DIM = db.DIM
MTIME = datetime(2026, 1, 1, tzinfo=UTC)
COPY_COLUMNS = "path, sha256, bytes, width, height, format, mtime, embedding"
COPY_TYPES = ["text", "text", "int8", "int4", "int4", "text", "timestamptz", "vector"]


class CnnLike:
    """A CNN-like feature space: `clusters` centres, per-channel scales, Gaussian spread `noise`."""

    def __init__(self, rng: np.random.Generator, clusters: int, noise: float) -> None:
        self.rng, self.noise = rng, noise
        self.scales = rng.lognormal(0, 0.5, DIM).astype(np.float32)
        self.centres = (np.maximum(rng.normal(0, 1, (clusters, DIM)), 0) * self.scales).astype(np.float32)

    def draw(self, m: int) -> np.ndarray:
        """m x 2048 float32: ReLU(a random centre + noise), L2-normalised."""
        v = (self.centres[self.rng.integers(0, len(self.centres), m)]
             + self.rng.normal(0, self.noise, (m, DIM)).astype(np.float32) * self.scales)
        v = np.maximum(v, 0)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def cnn_like(n: int, seed: int, clusters: int | None = None, noise: float = 1.0,
             chunk: int = 8192) -> np.ndarray:
    """n x 2048 float32 CNN-like vectors (clusters: n // 200, at least 50), drawn in chunks."""
    space = CnnLike(np.random.default_rng(seed), clusters or max(50, n // 200), noise)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out[start:start + m] = space.draw(m)
    return out


def drop_index(conn) -> str:
    """Drop the HNSW index before a bulk COPY (far faster than inserting into the graph); its
    definition, for `build_index`."""
    return hnsw.drop(conn)


@contextmanager
def copy_images(conn):
    """A binary COPY into images; write rows of (path, sha256, bytes, width, height, format, mtime,
    embedding)."""
    with conn.cursor().copy(f"COPY images ({COPY_COLUMNS}) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(COPY_TYPES)
        yield copy


def copy_vectors(conn, vectors) -> float:
    """Binary COPY of `vectors` as rows /bench/0000000.jpg... (dummy metadata); seconds taken."""
    started = time.perf_counter()
    with copy_images(conn) as copy:
        for i, v in enumerate(vectors):
            copy.write_row([f"/bench/{i:07d}.jpg", f"{i:064x}", 100_000, 1024, 768, "JPEG", MTIME, v])
    return time.perf_counter() - started


def build_index(conn, definition: str) -> float:
    """Build the HNSW index in bulk as `vecsearch load` does (vecsearch.index: the graph in memory,
    parallel workers), then VACUUM ANALYZE; returns the seconds the build took."""
    seconds = hnsw.rebuild_index(conn, definition)
    conn.execute("VACUUM ANALYZE images")
    return seconds


@contextmanager
def throwaway_home(name: str, keep: bool = False) -> Iterator[Path]:
    """A temporary VECSEARCH_HOME for an embedded server, stopped and removed at the end."""
    home = Path(tempfile.mkdtemp(prefix=f"vecsearch-bench-{name}-"))
    try:
        yield home
    finally:
        if server.running(home):
            server.stop(home)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


@contextmanager
def bench_database(name: str, keep: bool = False) -> Iterator[Settings]:
    """VECSEARCH_DATABASE_URL if set (its images table must be empty; it is emptied again at the
    end), else a throwaway embedded server. Settings of a migrated database."""
    url = os.environ.get("VECSEARCH_DATABASE_URL") or None
    with throwaway_home(name, keep) as home:
        settings = Settings(database_url=url, home=home)
        with db.connect(settings) as conn:
            if url and conn.execute("SELECT EXISTS (SELECT FROM images)").fetchone()[0]:
                raise SystemExit(f"{db.redact(url)} has images: the benchmark needs an empty database")
        print(f"database {db.redact(url)}" if url else f"throwaway embedded server in {home}", flush=True)
        try:
            yield settings
        finally:
            if url:
                with db.connect(settings) as conn:
                    conn.execute("TRUNCATE images")


def load_average() -> str:
    """The 1-minute load average and core count, to print next to figures from a shared machine."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
