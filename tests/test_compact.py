"""The compact index (migrations 0006, 0007, vecsearch/compact.py): a graph over a PCA reduction
fitted on the table's own rows, its candidates re-ranked by the full vector."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
from conftest import TEMPLATE, exact_neighbours, fresh_database, insert_vectors

from vecsearch import compact, db, hnsw, recall, server
from vecsearch.config import Settings
from vecsearch.limits import DIM

CHEAP = {"m": 8, "ef_construction": 32}  # a small graph, where the test is not about recall


def low_rank(n: int, seed: int, rank: int = 24, clusters: int = 30) -> np.ndarray:
    """Clustered vectors whose variance lives in `rank` directions (as CNN features mostly do)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, rank)))[0].T
    centres = rng.normal(size=(clusters, rank)) * 3
    coords = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, rank))
    v = coords @ basis + 8 / np.sqrt(DIM) + rng.normal(scale=0.002, size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def isotropic(n: int, seed: int) -> np.ndarray:
    """No low-dimensional structure at all: no projection keeps the neighbours."""
    v = np.random.default_rng(seed).normal(size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def ann(conn, q, k=10, **kw) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT id FROM vecsearch_similar_to(%s::vector, %s, ef_search => %s)",
        [str(q.tolist()), k, kw.get("ef_search")])]


def ann_excluding(conn, q, image_id, k=10) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT id FROM vecsearch_similar_to(%s::vector, %s, exclude => %s)",
        [str(q.tolist()), k, [image_id]])]


def hnsw_names(conn) -> list[str]:
    return [r[0] for r in conn.execute(
        f"SELECT c.relname FROM {hnsw.HNSW_INDEXES} AND i.indrelid = 'images'::regclass")]


LOW_RANK_TEMPLATE = "vs_template_low_rank"


@pytest.fixture(scope="module")
def low_rank_rows(pg_home) -> tuple[np.ndarray, list[int]]:
    """A template database: the migrated one plus low_rank(2000, seed=7) and their full-width
    HNSW index, built once for this module."""
    vectors = low_rank(2000, seed=7)
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {LOW_RANK_TEMPLATE}")
        admin.execute(f"CREATE DATABASE {LOW_RANK_TEMPLATE} TEMPLATE {TEMPLATE}")
    with db.connect(Settings(database_url=running.url(LOW_RANK_TEMPLATE), home=pg_home)) as c:
        ids = insert_vectors(c, vectors)
    return vectors, ids


@pytest.fixture
def settings(pg_home, monkeypatch, request) -> Settings:
    """conftest's `settings`, but a test that asks for `rows` gets a clone of the low-rank template."""
    template = TEMPLATE
    if "rows" in request.fixturenames:
        request.getfixturevalue("low_rank_rows")
        template = LOW_RANK_TEMPLATE
    with fresh_database(pg_home, template) as url:
        monkeypatch.setenv("VECSEARCH_DATABASE_URL", url)
        monkeypatch.setenv("VECSEARCH_HOME", str(pg_home))
        yield Settings(database_url=url, home=pg_home)


@pytest.fixture
def rows(settings, low_rank_rows) -> tuple[np.ndarray, list[int]]:
    """2,000 low-rank rows and their HNSW index in this test's own database (a clone)."""
    vectors, ids = low_rank_rows
    return vectors.copy(), list(ids)


def test_reindex_dims_fits_stores_and_versions_a_projection_that_sql_and_numpy_agree_on(conn, rows):
    vectors, ids = rows
    done = hnsw.reindex(conn, dims=64)
    assert done.dims == 64 and hnsw_names(conn) == ["images_reduced_hnsw"]
    version, dims, fitted_on, retained = conn.execute(
        "SELECT version, dims, fitted_on, retained FROM vecsearch_projection WHERE in_use").fetchone()
    assert (dims, fitted_on) == (64, 2000) and retained > 0.95
    assert conn.execute("SELECT count(*) FROM images WHERE reduced_version = %s",
                        [version]).fetchone()[0] == 2000
    projection = compact.in_use(conn)
    q = low_rank(1, seed=99)[0]
    in_sql = conn.execute("SELECT vecsearch_reduce(%s::vector, %s)", [str(q.tolist()), version]).fetchone()[0]
    assert np.allclose(in_sql.to_numpy(), projection.reduce(q).astype(np.float32), atol=2e-3)
    stored = conn.execute("SELECT reduced FROM images WHERE id = %s", [ids[5]]).fetchone()[0]
    assert np.allclose(stored.to_numpy(), projection.reduce(vectors[5]).astype(np.float32), atol=2e-3)
    # Answers: the exact re-rank of the graph's candidates; the full-precision distances.
    hits = 0
    for j in range(20):
        q = vectors[j] + np.random.default_rng(j).normal(scale=0.01, size=DIM).astype(np.float32)
        want = [i for i, _ in exact_neighbours(vectors, ids, q, 10)]
        hits += len(set(ann(conn, q)) & set(want))
    assert hits / 200 >= 0.95
    # A second fit is a new version; the old one is gone with its graph.
    hnsw.reindex(conn, dims=32)
    assert conn.execute("SELECT array_agg(version), array_agg(dims) FROM vecsearch_projection").fetchone() \
        == ([version + 1], [32])
    assert conn.execute("SELECT count(DISTINCT reduced_version) FROM images").fetchone()[0] == 1
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT id FROM images i WHERE i.reduced_version = %s "
        "ORDER BY i.reduced::halfvec(32) <-> (SELECT reduced FROM images LIMIT 1)::halfvec(32) LIMIT 10"
        % (version + 1)))
    assert "images_reduced_hnsw" in plan
    hnsw.reindex(conn, dims="full")
    assert hnsw_names(conn) == ["images_embedding_hnsw"]
    assert conn.execute("SELECT count(*) FROM vecsearch_projection").fetchone()[0] == 0


def test_rows_written_by_plain_sql_are_found_at_once_and_in_the_graph_after_reindex(conn, rows):
    vectors, ids = rows
    hnsw.reindex(conn, dims=48, **CHEAP)
    fresh = low_rank(2020, seed=7)[2000:]  # more rows of the same kind, not in the table
    etl = fresh[:5]
    conn.execute("DROP INDEX images_reduced_hnsw")  # an ETL that dropped it for its bulk COPY
    with conn.cursor().copy("COPY images (path, sha256, bytes, width, height, format, mtime, embedding) "
                            "FROM STDIN") as copy:
        for i, v in enumerate(etl):
            copy.write_row([f"/etl/{i}.jpg", f"{i:064x}", 10, 4, 4, "PNG", "2026-01-01", v])
    hnsw.reindex(conn, **CHEAP)  # no HNSW index at all: still works, keeps the representation
    assert hnsw_names(conn) == ["images_reduced_hnsw"]
    more = fresh[5:8]
    conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                 "SELECT '/etl/late' || n || '.jpg', md5(n::text), 1, 1, 1, 'PNG', now(), v::vector "
                 "FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, n)", [[str(v.tolist()) for v in more]])
    late = conn.execute("SELECT id FROM images WHERE path LIKE '/etl/late%%' ORDER BY path").fetchall()
    assert conn.execute("SELECT count(*) FROM images WHERE reduced IS NULL").fetchone()[0] == 3
    for (late_id,), v in zip(late, more, strict=True):
        assert ann(conn, v, 1) == [late_id]  # not in the graph yet: the exact pass finds it
    # An UPDATE of a vector by SQL drops the row's reduced vector, so it is answered exactly too.
    moved = fresh[10]
    conn.execute("UPDATE images SET embedding = %s::vector WHERE id = %s", [str(moved.tolist()), ids[0]])
    assert conn.execute("SELECT reduced FROM images WHERE id = %s", [ids[0]]).fetchone()[0] is None
    assert ann(conn, moved, 1) == [ids[0]]
    hnsw.reindex(conn, **CHEAP)
    assert conn.execute("SELECT count(*) FROM images WHERE reduced IS NULL").fetchone()[0] == 0
    for (late_id,), v in zip(late, more, strict=True):
        assert ann(conn, v, 1) == [late_id]


def test_a_load_writes_reduced_vectors_of_the_projection_in_use(settings, conn, embedder, tmp_path):
    from conftest import make_image

    from vecsearch.load import load

    folder = tmp_path / "photos"
    for i in range(6):
        make_image(folder / f"{i}.png", i)
    load(settings, folder, embedder, workers=0)
    insert_vectors(conn, low_rank(500, seed=3))  # synthetic rows, so there is enough to fit on
    hnsw.reindex(conn, dims=16, **CHEAP)
    for i in range(6, 9):
        make_image(folder / f"{i}.png", i)
    assert load(settings, folder, embedder, workers=0).new == 3
    version = conn.execute("SELECT version FROM vecsearch_projection WHERE in_use").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM images WHERE reduced_version IS DISTINCT FROM %s",
                        [version]).fetchone()[0] == 0
    new = conn.execute("SELECT id FROM images WHERE path = %s", [str(folder / "7.png")]).fetchone()[0]
    assert [r[0] for r in conn.execute("SELECT id FROM vecsearch_similar(%s, 2)", [new])] == \
        [r[0] for r in conn.execute("SELECT id FROM vecsearch_similar(%s, 2, exact => true)", [new])]


def test_auto_keeps_a_compact_index_where_it_measures_well_and_full_where_it_does_not(
        conn, monkeypatch):
    monkeypatch.setattr(compact, "AUTO_MIN_ROWS", 1000)
    monkeypatch.setattr(compact, "DIMS", (16, 32, 64))
    monkeypatch.setattr(recall, "AUTO_QUERIES", 30)
    insert_vectors(conn, low_rank(1500, seed=11))
    done = hnsw.reindex(conn, dims="auto")
    assert done.dims in (16, 32, 64) and done.recall >= recall.TARGET, done.reason
    assert "measured recall@10" in done.reason and "compact" in compact.describe(conn)
    assert f"{done.dims} dims, the smallest whose screen reached" in done.reason, done.reason
    assert db.database_ef_search(conn) == done.ef_search

    conn.execute("TRUNCATE images")
    insert_vectors(conn, isotropic(1500, seed=12))
    done = hnsw.reindex(conn, dims="auto")
    assert done.dims is None and "no reduction kept recall" in done.reason, done.reason
    assert hnsw_names(conn) == ["images_embedding_hnsw"]
    assert compact.describe(conn).startswith("full")


def test_auto_prefers_a_larger_d_that_needs_a_shallow_re_rank_to_a_smaller_one_that_needs_a_deep_one(
        conn, monkeypatch):
    monkeypatch.setattr(compact, "AUTO_MIN_ROWS", 1000)
    monkeypatch.setattr(compact, "DIMS", (8, 16, 32))
    monkeypatch.setattr(compact, "SCREEN_DEPTHS", (12, 300))
    monkeypatch.setattr(recall, "AUTO_QUERIES", 30)
    insert_vectors(conn, low_rank(1500, seed=13))  # rank 24: 32 dims keep it all, 8 and 16 do not
    sample_ids, sample = compact.sample(conn)
    bounds = compact.screen(conn, compact.fit(sample, 32), sample, sample_ids)
    assert bounds[16][300] >= compact.SCREEN_TARGET > bounds[16][12], bounds  # the data is as meant
    assert bounds[32][12] >= compact.SCREEN_TARGET, bounds
    done = hnsw.reindex(conn, dims="auto")
    assert done.dims == 32 and "with a 12-deep re-rank (" in done.reason, done.reason
    assert " after " not in done.reason  # built first, not after 8 or 16 missed
    assert conn.execute("SELECT max(version) FROM vecsearch_projection").fetchone()[0] == 1


def test_auto_keeps_the_full_index_on_a_small_table(conn, rows):
    done = hnsw.reindex(conn, dims="auto")
    assert done.dims is None and f"under {compact.AUTO_MIN_ROWS}" in done.reason


def test_bad_dims_is_one_line(conn, rows):
    from vecsearch.errors import InvalidInput

    for bad in ("0", "2001", "many"):
        with pytest.raises(InvalidInput, match="--dims"):
            hnsw.reindex(conn, dims=bad)


KILLED_REFIT = """
import sys
from vecsearch import compact, db, hnsw
from vecsearch.config import Settings
real = compact.fill
def fill(conn, projection, **kw):
    n = real(conn, projection, **kw)
    print("filled", flush=True)
    import time; time.sleep(60)
    return n
compact.fill = fill
with db.connect(Settings.from_env()) as conn:
    hnsw.reindex(conn, 8, 32, dims=16)
"""


def test_a_kill_during_a_refit_leaves_the_old_index_and_projection_working(settings, conn, rows):
    vectors, ids = rows
    hnsw.reindex(conn, dims=32, **CHEAP)
    before = conn.execute("SELECT version FROM vecsearch_projection WHERE in_use").fetchone()[0]
    q = vectors[3]
    answer = ann(conn, q)
    child = subprocess.Popen([sys.executable, "-c", KILLED_REFIT, settings.database_url],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "filled"
        assert ann(conn, q) == answer  # readers go on during the refit
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 30
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND pid <> pg_backend_pid() AND state <> 'idle'").fetchone()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert conn.execute("SELECT array_agg(version) FROM vecsearch_projection").fetchone()[0] == [before]
    assert hnsw_names(conn) == ["images_reduced_hnsw"]
    assert conn.execute("SELECT count(*) FROM images WHERE reduced_version = %s",
                        [before]).fetchone()[0] == 2000
    assert ann(conn, q) == answer
    hnsw.reindex(conn, dims=16, **CHEAP)  # and the next refit works
    assert conn.execute("SELECT dims FROM vecsearch_projection WHERE in_use").fetchone()[0] == 16


def test_reader_logins_can_query_a_compact_index(settings, conn, rows):
    from vecsearch import logins

    hnsw.reindex(conn, dims=32, **CHEAP)
    password = logins.create(conn, "compact_reader")
    url = logins.url(settings, conn, "compact_reader", password)
    with psycopg.connect(url, autocommit=True) as r:
        got = r.execute("SELECT id FROM vecsearch_similar(%s, 5)", [rows[1][0]]).fetchall()
        assert len(got) == 5
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            r.execute("UPDATE vecsearch_projection SET in_use = false")


def test_cli_reindex_dims_then_status_and_recall_say_what_is_in_use(settings, conn, rows):
    from conftest import invoke_cli

    result = invoke_cli("db", "reindex", "--dims", "16")
    assert result.returncode == 0, result.stderr
    assert "compact: PCA to 16 dims" in result.stdout
    status = invoke_cli("db", "status", check=True).stdout
    assert "compact: PCA to 16 dims" in status and "bytes per row" in status
    per_row = int(status.split(" bytes per row")[0].rsplit(" ", 1)[1])
    assert per_row < 2048  # a full-width graph costs 8 KB a row
    measured = invoke_cli("db", "recall", "--sample", "20", check=True).stdout
    assert "recall@10" in measured and "compact: PCA to 16 dims" in measured
    bad = invoke_cli("db", "reindex", "--dims", "lots")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--dims" in bad.stderr


def test_a_query_by_id_starts_from_the_rows_own_reduced_vector_and_reranks_the_tuned_depth(
        conn, rows):
    vectors, ids = rows
    hnsw.reindex(conn, dims=32)
    by_id = [[r[0] for r in conn.execute("SELECT id FROM vecsearch_similar(%s, 10)", [i])] for i in ids[:20]]
    by_vector = [ann_excluding(conn, vectors[j], ids[j]) for j in range(20)]
    assert by_id == by_vector  # the stored reduced vector and vecsearch_reduce() agree
    # The stored one is what the graph search starts from: give row 0 the reduced vector of a row
    # of another cluster and its by-id candidates come from there (re-ranked by its own vector).
    far = int(np.argmin(vectors[1:] @ vectors[0])) + 1
    conn.execute("UPDATE images SET reduced = (SELECT reduced FROM images WHERE id = %s) WHERE id = %s",
                 [ids[far], ids[0]])
    moved = [r[0] for r in conn.execute("SELECT id FROM vecsearch_similar(%s, 10)", [ids[0]])]
    assert len(set(moved) & set(by_id[0])) < 5
    # A re-rank depth: fewer candidates read, still exact distances in order.
    compact.set_rerank(conn, 20)
    got = conn.execute("SELECT id, distance FROM vecsearch_similar(%s, 10)", [ids[3]]).fetchall()
    exact = dict(exact_neighbours(vectors, ids, vectors[3], len(ids)))
    assert [d for _, d in got] == sorted(d for _, d in got)
    assert all(abs(exact[i] - d) < 1e-5 for i, d in got)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE vecsearch_projection SET rerank = 0 WHERE in_use")


def test_tune_on_a_compact_index_keeps_the_fewest_candidates_that_hold_the_recall(settings, conn, rows):
    from conftest import invoke_cli

    hnsw.reindex(conn, dims=32)
    ids = recall.sample(conn, 30, seed=2)
    chosen, measured = recall.tune(conn, ids)
    best = measured[-1]
    assert best.recall >= recall.TARGET and best.ef_search == chosen
    assert best.rerank is not None and best.rerank < chosen and compact.rerank(conn) == best.rerank
    assert f"the nearest {best.rerank} candidates" in compact.describe(conn)
    printed = invoke_cli("db", "recall", "--sample", "20", check=True).stdout
    assert f"re-rank {best.rerank}:" in printed
    hnsw.reindex(conn, dims=32)  # a new projection starts again from every candidate
    assert compact.rerank(conn) is None


def test_the_screen_runs_over_the_whole_table_and_equals_numpy(conn, monkeypatch):
    vectors = low_rank(1800, seed=21)
    ids = insert_vectors(conn, vectors)
    monkeypatch.setattr(compact, "PASS_ROWS", 500)  # several blocks, the last one short
    sample_ids, sample = compact.sample(conn, 600)
    fitted = compact.fit(sample, 32)
    got = compact.screen(conn, fitted, sample, sample_ids, dims=(4, 32), queries=40, depths=(12, 30))
    # The same by brute force over all 1800 rows.
    rng = np.random.default_rng(0)
    picked = rng.choice(len(sample), size=40, replace=False)
    q = np.vstack([sample[picked[:20]], compact.held_out(sample[picked[20:]], 0)])
    row_of = {image_id: j for j, image_id in enumerate(ids)}
    own = [row_of[sample_ids[p]] for p in picked[:20]] + [None] * 20
    exact = 1 - q @ vectors.T / np.linalg.norm(vectors, axis=1)
    rx, rq = fitted.reduce(vectors).astype(np.float32), fitted.reduce(q).astype(np.float32)
    for (d, depth) in [(d, depth) for d in (4, 32) for depth in (12, 30)]:
        far = ((rq[:, None, :d] - rx[None, :, :d]) ** 2).sum(2)
        hits = 0
        for j in range(40):
            e, f = exact[j].copy(), far[j].copy()
            if own[j] is not None:
                e[own[j]] = f[own[j]] = np.inf
            candidates = np.argsort(f, kind="stable")[:depth]
            found = candidates[np.argsort(e[candidates], kind="stable")[:10]]
            hits += len(set(found) & set(np.argsort(e, kind="stable")[:10]))
        assert abs(got[d][depth] - hits / 400) < 0.01, (d, depth, got[d][depth], hits / 400)
    assert got[4][30] < got[32][30] and got[4][12] <= got[4][30]


def test_auto_builds_the_d_that_needs_the_shallow_re_rank_before_a_smaller_one_that_needs_more():
    bounds = {64: {100: 0.41, 400: 0.84}, 256: {100: 0.96, 400: 0.998},
              512: {100: 0.999, 400: 1.0}, 1024: {100: 1.0, 400: 1.0}}
    assert compact.screened(bounds) == [(512, 100), (1024, 100), (256, 400)]
    assert compact.screened({128: {100: 0.9, 400: 0.996}, 256: {100: 0.99, 400: 1.0}}) == \
        [(128, 400), (256, 400)]
    assert compact.screened({128: {100: 0.5, 400: 0.9}}) == [] and compact.screened({}) == []
    assert compact.screened({256: {400: 0.999}, 512: {100: 0.996}}) == [(512, 100), (256, 400)]
    assert compact.describe_screen({}, 10) == "no d screened"
    assert "256: - / 0.999" in compact.describe_screen({256: {400: 0.999}, 512: {100: 0.996}}, 10)
    said = compact.describe_screen(bounds, 1000)
    assert "nearest 100 / 400" in said and "256: 0.960 / 0.998" in said
