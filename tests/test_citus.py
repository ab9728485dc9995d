"""vecsearch on a real Citus cluster: a coordinator and two workers, embedded servers private to
this test run (vecsearch/cluster.py), stopped at the end. Skipped, with one line, where Citus is
not built into the embedded PostgreSQL (`./dev citus SOURCE`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import clustered, insert_vectors, make_image, run_cli
from fastapi.testclient import TestClient
from test_crash import Run, assert_same_rows, count, table, wait_for

from vecsearch import citus, db, hnsw, query, server, web
from vecsearch import cluster as cluster_mod
from vecsearch.config import Settings
from vecsearch.errors import InvalidInput
from vecsearch.progress import Progress

pytestmark = pytest.mark.citus

# Every table and vecsearch function of the public schema: each migration may add its own.
DROP = """
DO $$
DECLARE t text;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('DROP TABLE IF EXISTS public.%I CASCADE', t);
    END LOOP;
END $$;
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
             AND p.proname LIKE 'vecsearch\\_%' LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END $$;
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> cluster_mod.Cluster:
    missing = cluster_mod.citus_built()
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("citus")
    started = cluster_mod.start(root, workers=2)
    yield started
    cluster_mod.stop(root)


@pytest.fixture
def url(cluster) -> str:
    """The coordinator's vecsearch database, emptied and migrated again (not yet distributed)."""
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(DROP)
    db.upgrade(cluster.url)
    return cluster.url


def connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    db.register_vector(conn)
    return conn


def env(url: str, tmp_path: Path) -> dict:
    return {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(tmp_path / "home")}


def test_the_cluster_is_real_and_distribute_is_idempotent(url, tmp_path):
    with connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()[0] == 2
        assert not citus.is_distributed(conn)
    e = env(url, tmp_path)
    first = run_cli("db", "distribute", env=e, check=True).stdout
    assert "images distributed by path over 4 shards on 2 workers" in first
    assert "embedding_model is a reference table" in first
    assert "already distributed: images has 4 shards" in run_cli("db", "distribute", env=e, check=True).stdout
    refused = run_cli("db", "distribute", "--shards", "6", env=e)
    assert refused.returncode == 1 and "already has 4 shards" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    with connect(url) as conn:
        assert citus.shard_count(conn) == 4
        # One HNSW index per shard, built on the workers.
        indexes = conn.execute("SELECT result FROM run_command_on_shards('images', $$SELECT count(*) FROM "
                               "pg_indexes WHERE tablename = '%s' AND indexdef LIKE '%%USING hnsw%%'$$)")
        assert [r[0] for r in indexes] == ["1"] * 4


def test_same_answers_as_single_node(url, conn):
    """The same vectors in a single PostgreSQL and in the cluster: identical top-k under `exact`,
    with `under` and `exclude` too; ANN recall against exact as on one node."""
    vectors = clustered(3000, seed=21)
    paths = [f"/lib/{i % 5}/{i:05d}.jpg" for i in range(len(vectors))]
    single = dict(zip(paths, insert_vectors(conn, vectors, paths), strict=True))
    with connect(url) as cconn:
        citus.distribute(cconn, shards=4)
        distributed = dict(zip(paths, insert_vectors(cconn, vectors, paths), strict=True))
        path_of = {v: k for k, v in distributed.items()}
        single_path = {v: k for k, v in single.items()}
        rng = np.random.default_rng(3)
        recalls = []
        for probe in rng.choice(len(paths), 25, replace=False):
            p = paths[probe]
            a = query.similar(conn, single[p], 10, exact=True)
            b = query.similar(cconn, distributed[p], 10, exact=True)
            assert [single_path[x.id] for x in a] == [path_of[x.id] for x in b]
            assert np.allclose([x.distance for x in a], [x.distance for x in b], atol=1e-12)
            ann = query.similar(cconn, distributed[p], 10)
            recalls.append(len({x.id for x in ann} & {x.id for x in b}) / 10)
            a = query.similar(conn, single[p], 10, exact=True, under="/lib/2")
            b = query.similar(cconn, distributed[p], 10, exact=True, under="/lib/2")
            assert [single_path[x.id] for x in a] == [path_of[x.id] for x in b]
            assert all(path_of[x.id].startswith("/lib/2/") for x in b)
        assert np.mean(recalls) >= 0.95, recalls
        # A held-out vector (not a row), with ids excluded, ANN with the `under` filter.
        q = clustered(1, seed=99)[0]
        skip = [distributed[p] for p in paths[:50]]
        b = query.similar_to(cconn, q, 20, exact=True, exclude=skip)
        a = query.similar_to(conn, q, 20, exact=True, exclude=[single[p] for p in paths[:50]])
        assert [single_path[x.id] for x in a] == [path_of[x.id] for x in b]
        assert not set(skip) & {x.id for x in b}
        filtered = query.similar_to(cconn, q, 20, under="/lib/3")  # 600 rows: the exact path
        assert [x.id for x in filtered] == [x.id for x in query.similar_to(cconn, q, 20, under="/lib/3",
                                                                           exact=True)]


def _sent(conn: psycopg.Connection, sql: str, params) -> tuple[list, list[str]]:
    """Rows of `sql`, and the commands the coordinator sent to the workers for it."""
    notices: list[str] = []
    # Each remote command with its connection ("on server USER@HOST:PORT connectionId: N").
    conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary or ''} [{d.message_detail}]"))
    conn.execute("SET citus.log_remote_commands = on")
    conn.execute("SET client_min_messages = log")
    rows = conn.execute(sql, params).fetchall()
    conn.execute("RESET client_min_messages")
    conn.execute("RESET citus.log_remote_commands")
    return rows, notices


def _settings_reached_the_shards(notices: list[str], ef: int) -> None:
    """Each worker connection that ran a shard query got the SET LOCALs before it (with its
    BEGIN, or on its own when the connection was already in the transaction), and the workers'
    defaults back afterwards. Connections interleave: the executor may open one mid-query."""
    def connection(notice: str) -> str:
        return notice.rsplit(" [", 1)[-1]

    issued = [(i, n) for i, n in enumerate(notices) if n.startswith("issuing")]
    searches = [i for i, n in issued if "ORDER BY" in n and "halfvec" in n]
    assert len({connection(notices[i]) for i in searches}) >= 2, notices  # the shards of both workers
    for command in (f"SET LOCAL hnsw.ef_search = {ef}", "SET LOCAL hnsw.iterative_scan = relaxed_order",
                    "SET LOCAL enable_seqscan = off"):
        for search in searches:
            on = connection(notices[search])
            assert any(command in n and connection(n) == on for i, n in issued if i < search), (command, on)
    last = [n for n in notices if "hnsw.ef_search" in n][-1]
    assert "SET LOCAL hnsw.ef_search TO DEFAULT" in last, last


def test_ef_search_reaches_the_workers_and_the_caller_is_unchanged(url):
    with connect(url) as conn:
        citus.distribute(conn, shards=4)
        vectors = clustered(300, seed=5)
        ids = insert_vectors(conn, vectors)
        conn.execute("SET hnsw.ef_search = 77")
        # In autocommit (a plain `SELECT * FROM vecsearch_similar_to(...)` from any SQL client).
        rows, notices = _sent(conn, "SELECT * FROM vecsearch_similar_to(%s, 5, ef_search => 345)",
                              [vectors[0]])
        assert len(rows) == 5
        _settings_reached_the_shards(notices, 345)
        # In the caller's own transaction, by id.
        with conn.transaction():
            rows, notices = _sent(conn, "SELECT * FROM vecsearch_similar(%s, 5, ef_search => 456)", [ids[0]])
            assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "77"
            assert conn.execute("SHOW citus.propagate_set_commands").fetchone()[0] == "none"
        assert len(rows) == 5
        _settings_reached_the_shards(notices, 456)
        assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "77"
        assert conn.execute("SHOW citus.propagate_set_commands").fetchone()[0] == "none"


def test_cli_end_to_end_on_the_cluster_with_split_loads(url, tmp_path, embedder):
    """distribute before the first load, two loaders (--shard 1/2, 2/2), then every command
    (eval works in its scratch schema, tables local to the coordinator)."""
    folder = tmp_path / "photos"
    for i in range(14):
        make_image(folder / f"p{i:02d}.png", seed=300 + i, size=(96, 80))
    shutil.copy(folder / "p03.png", folder / "copy_of_p03.png")
    e = env(url, tmp_path)
    run_cli("db", "distribute", env=e, check=True)
    a = run_cli("load", str(folder), "--weights", "random", "--shard", "1/2", env=e, check=True)
    b = run_cli("load", str(folder), "--weights", "random", "--shard", "2/2", env=e, check=True)
    assert "(share 1/2)" in a.stderr and "(share 2/2)" in b.stderr
    with connect(url) as conn:
        paths = {r[0] for r in conn.execute("SELECT path FROM images")}
        assert paths == {str(p) for p in folder.iterdir()}
        assert citus.is_distributed(conn) and hnsw.hnsw_index(conn) is not None
        image_id = conn.execute("SELECT id FROM images WHERE path = %s",
                                [str(folder / "p05.png")]).fetchone()[0]
    status = run_cli("db", "status", env=e, check=True).stdout
    workers = [line for line in status.splitlines() if line.startswith("worker:")]
    assert len(workers) == 2 and sum(int(w.split(" shards, ")[1].split()[0]) for w in workers) == 15
    assert "images distributed by path over 4 shards" in status

    similar = run_cli("similar", str(image_id), "-k", "3", "--format", "json", env=e, check=True)
    assert similar.stdout.count('"id"') == 3
    outside = shutil.copy(folder / "p05.png", tmp_path / "outside.png")  # not a row: nothing excluded
    search = run_cli("search", str(outside), "-k", "1", "--format", "paths",
                     "--weights", "random", env=e, check=True)
    assert search.stdout.strip() == str(folder / "p05.png")
    arithmetic = run_cli("similar", f"{image_id} + {image_id}", "-k", "2", env=e, check=True)
    assert "rank" in arithmetic.stdout
    dupes = run_cli("dupes", "--threshold", "0.0001", "--format", "json", env=e, check=True)
    assert "copy_of_p03.png" in dupes.stdout and "p03.png" in dupes.stdout

    evaluated = run_cli("eval", "perturb", str(folder), "--weights", "random", env=e, check=True)
    assert "perturb: 15 queries among" in evaluated.stdout, evaluated.stdout

    reader_url = run_cli("db", "reader", "analyst", env=e, check=True).stdout.strip()
    with psycopg.connect(reader_url) as reader:
        assert len(reader.execute("SELECT * FROM vecsearch_similar(%s, 4)", [image_id]).fetchall()) == 4
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("DELETE FROM images")

    settings = Settings(database_url=url, home=tmp_path / "home")
    with TestClient(web.create_app(settings, weights="random"), base_url="http://127.0.0.1") as client:
        got = client.get(f"/api/images/{image_id}/similar", params={"k": 3})
        assert got.status_code == 200 and len(got.json()["results"]) == 3

    reindexed = run_cli("db", "reindex", "--m", "20", "--ef-construction", "80", env=e, check=True)
    assert "m=20, ef_construction=80" in reindexed.stdout
    with connect(url) as conn:
        per_shard = conn.execute("SELECT result FROM run_command_on_shards('images', $$SELECT string_agg("
                                 "indexdef, ';') FROM pg_indexes WHERE tablename = '%s' AND indexdef LIKE "
                                 "'%%USING hnsw%%'$$)").fetchall()
        assert len(per_shard) == 4 and all("m='20'" in r[0] and ";" not in r[0] for r in per_shard), per_shard
        assert len(query.similar(conn, image_id, 3)) == 3

    dump = tmp_path / "backup.dump"
    run_cli("db", "backup", str(dump), env=e, check=True)
    with connect(url) as conn:
        before = table(conn)
        conn.execute("DELETE FROM images WHERE path LIKE %s", [f"{folder}/p1%"])
    assert "restored 15 images" in run_cli("db", "restore", str(dump), env=e, check=True).stdout
    with connect(url) as conn:
        assert_same_rows(before, table(conn))
        assert citus.is_distributed(conn)
        assert query.similar(conn, image_id, 3)


def test_a_sigkilled_load_on_the_cluster_is_finished_by_the_next(url, tmp_path):
    folder = tmp_path / "big"
    rng = np.random.default_rng(8)
    for i in range(24):  # noisy pixels: slow to decode, so the load is mid-way at the kill
        folder.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    e = env(url, tmp_path)
    run_cli("db", "distribute", env=e, check=True)
    run = Run(tmp_path, e, str(folder), "--weights", "random", "--batch-size", "4", "--workers", "1")
    wait_for(lambda: count(url) >= 4, 180, "the first batch", run.proc)
    with connect(url) as conn:
        assert hnsw.hnsw_index(conn) is None  # dropped for the bulk load
    run.kill(signal.SIGKILL)
    assert run.wait()[0] == -signal.SIGKILL
    code, out, err = Run(tmp_path, e, str(folder), "--weights", "random").wait()
    assert code == 0, err
    with connect(url) as conn:
        paths = [r[0] for r in conn.execute("SELECT path FROM images")]
        assert sorted(paths) == sorted(str(p) for p in folder.iterdir())  # every file, once
        assert hnsw.hnsw_index(conn) is not None
        per_shard = conn.execute("SELECT result FROM run_command_on_shards('images', $$SELECT count(*) FROM "
                                 "pg_indexes WHERE tablename = '%s' AND indexdef LIKE '%%USING hnsw%%'$$)")
        assert {r[0] for r in per_shard} == {"1"}
        image_id = conn.execute("SELECT min(id) FROM images").fetchone()[0]
        assert len(query.similar(conn, image_id, 5)) == 5


def test_an_existing_database_is_distributed_with_its_rows_and_ids(url, tmp_path):
    with connect(url) as conn:
        vectors = clustered(200, seed=9)
        ids = insert_vectors(conn, vectors)
        before = {r[0]: r[1] for r in conn.execute("SELECT id, path FROM images")}
        expected = [x.id for x in query.similar(conn, ids[7], 5, exact=True)]
        assert "200 rows moved" in citus.distribute(conn)
        assert {r[0]: r[1] for r in conn.execute("SELECT id, path FROM images")} == before
        assert [x.id for x in query.similar(conn, ids[7], 5, exact=True)] == expected
        new = conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, "
                           "embedding) VALUES ('/new.jpg', 'x', 1, 1, 1, 'JPEG', now(), %s) RETURNING id",
                           [vectors[0]]).fetchone()[0]
        assert new > max(before)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                         "VALUES ('/new.jpg', 'y', 1, 1, 1, 'JPEG', now(), %s)", [vectors[1]])


HNSW_PER_SHARD = ("SELECT result FROM run_command_on_shards('images', $$SELECT count(*) FROM pg_indexes "
                  "WHERE tablename = '%s' AND indexdef LIKE '%%USING hnsw%%'$$)")


def test_a_populated_database_moves_without_its_graph_and_a_killed_distribute_is_finished(url, tmp_path):
    """The rows move without the HNSW index, which is then built on every shard at once; a
    distribute killed before or after the move (the index dropped, its definition in the table's
    comment, as index.drop_marked leaves it) is finished by the next."""
    with connect(url) as conn:
        ids = insert_vectors(conn, clustered(400, seed=34))
        expected = [[x.id for x in query.similar(conn, i, 10, exact=True)] for i in ids[::100]]
        hnsw.drop_marked(conn, *hnsw.hnsw_index(conn))  # killed before the move
    e = env(url, tmp_path)
    first = run_cli("db", "distribute", env=e, check=True)
    assert "an earlier distribute or load was interrupted" in first.stderr, first.stderr
    assert "400 rows moved into 4 shards" in first.stderr
    assert "HNSW index built on every shard" in first.stdout
    with connect(url) as conn:
        assert [r[0] for r in conn.execute(HNSW_PER_SHARD)] == ["1"] * 4
        assert hnsw.dropped_definition(conn) is None
        hnsw.drop_marked(conn, *hnsw.hnsw_index(conn))  # killed after the move
    again = run_cli("db", "distribute", env=e, check=True)
    assert "interrupted" in again.stderr and "HNSW index built on every shard" in again.stdout
    with connect(url) as conn:
        assert [r[0] for r in conn.execute(HNSW_PER_SHARD)] == ["1"] * 4
        assert [[x.id for x in query.similar(conn, i, 10, exact=True)] for i in ids[::100]] == expected
        assert [[x.id for x in query.similar(conn, i, 10)] for i in ids[::100]] == expected
    # A populated local table with its index: dropped for the move (the message), built after.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DROP)
    db.upgrade(url)
    with connect(url) as conn:
        insert_vectors(conn, clustered(100, seed=35))
    moved = run_cli("db", "distribute", env=e, check=True)
    assert "100 rows: HNSW index dropped, rows moved without it" in moved.stderr, moved.stderr
    with connect(url) as conn:
        assert [r[0] for r in conn.execute(HNSW_PER_SHARD)] == ["1"] * 4


def test_distribute_refuses_a_server_without_citus(settings):
    with db.connect(settings) as conn:
        with pytest.raises(Exception, match="no Citus extension"):
            citus.distribute(conn)


def cluster_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m vecsearch.cluster ...`, the documented commands."""
    return subprocess.run([sys.executable, "-m", "vecsearch.cluster", *args], capture_output=True, text=True,
                          timeout=300)


def answers(e: dict, ids: list[int]) -> list[str]:
    """`vecsearch similar ID -k 5` against the coordinator, for each id (ids, paths, distances)."""
    return [run_cli("similar", str(i), "-k", "5", "--format", "json", env=e, check=True).stdout for i in ids]


def node_name(node: server.Running) -> str:
    return f"{node.socket_dir}:{node.port}"


def test_a_stopped_worker_is_named_and_the_documented_restart_brings_the_same_answers(cluster, url, tmp_path):
    with connect(url) as conn:
        citus.distribute(conn, shards=4)
        ids = insert_vectors(conn, clustered(300, seed=31))
    e = env(url, tmp_path)
    probes = ids[::150]
    before = answers(e, probes)
    down, up = cluster.workers
    assert server.stop(cluster.root / "worker1")

    failed = run_cli("similar", str(probes[0]), "-k", "5", env=e)
    assert failed.returncode == 3, failed.stderr
    assert failed.stderr.count("\n") == 1, failed.stderr
    named = f"error: the Citus node {node_name(down)} cannot be reached"
    assert failed.stderr.startswith(named), failed.stderr
    status = run_cli("db", "status", env=e, check=True).stdout
    assert f"worker:    {node_name(down)}: DOWN (cannot connect), 2 shards unavailable" in status, status
    assert f"worker:    {node_name(up)}: up, 2 shards, " in status
    assert "(not counting 2 shards on nodes that did not answer)" in status
    listed = cluster_cli("status", str(cluster.root))
    assert listed.returncode == 3 and "worker1: down" in listed.stdout and "worker2: up" in listed.stdout

    # The documented commands, each twice: start after one worker went down, stop, start again.
    for action in ("start", "start", "stop", "stop", "start", "start"):
        done = cluster_cli(action, str(cluster.root))
        assert done.returncode == 0, (action, done.stderr)
        if action == "start":
            assert done.stdout.strip() == cluster.url
    assert cluster_cli("status", str(cluster.root)).returncode == 0
    assert answers(e, probes) == before
    status = run_cli("db", "status", env=e, check=True).stdout
    assert "DOWN" not in status and "images:    300\n" in status, status


def test_a_frozen_worker_costs_the_short_connection_timeout(cluster, url, tmp_path):
    """A worker that accepts no connections (SIGSTOPped) fails a command after
    cluster.NODE_CONNECTION_TIMEOUT_MS, not Citus's default 30 s; db status marks it down."""
    with connect(url) as conn:
        citus.distribute(conn, shards=4)
        ids = insert_vectors(conn, clustered(40, seed=32))
    e = env(url, tmp_path)
    frozen = server.running(cluster.root / "worker2")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        failed = run_cli("similar", str(ids[0]), "-k", "5", env=e)
        took = time.monotonic() - began
        status = run_cli("db", "status", env=e)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert failed.returncode == 3 and f"the Citus node {node_name(frozen)} cannot be reached" in failed.stderr
    assert took < 20, took
    assert status.returncode == 0 and f"{node_name(frozen)}: DOWN" in status.stdout, status.stdout
    assert len(answers(e, ids[:1])[0].split('"id"')) == 6


def test_a_third_worker_and_a_rebalance_keep_the_answers(cluster, url, tmp_path):
    """Last in this module: it leaves the cluster with three workers."""
    with connect(url) as conn:
        citus.distribute(conn, shards=4)
        ids = insert_vectors(conn, clustered(300, seed=33))
        exact = [[x.id for x in query.similar(conn, i, 10, exact=True)] for i in ids[::50]]
    e = env(url, tmp_path)
    probes = ids[::150]
    before = answers(e, probes)
    started = cluster_cli("start", str(cluster.root), "--workers", "3")
    assert started.returncode == 0, started.stderr
    worker3 = server.running(cluster.root / "worker3")
    with connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()[0] == 3
        # Background tasks, which connect to citus.local_hostname.
        conn.execute("SELECT citus_rebalance_start()")
        conn.execute("SELECT citus_rebalance_wait()")
        moved = conn.execute("SELECT count(*) FROM pg_dist_shard s JOIN pg_dist_shard_placement p "
                             "USING (shardid) WHERE s.logicalrelid = 'images'::regclass AND p.nodename = %s",
                             [str(worker3.socket_dir)]).fetchone()[0]
        assert moved >= 1
        assert [[x.id for x in query.similar(conn, i, 10, exact=True)] for i in ids[::50]] == exact
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN ANALYZE SELECT * FROM vecsearch_similar(%s, 5)",
                                                     [ids[0]]))
        assert "Execution Time" in plan
    assert answers(e, probes) == before
    status = run_cli("db", "status", env=e, check=True).stdout
    assert f"worker:    {node_name(worker3)}: up, {moved} shards" in status, status
    assert "images:    300\n" in status


def test_the_compact_index_on_the_cluster(url, tmp_path, embedder):
    """vecsearch_projection is a reference table; every shard's graph is over the reduced column;
    answers are the exact re-rank of its candidates; SQL-inserted rows are found; a load writes
    reduced vectors on the shards."""
    from test_compact import low_rank

    from vecsearch import compact

    vectors = low_rank(2020, seed=7)
    with connect(url) as conn:
        citus.distribute(conn, shards=4)
        ids = insert_vectors(conn, vectors[:2000])
        done = hnsw.reindex(conn, 8, 32, dims=24)
        assert done.dims == 24
        assert conn.execute("SELECT partmethod FROM pg_dist_partition "
                            "WHERE logicalrelid = 'vecsearch_projection'::regclass").fetchone()[0] == "n"
        graphs = conn.execute("SELECT result FROM run_command_on_shards('images', $$SELECT count(*) "
                              "FROM pg_indexes WHERE tablename = '%s' "
                              "AND indexdef LIKE '%%halfvec(24)) halfvec_l2_ops%%'$$)")
        assert [r[0] for r in graphs] == ["1"] * 4
        assert conn.execute("SELECT count(*) FROM images WHERE reduced_version IS NULL").fetchone()[0] == 0
        hits = 0
        for j in range(20):
            q = vectors[2000 + j % 20]
            exact = [x.id for x in query.similar_to(conn, q, 10, exact=True)]
            hits += len({x.id for x in query.similar_to(conn, q, 10)} & set(exact))
        assert hits / 200 >= 0.95
        # By id: from the row's own reduced vector (vecsearch_nearest, 0007), the tuned re-rank depth.
        compact.set_rerank(conn, 20)
        for image_id, v in zip(ids[:5], vectors[:5], strict=True):
            by_id = [(x.id, round(x.distance, 6)) for x in query.similar(conn, image_id, 10)]
            by_vector = [(x.id, round(x.distance, 6))
                         for x in query.similar_to(conn, v, 10, exclude=[image_id])]
            assert by_id == by_vector and len(by_id) == 10
        conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                     "VALUES ('/etl/x.jpg', 'x', 1, 1, 1, 'PNG', now(), %s::vector)",
                     [str(vectors[2019].tolist())])
        etl = conn.execute("SELECT id FROM images WHERE path = '/etl/x.jpg'").fetchone()[0]
        assert query.similar_to(conn, vectors[2019], 1)[0].id == etl
        assert "compact: PCA to 24 dims" in compact.describe(conn)
    folder = tmp_path / "photos"
    for i in range(3):
        make_image(folder / f"{i}.png", i)
    run_cli("load", str(folder), "--weights", "random", env=env(url, tmp_path), check=True)
    with connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE path LIKE %s AND reduced_version IS NOT NULL",
                            [f"{folder}/%"]).fetchone()[0] == 3
        assert len(ids) == 2000


class _Said(Progress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _set_on(node: server.Running, values: dict[str, str | None]) -> None:
    with server.psql_connection(node) as conn:
        for name, value in values.items():
            if value is None:
                conn.execute(f'ALTER SYSTEM RESET "{name}"')
            else:
                conn.execute(f"ALTER SYSTEM SET \"{name}\" = '{value}'")
        conn.execute("SELECT pg_reload_conf()")


def _setting(command: str, name: str) -> str | None:
    """The value a logged remote command sets `name` to with set_config (as Citus deparses it)."""
    found = re.search(rf"set_config\('{name}'(?:::text)?, '([^']*)'(?:::text)?, true\)", command)
    return found and found.group(1)


def test_each_worker_sizes_the_build_of_its_own_shards(cluster, url):
    """The build memory and parallel workers set on a worker's connection follow what that worker
    says about itself: worker 1 is given vecsearch.build_memory 256kB and vecsearch.build_workers 0
    (its graphs then outgrow the memory: pgvector says so, from that worker only), worker 2 keeps
    its own (half its available RAM, its CPUs - 1). Each worker's shards are built on the
    connection that got its settings; a bad setting is one line naming the worker."""
    one, two = cluster.workers[0], cluster.workers[1]
    _set_on(one, {"vecsearch.build_memory": "256kB", "vecsearch.build_workers": "0"})
    try:
        with connect(url) as conn:
            citus.distribute(conn, shards=4)
            insert_vectors(conn, clustered(800, seed=17))
            said = _Said()
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(
                " ".join(filter(None, (d.message_primary, d.message_detail, d.message_hint)))))
            conn.execute("SET citus.log_remote_commands = on")
            conn.execute("SET client_min_messages = debug1")  # Citus passes a DDL's notices on at DEBUG1
            hnsw.reindex(conn, report=said)
            conn.execute("RESET client_min_messages")
            conn.execute("RESET citus.log_remote_commands")
            node = {w: f"{w.socket_dir}:{w.port}" for w in (one, two)}
            sets = {w: [n for n in notices if "set_config('maintenance_work_mem'" in n and node[w] in n]
                    for w in (one, two)}
            assert len(sets[one]) == len(sets[two]) == 1, notices
            assert _setting(sets[one][0], "maintenance_work_mem") == "256kB"
            assert _setting(sets[one][0], "max_parallel_maintenance_workers") == "0"
            # Worker 2's own: the graph of its largest shard (about 200 rows of ~7 KB elements,
            # x 1.2, + 64 MB), far under half its RAM; CPUs - 1 parallel workers.
            memory = _setting(sets[two][0], "maintenance_work_mem")
            assert memory.endswith("kB") and 64 * 1024 < int(memory[:-2]) < 70 * 1024, sets[two][0]
            workers = min((os.cpu_count() or 1) - 1, 8)
            assert _setting(sets[two][0], "max_parallel_maintenance_workers") == str(workers)
            # Every shard's CREATE INDEX went over the connection its worker's settings were set on
            # (an earlier test may have added a third worker: count each worker's own shards).
            placed = dict(conn.execute(
                "SELECT nodeport::text || ':' || nodename, count(*) FROM pg_dist_shard_placement "
                "JOIN pg_dist_shard USING (shardid) WHERE logicalrelid = 'images'::regclass "
                "GROUP BY 1").fetchall())
            for w in (one, two):
                on = sets[w][0].rsplit("connectionId: ", 1)[1]
                builds = [n for n in notices if re.search(r"CREATE\s+INDEX\s+\S+_rebuilt_\d+\s+ON", n)
                          and node[w] in n]  # the shards' (a metadata worker's shell table has one too)
                assert len(builds) == placed[f"{w.port}:{w.socket_dir}"] >= 1, (builds, placed)
                assert all(b.rsplit("connectionId: ", 1)[1] == on for b in builds), builds
            overflow = [n for n in notices if "no longer fits into maintenance_work_mem" in n]
            assert overflow and all(node[one] in n for n in overflow), overflow
            reasons = [line for line in said.lines if node[one] in line or node[two] in line]
            assert any("vecsearch.build_memory 256kB" in r and "finished on disk" in r for r in reasons)
            assert any(node[two] in r and "half the" in r and "RAM" in r for r in reasons), said.lines
            # The answers are those of a complete index on every shard.
            assert len(query.similar_to(conn, clustered(1, seed=3)[0], 10)) == 10
            _set_on(two, {"vecsearch.build_memory": "lots"})
            bad = f"vecsearch.build_memory on {re.escape(node[two])} is 'lots'"
            with pytest.raises(InvalidInput, match=bad):
                hnsw.reindex(conn)
    finally:
        _set_on(one, {"vecsearch.build_memory": None, "vecsearch.build_workers": None})
        _set_on(two, {"vecsearch.build_memory": None})


def test_photo_metadata_on_the_cluster(url, tmp_path, embedder):
    """Migration 0009 on a table Citus distributed at 0008: the columns reach every shard, a load
    writes the EXIF through the cluster, a re-read updates it there, and the filters keep k rows."""
    from datetime import datetime

    from test_exif import exif_block, photo

    from vecsearch.load import load

    db.downgrade(url, "0008")
    with connect(url) as conn:  # plain psycopg: db.connect would migrate first
        ids = insert_vectors(conn, clustered(300, seed=12), [f"/lib/{i}.jpg" for i in range(300)])
        citus.distribute(conn)
    db.upgrade(url)
    with connect(url) as conn:
        assert citus.is_distributed(conn)
        shards = conn.execute("SELECT result FROM run_command_on_shards('images', $$SELECT count(*) FROM "
                              "information_schema.columns WHERE table_name = '%s' AND column_name IN "
                              "('taken_at', 'camera_make', 'metadata_version')$$)").fetchall()
        assert len(shards) == citus.shard_count(conn) and all(r[0] == "3" for r in shards), shards
        conn.execute("UPDATE images SET taken_at = CASE WHEN id % 3 = 0 THEN timestamp '2024-06-01' "
                     "ELSE timestamp '2015-06-01' END, camera_make = 'Canon'")
        rows = query.similar(conn, ids[1], 20, taken_after=datetime(2024, 1, 1))
        assert len(rows) == 20 and all(i % 3 == 0 for i in (r.id for r in rows))
        assert len(query.similar(conn, ids[1], 5, camera="canon")) == 5
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "canon.jpg", 1, exif_block())
    photo(folder / "bad.jpg", 2, exif_block(taken="9999:01:01 00:00:00"))
    settings = Settings(database_url=url, home=tmp_path / "home")
    summary = load(settings, folder, embedder, workers=0)
    assert (summary.new, summary.metadata_warnings, summary.failed) == (2, 1, [])
    with connect(url) as conn:
        got = dict(conn.execute("SELECT path, camera_model FROM images WHERE path LIKE %s", [f"{folder}/%"]))
        assert got == {str(folder / "canon.jpg"): "Canon EOS R5", str(folder / "bad.jpg"): "Canon EOS R5"}
        conn.execute("UPDATE images SET camera_model = NULL, metadata_version = NULL WHERE path LIKE %s",
                     [f"{folder}/%"])
    assert load(settings, folder, embedder, workers=0).metadata_reread == 2
    with connect(url) as conn:
        count = "SELECT count(*) FROM images WHERE camera_model = 'Canon EOS R5'"
        assert conn.execute(count).fetchone()[0] == 2
