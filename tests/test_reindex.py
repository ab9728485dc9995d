"""`vecsearch db reindex`: new HNSW build parameters, swapped in atomically; `db status` shows them."""

from __future__ import annotations

import signal
import subprocess
import time

import psycopg
from conftest import cli_command, clustered, insert_vectors, invoke_cli

from vecsearch import db, hnsw


def _options(conn) -> str:
    return dict(db.status(conn))["hnsw opts"]


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_reindex_changes_the_parameters_and_the_new_index_serves_every_row(settings, conn):
    ids = insert_vectors(conn, clustered(400, seed=21))
    assert _options(conn) == "m=32, ef_construction=128"  # a new database's defaults
    result = invoke_cli("db", "reindex", "--m", "24", "--ef-construction", "80")
    assert result.returncode == 0, result.stderr
    assert "reindexed in " in result.stdout and "m=24, ef_construction=80" in result.stdout
    assert _options(conn) == "m=24, ef_construction=80"
    assert hnsw.index_options(conn) == {"m": 24, "ef_construction": 80}
    assert "hnsw opts: " in invoke_cli("db", "status", check=True).stdout
    # One HNSW index, the one the plan uses, holding every row.
    assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'images' "
                        "AND indexdef LIKE '%hnsw%'").fetchone() == (1,)
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL hnsw.ef_search = 1000")
        sql = (f"SELECT id FROM images ORDER BY {db.ANN_EXPR} <=> (SELECT embedding FROM images "
               f"WHERE id = %s)::halfvec(2048) LIMIT 1000")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, [ids[0]]))
        assert "Index Scan using images_embedding_hnsw" in plan
        assert sorted(r[0] for r in conn.execute(sql, [ids[0]])) == sorted(ids)
    # Without options: rebuilt with its own.
    assert invoke_cli("db", "reindex").returncode == 0
    assert hnsw.index_options(conn) == {"m": 24, "ef_construction": 80}


def test_a_killed_reindex_leaves_the_old_index_and_a_rerun_finishes(settings, conn):
    insert_vectors(conn, clustered(300, seed=22))
    with psycopg.connect(settings.database_url, autocommit=True) as lock:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE images IN ROW EXCLUSIVE MODE")  # the rebuild waits for it
        proc = subprocess.Popen(cli_command("db", "reindex", "--m", "20", "--ef-construction", "60"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait(lambda: conn.execute(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND (query LIKE 'CREATE INDEX%%' OR query LIKE 'LOCK TABLE images%%'))").fetchone()[0],
                60, "the rebuild to wait on the lock")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        lock.execute("ROLLBACK")
    _wait(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                               ).fetchone()[0] == 0, 30, "the killed rebuild's session to end")
    assert hnsw.index_options(conn) == {"m": 32, "ef_construction": 128}  # the old one, untouched
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'images_embedding_hnsw%'"
                        ).fetchone() == (1,)
    assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                        "'images_embedding_hnsw'::regclass").fetchone() == (True,)
    assert invoke_cli("db", "reindex", "--m", "20", "--ef-construction", "60").returncode == 0
    assert hnsw.index_options(conn) == {"m": 20, "ef_construction": 60}


def test_reindex_refuses_parameters_pgvector_would_refuse(settings, conn):
    insert_vectors(conn, clustered(20, seed=23))
    for args, message in ((["--m", "1"], "--m must be from 2 to 100"),
                          (["--m", "16", "--ef-construction", "20"], "at least 2 x m (32)")):
        result = invoke_cli("db", "reindex", *args)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert hnsw.index_options(conn) == {"m": 32, "ef_construction": 128}
