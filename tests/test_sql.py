"""The SQL interface for analytics tools, through plain psycopg: vecsearch_similar(),
vecsearch_similar_to(), their plans, and the read-only role vecsearch_reader."""

from __future__ import annotations

import os

import numpy as np
import psycopg
import pytest
from conftest import (
    clustered,
    exact_neighbours,
    fresh_database,
    insert_vectors,
    invoke_cli,
    nested_plans,
    run_cli,
)

from vecsearch import db, logins, models, query, server
from vecsearch.config import Settings


class Data:
    """2200 synthetic rows: enough for the planner to consider the HNSW index."""

    def __init__(self, url: str, home) -> None:
        self.url = url
        self.settings = Settings(database_url=url, home=home)
        self.env = {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(home)}
        self.vectors = clustered(2200, seed=5)
        with db.connect(self.settings) as conn:
            self.ids = insert_vectors(conn, self.vectors, [f"/lib/{i % 3}/{i}.jpg" for i in range(2200)])
            models.ensure_model(conn, models.record_for(models.RANDOM_WEIGHTS))  # a row readers must see


@pytest.fixture(scope="module")
def data(pg_home):
    with fresh_database(pg_home) as url:
        yield Data(url, pg_home)


@pytest.fixture
def sconn(data):
    with psycopg.connect(data.url, autocommit=True) as conn:  # plain psycopg, as a notebook would
        yield conn


def test_vecsearch_similar_matches_the_library_and_numpy(data, sconn):
    image_id = data.ids[10]
    rows = sconn.execute("SELECT id, path, distance FROM vecsearch_similar(%s, 8)", [image_id]).fetchall()
    with db.connect(data.settings) as conn:
        assert [query.Neighbour(*r) for r in rows] == query.similar(conn, image_id, 8)
    exact = sconn.execute("SELECT id, distance FROM vecsearch_similar(%s, 8, exact => true)",
                          [image_id]).fetchall()
    reference = exact_neighbours(data.vectors, data.ids, data.vectors[10], 8, exclude=[image_id])
    assert [r[0] for r in exact] == [i for i, _ in reference]
    np.testing.assert_allclose([r[1] for r in exact], [d for _, d in reference], atol=1e-6)
    assert len({r[0] for r in rows} & {i for i, _ in reference}) >= 7


def test_vecsearch_similar_to_any_vector(data, sconn):
    # A vector typed as text, as a BI tool would send it.
    q = clustered(1, seed=77)[0]
    text = "[" + ",".join(map(str, q.tolist())) + "]"
    rows = sconn.execute("SELECT id, distance FROM vecsearch_similar_to(%s::vector, 5)", [text]).fetchall()
    reference = exact_neighbours(data.vectors, data.ids, q, 5)
    assert len({r[0] for r in rows} & {i for i, _ in reference}) >= 4
    # An image's own vector finds that image first, at distance 0.
    first = sconn.execute("SELECT id, distance FROM vecsearch_similar_to("
                          "(SELECT embedding FROM images WHERE id = %s), 3)", [data.ids[4]]).fetchone()
    assert first[0] == data.ids[4] and abs(first[1]) < 1e-6
    # Filters by name: under a path prefix, some ids excluded.
    rows = sconn.execute(
        "SELECT id, path FROM vecsearch_similar_to((SELECT embedding FROM images WHERE id = %s), 20, "
        "under => '/lib/1/', exclude => %s)", [data.ids[4], data.ids[:100]]).fetchall()
    assert len(rows) == 20 and all(p.startswith("/lib/1/") for _, p in rows)
    assert not {r[0] for r in rows} & set(data.ids[:100])


def test_usable_in_a_lateral_join(data, sconn):
    rows = sconn.execute("""
        SELECT i.id, s.id, s.distance
        FROM images i, LATERAL vecsearch_similar(i.id, 3) s
        WHERE i.id = ANY(%s)
        ORDER BY i.id, s.distance, s.id""", [data.ids[:5]]).fetchall()
    assert len(rows) == 15
    for image_id in data.ids[:5]:
        mine = [(r[1], r[2]) for r in rows if r[0] == image_id]
        alone = sconn.execute("SELECT id, distance FROM vecsearch_similar(%s, 3)", [image_id]).fetchall()
        assert mine == alone and image_id not in [m[0] for m in mine]


def test_functions_use_the_hnsw_index(data, sconn):
    index_scan = "Index Scan using images_embedding_hnsw"
    # Repeated calls too: a cached generic plan must not fall back to a sequential scan.
    for _ in range(7):
        plans = nested_plans(sconn, "SELECT * FROM vecsearch_similar(%s, 10)", [data.ids[1]])
        assert index_scan in plans, plans[-2000:]
    # A path filter that most rows pass: still the index (it must not be pulled onto the path btree).
    plans = nested_plans(sconn, "SELECT * FROM vecsearch_similar_to("
                          "(SELECT embedding FROM images WHERE id = %s), 50, under => '/lib/')",
                          [data.ids[2]])
    assert index_scan in plans
    # Fewer than 2000 rows under the prefix (a third: 733): an exact scan of those rows instead.
    plans = nested_plans(sconn, "SELECT * FROM vecsearch_similar(%s, 50, under => '/lib/2/')",
                          [data.ids[2]])
    assert index_scan not in plans and "(embedding <=> " in plans
    plans = nested_plans(sconn, "SELECT * FROM vecsearch_similar(%s, 10, exact => true)", [data.ids[1]])
    assert "Seq Scan on images" in plans and index_scan not in plans


def test_functions_leave_the_session_settings_alone(data, sconn):
    sconn.execute("SET hnsw.ef_search = 17")
    sconn.execute("SELECT * FROM vecsearch_similar(%s, 500)", [data.ids[0]]).fetchall()
    settings = sconn.execute("SELECT current_setting('hnsw.ef_search'), current_setting('enable_seqscan'), "
                             "current_setting('hnsw.iterative_scan')").fetchone()
    assert settings == ("17", "on", "off")
    # ...while the function itself raised ef_search to k: all 500 rows came back.
    count = sconn.execute("SELECT count(*) FROM vecsearch_similar(%s, 500)", [data.ids[0]]).fetchone()
    assert count == (500,)


def test_sql_argument_errors(data, sconn):
    for k in (0, 1001, None):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="k must be between 1 and 1000"):
            sconn.execute("SELECT * FROM vecsearch_similar(%s, %s::int)", [data.ids[0], k])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="ef_search must be between"):
        sconn.execute("SELECT * FROM vecsearch_similar(%s, 5, ef_search => 0)", [data.ids[0]])
    with pytest.raises(psycopg.errors.DataException, match="2048"):
        sconn.execute("SELECT * FROM vecsearch_similar_to('[1,2,3]', 5)")
    # An unknown id is simply not there (no rows), as in any SQL lookup.
    assert sconn.execute("SELECT * FROM vecsearch_similar(-1)").fetchall() == []


# -- the read-only role ----------------------------------------------------------------------


def _assert_read_only(url: str, image_id: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM embedding_model").fetchone() == (1,)
        assert len(conn.execute("SELECT * FROM vecsearch_similar(%s, 3)", [image_id]).fetchall()) == 3
        rows = conn.execute("SELECT * FROM vecsearch_similar_to("
                            "(SELECT embedding FROM images WHERE id = %s), 3)", [image_id]).fetchall()
        assert len(rows) == 3
        for statement in (
            "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
            "SELECT path || '.x', sha256, bytes, width, height, format, mtime, embedding FROM images LIMIT 1",
            "UPDATE images SET path = path || '.x'",
            "DELETE FROM images",
            "TRUNCATE images",
            "DELETE FROM embedding_model",
            "UPDATE alembic_version SET version_num = '0'",
            "CREATE TABLE scratch (x int)",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE INDEX ON images (width)",
            "DROP TABLE images",
            "ALTER TABLE images ADD COLUMN x int",
            "CREATE ROLE sneaky",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_reader_role_can_read_and_call_functions_but_not_write(data, sconn):
    group = sconn.execute("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                          "WHERE rolname = 'vecsearch_reader'").fetchone()
    assert group == (False, False, False, False)
    name = f"analyst_{os.getpid()}"
    with db.connect(data.settings) as conn:
        password = logins.create(conn, name)
        try:
            url = logins.url(data.settings, conn, name, password)
            assert url.startswith(f"postgresql://{name}:{password}@/")
            _assert_read_only(url, data.ids[0])
            # Nothing but the group's privileges: no other grants, no attributes.
            roles = conn.execute("SELECT r.rolname FROM pg_auth_members m "
                                 "JOIN pg_roles r ON r.oid = m.roleid WHERE m.member = %s::regrole",
                                 [name]).fetchall()
            assert roles == [("vecsearch_reader",)]
        finally:
            logins.drop(conn, name)
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", [name]).fetchone() == (0,)


def test_reader_refuses_roles_that_are_not_readers(data):
    from vecsearch.errors import InvalidInput

    with db.connect(data.settings) as conn:
        for name in ("postgres", "vecsearch_reader", "Robert'); DROP TABLE images;--", "pg_monitor", ""):
            with pytest.raises(InvalidInput):
                logins.create(conn, name)
        with pytest.raises(InvalidInput, match="not a vecsearch reader"):
            logins.drop(conn, "postgres")


def test_cli_db_reader_prints_a_working_url(data):
    name = f"grafana_{os.getpid()}"
    try:
        first = invoke_cli("db", "reader", name, env=data.env, check=True)
        url = first.stdout.strip()
        assert url.startswith(f"postgresql://{name}:") and "vecsearch db start --tcp" in first.stderr
        _assert_read_only(url, data.ids[0])
        # Again: a new password (the old one is gone), same role.
        second = invoke_cli("db", "reader", name, env=data.env, check=True).stdout.strip()
        assert second != url
        bad = invoke_cli("db", "reader", "postgres", env=data.env)
        assert bad.returncode == 1 and bad.stderr.startswith("error: role postgres exists and is not")
    finally:
        dropped = invoke_cli("db", "reader", name, "--drop", env=data.env)
    assert dropped.returncode == 0 and dropped.stdout.strip() == f"dropped {name}"


def test_reader_url_over_tcp_needs_its_password(tmp_path):
    """With `db start --tcp` the URL is a TCP one, and the server checks the password there."""
    home = tmp_path / "home"
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    try:
        run_cli("db", "start", "--tcp", "--port", "54337", env=env, check=True)
        url = run_cli("db", "reader", "metabase", env=env, check=True).stdout.strip()
        assert url.startswith("postgresql://metabase:") and url.endswith("@127.0.0.1:54337/vecsearch")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user, count(*) FROM images").fetchone() == ("metabase", 0)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE t (x int)")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect("postgresql://metabase:wrong@127.0.0.1:54337/vecsearch").close()
    finally:
        server.stop(home)
