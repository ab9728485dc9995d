"""Fixtures: one real embedded PostgreSQL for the session, a fresh database per test.

Each test gets its own database cloned from a migrated template (CREATE DATABASE ... TEMPLATE
takes ~0.1 s), so tests are isolated without re-running migrations.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image

from vecsearch import db, hnsw, server
from vecsearch.config import Settings
from vecsearch.synthetic import make_image  # noqa: F401  (tests import it from here)

TEMPLATE = "vs_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("vshome")
    running = server.ensure_running(home)
    with server.psql_connection(running) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    db.upgrade(running.url(TEMPLATE))
    yield home
    server.stop(home)


def _database_privileges() -> str:
    """The database-level grants of migration 0003, as the migration runs them."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config(""))
    return script.get_revision("0003").module.PRIVILEGES


@contextmanager
def fresh_database(pg_home: Path, template: str = TEMPLATE) -> Iterator[str]:
    """The URL of a new database cloned from the migrated template (or `template`, a database
    made from it, e.g. hnsw_rows'), dropped afterwards."""
    running = server.ensure_running(pg_home)
    name = f"t_{os.getpid()}_{next(_counter)}"
    with server.psql_connection(running) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    with psycopg.connect(running.url(name), autocommit=True) as conn:
        conn.execute(_database_privileges())  # database ACLs are not copied from a template
    try:
        yield running.url(name)
    finally:
        with server.psql_connection(running) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(pg_home, monkeypatch) -> Settings:
    """Settings pointing at a fresh, migrated, empty database of the session server."""
    with fresh_database(pg_home) as url:
        monkeypatch.setenv("VECSEARCH_DATABASE_URL", url)
        monkeypatch.setenv("VECSEARCH_HOME", str(pg_home))
        yield Settings(database_url=url, home=pg_home)


@pytest.fixture
def conn(settings) -> psycopg.Connection:
    with db.connect(settings) as connection:
        yield connection


HNSW_TEMPLATE = "vs_template_hnsw"


@dataclass(frozen=True)
class Rows:
    """What hnsw_rows' template holds: 2,500 rows (enough for the planner to use the HNSW index;
    below ~2,000 it rightly prefers an exact scan), clustered(2500, seed=1), with their ids in order.
    Paths: 10% under /photos/a/, 13 rows under /photos/rare/, the rest under /photos/b/;
    /photos/ab/ shares the prefix "/photos/a" but is not under /photos/a."""

    vectors: np.ndarray
    ids: list[int]
    paths: list[str]

    @staticmethod
    def folder(i: int) -> str:
        return "rare" if i % 200 == 7 else "a" if i % 10 == 3 else "ab" if i % 50 == 1 else "b"

    def mask(self, prefix: str) -> np.ndarray:
        return np.array([p.startswith(prefix) for p in self.paths])


@pytest.fixture(scope="session")
def hnsw_rows(pg_home) -> Rows:
    """A second template database, the migrated one plus Rows' rows and their HNSW index, built once
    per session (the build is most of the cost); clone it with fresh_database(pg_home, HNSW_TEMPLATE)
    or use `indexed`."""
    vectors = clustered(2500, seed=1)
    paths = [f"/photos/{Rows.folder(i)}/{i}.jpg" for i in range(len(vectors))]
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as conn:
        conn.execute(f"CREATE DATABASE {HNSW_TEMPLATE} TEMPLATE {TEMPLATE}")
    with db.connect(Settings(database_url=running.url(HNSW_TEMPLATE), home=pg_home)) as conn:
        ids = insert_vectors(conn, vectors, paths)
    return Rows(vectors, ids, paths)


@dataclass(frozen=True)
class Indexed:
    """A fresh database cloned from hnsw_rows' template: its settings and what it holds."""

    settings: Settings
    rows: Rows


@pytest.fixture
def indexed(pg_home, hnsw_rows, monkeypatch) -> Iterator[Indexed]:
    """Like `settings` (the environment points at it), but the database holds hnsw_rows' rows
    and their HNSW index: a clone, so a test may change it."""
    with fresh_database(pg_home, HNSW_TEMPLATE) as url:
        monkeypatch.setenv("VECSEARCH_DATABASE_URL", url)
        monkeypatch.setenv("VECSEARCH_HOME", str(pg_home))
        yield Indexed(Settings(database_url=url, home=pg_home), hnsw_rows)


@pytest.fixture
def indexed_conn(indexed) -> psycopg.Connection:
    with db.connect(indexed.settings) as connection:
        yield connection


def cli_command(*args: str) -> list[str]:
    """The argv of the real `vecsearch` console entry point (for subprocess.run or Popen)."""
    return [sys.executable, "-c", "from vecsearch.cli import main; main()", *args]


def run_cli(*args: str, env: dict | None = None, check: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `vecsearch` console entry point in a subprocess."""
    result = subprocess.run(
        cli_command(*args),
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"vecsearch {' '.join(args)} failed:\n{result.stderr}")
    return result


# The warning filters of a fresh interpreter (no -W, not a debug build), which pytest replaces.
_PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]
_seeded_networks: dict[int, object] = {}


@contextmanager
def one_seeded_network() -> Iterator[None]:
    """vecsearch.resnet.seeded built once per seed per session, then copied (same parameters,
    same fresh-module state): the ResNet50 build costs seconds, a copy a fraction of one."""
    import copy

    from vecsearch import resnet

    build = resnet.seeded

    def seeded(seed: int):
        if seed not in _seeded_networks:
            _seeded_networks[seed] = build(seed)
        return copy.deepcopy(_seeded_networks[seed])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resnet, "seeded", seeded)
        yield


def invoke_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`vecsearch ARGS` in this process, through the console entry point `vecsearch.cli.main` (its
    parsing, one-line errors and exit codes), with what a new process would start from: the
    environment plus `env`, its own stdout/stderr (not terminals), its consoles made again, Python's
    default warning filters, no cached embedder. What it saves over run_cli is the interpreter
    start, the imports (torch's) and the random-weights ResNet50 build (once per session here).

    For commands whose process is not what is tested; kills, signals, what a process imports,
    servers it starts and races between processes stay with run_cli / cli_command."""
    import io
    import traceback
    import warnings

    import click
    from rich.console import Console

    from vecsearch import cli, embed
    from vecsearch.cli import common

    saved_env, saved_streams, saved_argv = dict(os.environ), (sys.stdout, sys.stderr), sys.argv
    consoles = [(c, dict(vars(c))) for c in (common.out, common.err)]
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape", write_through=True)
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    os.environ.update(env or {})
    sys.stdout, sys.stderr = stdout, stderr
    sys.argv = ["vecsearch", *args]
    try:
        for c, _ in consoles:  # as vecsearch/cli/common.py makes them at import
            vars(c).update(vars(Console(stderr=c.stderr, highlight=False, soft_wrap=True)))
        embed.embedders.cache_clear()  # the CLI's embedder cache: a fresh process has none
        with warnings.catch_warnings(), one_seeded_network(), pytest.MonkeyPatch.context() as patch:
            # click names the program after sys.modules["__main__"], here pytest's
            patch.setattr(click.core, "_detect_program_name", lambda *a, **k: "vecsearch")
            warnings.resetwarnings()
            for action, category, module in reversed(_PYTHON_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = (e.code or 0) & 0xFF
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # uncaught: the interpreter prints the traceback and exits 1
                traceback.print_exc()
                code = 1
    finally:
        sys.stdout, sys.stderr = saved_streams
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for c, state in consoles:
            vars(c).clear()
            vars(c).update(state)

    def text(stream) -> str:  # decoded as subprocess.run(text=True) does, newlines translated
        return io.TextIOWrapper(io.BytesIO(stream.buffer.getvalue()), encoding="utf-8").read()

    result = subprocess.CompletedProcess(["vecsearch", *args], code, text(stdout), text(stderr))
    if check and code != 0:
        raise AssertionError(f"vecsearch {' '.join(args)} failed:\n{result.stderr}")
    return result


def insert_vectors(conn: psycopg.Connection, vectors: np.ndarray,
                   paths: list[str] | None = None) -> list[int]:
    """Bulk-insert embeddings with COPY, rebuilding the HNSW index afterwards (much faster than
    inserting into a live graph); returns the new ids in order. Other columns get dummy values."""
    paths = paths or [f"/synthetic/{i}.jpg" for i in range(len(vectors))]
    definition = hnsw.drop(conn)
    with conn.cursor().copy(
        "COPY images (path, sha256, bytes, width, height, format, mtime, embedding) FROM STDIN"
    ) as copy:
        for i, (path, v) in enumerate(zip(paths, vectors, strict=True)):
            copy.write_row([path, f"{i:064x}", 1000 + i, 64, 48, "JPEG", "2026-01-01", v])
    hnsw.rebuild_index(conn, definition)
    conn.execute("ANALYZE images")
    rows = conn.execute("SELECT id, path FROM images WHERE path = ANY(%s)", [paths]).fetchall()
    by_path = dict((p, i) for i, p in rows)
    return [by_path[p] for p in paths]


def clustered(n: int, seed: int, clusters: int = 40, noise: float = 0.8) -> np.ndarray:
    """Non-negative, clustered, L2-normalised float32 vectors, like ResNet features."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(clusters, db.DIM)))
    v = np.maximum(centres[rng.integers(0, clusters, n)] + rng.normal(scale=noise, size=(n, db.DIM)), 0)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def exact_neighbours(vectors: np.ndarray, ids: list[int], q: np.ndarray, k: int, exclude=(),
                     mask=None) -> list[tuple[int, float]]:
    """numpy reference: [(id, cosine distance)] of the k nearest, in float64."""
    v = vectors.astype(np.float64)
    q = np.asarray(q, dtype=np.float64)
    d = 1 - v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    excluded = set(exclude)
    keep = np.array([i not in excluded for i in ids]) & (mask if mask is not None else True)
    order = [j for j in np.argsort(d, kind="stable") if keep[j]][:k]
    return [(ids[j], d[j]) for j in order]


@pytest.fixture(scope="session")
def embedder():
    """One `--weights random` Embedder for the whole session (torch import + build: ~5-8 s), on the
    fp32 reference path: tests compare its vectors exactly (the engine choice has its own tests)."""
    import warnings

    from vecsearch.embed import Embedder, RandomWeightsWarning

    with warnings.catch_warnings(), one_seeded_network():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return Embedder(weights="random", precision="fp32").prepare()


@dataclass(frozen=True)
class Gallery:
    """A database of a few real pictures, loaded through `vecsearch.load` (the web tests' data)."""

    settings: Settings
    folder: Path
    ids: dict[str, int]  # path relative to `folder` -> image id


@pytest.fixture(scope="module")
def web_gallery(pg_home, embedder, tmp_path_factory) -> Iterator[Gallery]:
    """Eight images: a..d, a near-copy of a, an EXIF-rotated JPEG, a name that needs HTML
    escaping, one in a sub-folder. Its own database and home (for the thumbnail cache)."""
    from PIL import ImageFilter

    from vecsearch.load import load

    folder = tmp_path_factory.mktemp("gallery")
    for seed, name in enumerate("abcd", start=1):
        make_image(folder / f"{name}.png", seed=seed)
    Image.open(folder / "a.png").filter(ImageFilter.GaussianBlur(1)).save(folder / "a_copy.jpg", quality=85)
    landscape = Image.open(make_image(tmp_path_factory.mktemp("src") / "r.png", seed=6, size=(320, 160)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display (portrait)
    landscape.save(folder / "rotated.jpg", exif=exif.tobytes())
    make_image(folder / "odd <name> & 'q'.png", seed=7)
    make_image(folder / "sub" / "b_sub.png", seed=8)
    with fresh_database(pg_home) as url:
        settings = Settings(database_url=url, home=tmp_path_factory.mktemp("webhome"))
        summary = load(settings, folder, embedder, workers=0)
        assert summary.failed == [] and summary.new == 8, summary.describe()
        with db.connect(settings) as conn:
            rows = conn.execute("SELECT path, id FROM images").fetchall()
        yield Gallery(settings, folder, {str(Path(p).relative_to(folder)): i for p, i in rows})


def nested_plans(conn: psycopg.Connection, sql: str, params) -> str:
    """The plans of every statement run inside `sql`, from auto_explain, as NOTICEs."""
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
        conn.execute(f"SET auto_explain.{setting}")
    conn.execute(sql, params).fetchall()
    conn.execute("SET auto_explain.log_min_duration = -1")
    return "\n".join(notices)


def make_dng(path: Path, rgb: np.ndarray, orientation: int = 1, claim: tuple[int, int] | None = None) -> Path:
    """A minimal uncompressed Bayer (RGGB) DNG of an RGB uint8 array (even sides), as a camera
    writes one (libraw reads it); `claim`: the (width, height) its header states instead."""
    h, w, _ = rgb.shape
    wide = rgb.astype(np.uint16) * 257
    cfa = np.empty((h, w), np.uint16)
    cfa[0::2, 0::2], cfa[0::2, 1::2] = wide[0::2, 0::2, 0], wide[0::2, 1::2, 1]
    cfa[1::2, 0::2], cfa[1::2, 1::2] = wide[1::2, 0::2, 1], wide[1::2, 1::2, 2]
    data = cfa.astype("<u2").tobytes()
    short, long, byte, text, rational, srational = 3, 4, 1, 2, 5, 10
    cw, ch = claim or (w, h)
    tags = {  # tag: (TIFF type, values)
        254: (long, [0]), 256: (long, [cw]), 257: (long, [ch]), 258: (short, [16]), 259: (short, [1]),
        262: (short, [32803]), 271: (text, "vecsearch"), 272: (text, "test camera"), 273: (long, [0]),
        274: (short, [orientation]), 277: (short, [1]), 278: (long, [h]), 279: (long, [len(data)]),
        284: (short, [1]), 33421: (short, [2, 2]), 33422: (byte, [0, 1, 1, 2]),
        50706: (byte, [1, 4, 0, 0]), 50707: (byte, [1, 1, 0, 0]), 50708: (text, "vecsearch test camera"),
        50717: (long, [65535]),  # WhiteLevel
        50721: (srational, [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]),
        50728: (rational, [(1, 1), (1, 1), (1, 1)]),  # AsShotNeutral
        50778: (short, [21]),  # CalibrationIlluminant1: D65
    }
    codes = {short: "H", long: "I", byte: "B"}
    encoded = {}
    for tag, (kind, values) in tags.items():
        if kind == text:
            raw = values.encode() + b"\0"
        elif kind in (rational, srational):
            raw = b"".join(struct.pack("<II" if kind == rational else "<ii", *v) for v in values)
        else:
            raw = struct.pack("<" + codes[kind] * len(values), *values)
        encoded[tag] = (kind, len(raw) if kind == text else len(values), raw)
    ifd_size = 2 + 12 * len(tags) + 4
    extra, entries = b"", []
    for tag, (kind, count, raw) in sorted(encoded.items()):
        if len(raw) > 4:
            offset = 8 + ifd_size + len(extra)
            extra += raw + b"\0" * (len(raw) % 2)
            raw = struct.pack("<I", offset)
        entries.append([tag, kind, count, raw.ljust(4, b"\0")])
    for entry in entries:
        if entry[0] == 273:  # StripOffsets: the pixels come last
            entry[3] = struct.pack("<I", 8 + ifd_size + len(extra))
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", t, k, c) + v for t, k, c, v in entries)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra + data)
    return path


@dataclass
class Counted:
    calls: int = 0
    items: int = 0  # the lengths of the calls' first arguments (images, arrays)


def counting(monkeypatch, owner: Any, name: str) -> Counted:
    """Count the calls of `owner.name` (an instance's method or a class's) for the rest of the test,
    and the items they were given: how tests see model work without counters in the product."""
    counted, original = Counted(), getattr(owner, name)

    def counted_call(*args, **kwargs):
        counted.calls += 1
        counted.items += len(args[0]) if args and hasattr(args[0], "__len__") else 0
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted_call)
    return counted
