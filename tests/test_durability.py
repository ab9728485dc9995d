"""Backup/restore round trip, and the embedded server's TCP mode (off by default, password when on)."""

from __future__ import annotations

import stat

import psycopg
import pytest
from conftest import clustered, insert_vectors, invoke_cli, run_cli

from vecsearch import db, server


def _neighbours(conn, image_id: int) -> list[tuple[int, float]]:
    return conn.execute(
        "SELECT id, embedding <=> (SELECT embedding FROM images WHERE id = %s) AS d FROM images "
        "WHERE id <> %s ORDER BY d, id LIMIT 5", [image_id, image_id]).fetchall()


def test_backup_restore_round_trip_gives_identical_neighbours(settings, conn, tmp_path):
    insert_vectors(conn, clustered(50, seed=0))
    conn.execute("INSERT INTO embedding_model (name, weights, preprocessing, dim) "
                 "VALUES ('resnet50', 'random(seed=0)', '{}', 2048)")
    before = {i: _neighbours(conn, i) for i in (1, 17, 42)}
    dump = tmp_path / "vecsearch.dump"
    invoke_cli("db", "backup", str(dump), check=True)
    assert dump.stat().st_size > 50 * 2048 * 4 / 2  # the vectors are in it

    conn.execute("DELETE FROM images WHERE id > 10")
    conn.execute("UPDATE embedding_model SET weights = 'other'")
    invoke_cli("db", "restore", str(dump), check=True)

    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 50
    assert conn.execute("SELECT weights FROM embedding_model").fetchone()[0] == "random(seed=0)"
    assert {i: _neighbours(conn, i) for i in (1, 17, 42)} == before
    assert db.schema_revision(conn) == db.SCHEMA_REVISION
    indexes = [r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'images'")]
    assert "images_embedding_hnsw" in indexes


def test_restore_of_missing_file_is_one_clear_line(settings, tmp_path):
    result = invoke_cli("db", "restore", str(tmp_path / "nope.dump"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: backup file {tmp_path / 'nope.dump'} does not exist: " \
        "give the path of a `vecsearch db backup` file"


def test_tcp_is_off_by_default_and_password_protected_when_on(tmp_path):
    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    try:
        run_cli("db", "start", env=env, check=True)
        assert server.running(home).listen == ""
        off = run_cli("db", "url", "--tcp", env=env)
        assert off.returncode == 1 and "TCP is off" in off.stderr

        run_cli("db", "start", "--tcp", "--port", "54329", env=env, check=True)
        running = server.running(home)
        assert running.listen == "127.0.0.1" and running.port == 54329
        password_file = home / "tcp-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        url = run_cli("db", "url", "--tcp", env=env, check=True).stdout.strip()
        assert url.startswith("postgresql://postgres:") and "@127.0.0.1:54329/vecsearch" in url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM images").fetchone() == (0,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect("postgresql://postgres:wrong@127.0.0.1:54329/vecsearch").close()
        # The socket keeps working for the owner, at the new port.
        with psycopg.connect(server.running(home).url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        run_cli("db", "start", "--no-tcp", env=env, check=True)
        assert server.running(home).listen == ""
    finally:
        server.stop(home)
