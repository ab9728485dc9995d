"""Limits and defaults of a neighbour query, in one place: the CLI, the web app, dupes, eval, the
benchmarks and the tests import them from here. The SQL functions of the newest migration carry the
same numbers (a migration is frozen history, so it holds its own copy); tests/test_foundation.py
checks they agree."""

from __future__ import annotations

from datetime import UTC, datetime

from .errors import InvalidInput

DIM = 2048  # ResNet50's pooled output; the `vector(2048)` column
MAX_K = 1000  # neighbours one query returns at most
DEFAULT_K = 10
WEB_MAX_K = 100  # a page of the web gallery shows at most this many neighbours
WEB_DEFAULT_K = 12
# Graph candidates per query (hnsw.ef_search, which accepts 1..1000): docs/benchmarks.md has the
# recall and latency this buys.
DEFAULT_EF_SEARCH = 200
MAX_EF_SEARCH = 1000
# A path prefix (`under`) matching fewer rows than this is answered by an exact scan of those rows.
EXACT_BELOW = 2000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # file mtimes are stored as timestamptz from this
WEB_PORT = 8000
WEB_MAX_UPLOAD_MB = 20
RESTORE_WAIT_S = 60  # `db restore` waits this long for other sessions using the tables


def check_k(k: int) -> int:
    """`k` if a neighbour query accepts it, else InvalidInput (before any slow work)."""
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K}, not {k}")
    return k


def check_ef_search(ef_search: int) -> int:
    """`ef_search` if hnsw.ef_search accepts it, else InvalidInput (before any slow work)."""
    if not 1 <= ef_search <= MAX_EF_SEARCH:
        raise InvalidInput(f"ef-search must be between 1 and {MAX_EF_SEARCH}, not {ef_search}")
    return ef_search


def check_query(k: int, ef_search: int | None = None) -> int | None:
    """Check k and ef_search; returns the ef_search to pass (None: the database's own, set by
    `vecsearch db recall --tune`, else DEFAULT_EF_SEARCH, which the SQL functions decide)."""
    check_k(k)
    return None if ef_search is None else check_ef_search(ef_search)
