"""A notebook's view of vecsearch: pandas + SQLAlchemy, over TCP, with a `vecsearch db reader` login.

The queries are the ones docs/sql.md shows, read out of the doc (its example id, folder and ids
replaced by this database's), so a broken example there fails here. The server is a real
embedded PostgreSQL of its own started with `vecsearch db start --tcp`, loaded with real images
through `vecsearch.load`; the answers are checked against numpy on the stored vectors.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy
from conftest import make_image, run_cli

from vecsearch import db, server
from vecsearch.config import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "sql.md"
# The placeholders of docs/sql.md's examples, replaced by this database's values.
DOC_ID = "42"
DOC_FOLDER = "/home/me/Photos/2024/"
DOC_IDS = "(1, 2, 3)"
ATOL = 1e-5  # pgvector computes the cosine distance in float32, numpy here in float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Analytics:
    """Twelve images (six under 2024/, six under 2023/) in a TCP-listening server, a reader login."""

    def __init__(self, home: Path, folder: Path, url: str, settings: Settings) -> None:
        self.home, self.folder, self.url, self.settings = home, folder, url, settings
        self.engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with db.connect(settings) as conn:  # the owner's view, for the reference answers
            rows = conn.execute("SELECT id, path, embedding::text FROM images ORDER BY id").fetchall()
        self.ids = [r[0] for r in rows]
        self.paths = {r[0]: r[1] for r in rows}
        self.vectors = np.array([json.loads(r[2]) for r in rows], dtype=np.float64)
        self.anchor = next(i for i in self.ids if self.paths[i].endswith("/2024/p0.png"))

    def distances(self, q: np.ndarray) -> dict[int, float]:
        """Cosine distance from `q` to every image, by id."""
        d = 1 - self.vectors @ q / (np.linalg.norm(self.vectors, axis=1) * np.linalg.norm(q))
        return dict(zip(self.ids, d.tolist(), strict=True))

    def nearest(self, q: np.ndarray, k: int, exclude=(), prefix: str = "") -> list[tuple[int, float]]:
        d = self.distances(q)
        keep = [i for i in self.ids if i not in exclude and self.paths[i].startswith(prefix)]
        return sorted(((i, d[i]) for i in keep), key=lambda t: t[1])[:k]

    def vector(self, image_id: int) -> np.ndarray:
        return self.vectors[self.ids.index(image_id)]

    def read(self, doc_sql: str) -> pd.DataFrame:
        """A doc example, localised, read as a notebook does (through sqlalchemy.text, which the
        doc asks for: it escapes the % of a LIKE pattern for the driver)."""
        return pd.read_sql(sqlalchemy.text(self.localise(doc_sql)), self.engine)

    def localise(self, sql: str) -> str:
        """A doc example with its placeholders replaced by this database's ids and folder."""
        sql = re.sub(rf"\b{DOC_ID}\b", str(self.anchor), sql)
        sql = sql.replace(DOC_FOLDER, f"{self.folder}/2024/")
        return sql.replace(DOC_IDS, "(" + ", ".join(map(str, self.ids[:3])) + ")")


@pytest.fixture(scope="module")
def analytics(embedder, tmp_path_factory):
    from vecsearch.load import load

    root = tmp_path_factory.mktemp("analytics")
    home, folder = root / "home", root / "photos"
    for n in range(12):
        make_image(folder / ("2024" if n < 6 else "2023") / f"p{n % 6}.png", seed=100 + n)
    env = {"VECSEARCH_HOME": str(home), "VECSEARCH_DATABASE_URL": ""}
    try:
        run_cli("db", "start", "--tcp", "--port", str(_free_port()), env=env, check=True)
        settings = Settings(database_url=None, home=home)
        summary = load(settings, folder, embedder, workers=0)
        assert summary.failed == [] and summary.new == 12, summary.describe()
        url = run_cli("db", "reader", "analyst", env=env, check=True).stdout.strip()
        data = Analytics(home, folder, url, settings)
        yield data
        data.engine.dispose()
    finally:
        server.stop(home)


def _doc_statements() -> dict[str, str]:
    """Every SQL statement of docs/sql.md's ```sql blocks, keyed by the comment above it (or its
    first line when it has none)."""
    statements: dict[str, str] = {}
    for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S):
        for chunk in filter(None, (c.strip() for c in block.split(";"))):
            lines = chunk.splitlines()
            comments = [line[2:].strip() for line in lines if line.startswith("--")]
            body = "\n".join(line for line in lines if not line.startswith("--"))
            statements[comments[-1] if comments else lines[0]] = body
    return statements


STATEMENTS = _doc_statements()


def _doc(key: str) -> str:
    found = [body for comment, body in STATEMENTS.items() if key in comment or key in body]
    assert len(found) == 1, f"docs/sql.md should have one SQL example matching {key!r}: {found}"
    return found[0]


def test_the_doc_has_the_examples_this_test_runs():
    # Each example below is run by a test here; a new one should get its test. (Those of the
    # "Photo metadata" section are run by test_exif.py, on a library with dates and cameras.)
    assert len([s for s in STATEMENTS.values() if "taken_at" not in s]) == 5, list(STATEMENTS)


def test_reader_connects_over_tcp_with_its_password(analytics):
    assert re.fullmatch(r"postgresql://analyst:[^@]+@127\.0\.0\.1:\d+/vecsearch", analytics.url)
    who = pd.read_sql("SELECT current_user AS login, host(inet_server_addr()) AS server, "
                      "(SELECT count(*) FROM images) AS images", analytics.engine)
    assert who.to_dict("records") == [{"login": "analyst", "server": "127.0.0.1", "images": 12}]
    wrong = sqlalchemy.create_engine(re.sub(r":[^:@/]+@", ":wrong@", analytics.url)
                                     .replace("postgresql://", "postgresql+psycopg://"))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        pd.read_sql("SELECT 1", wrong)
    wrong.dispose()


def test_doc_nearest_to_an_image(analytics):
    df = analytics.read(_doc("the 10 images nearest to image"))
    assert list(df.columns) == ["id", "path", "distance"]
    reference = analytics.nearest(analytics.vector(analytics.anchor), 10, exclude={analytics.anchor})
    assert df["id"].tolist() == [i for i, _ in reference]
    np.testing.assert_allclose(df["distance"], [d for _, d in reference], atol=ATOL)
    assert df["distance"].is_monotonic_increasing and analytics.anchor not in set(df["id"])
    assert df["path"].tolist() == [analytics.paths[i] for i in df["id"]]


def test_doc_options_by_name(analytics):
    sql = _doc("options by name")
    assert "ef_search => 200" in sql and "under =>" in sql
    df = analytics.read(sql)
    prefix = f"{analytics.folder}/2024/"
    reference = analytics.nearest(analytics.vector(analytics.anchor), 20, exclude={analytics.anchor},
                                  prefix=prefix)
    assert len(reference) == 5  # k 20, but only five other images under 2024/
    assert df["id"].tolist() == [i for i, _ in reference]
    assert all(p.startswith(prefix) for p in df["path"])


def test_doc_join_five_nearest_to_each_image_of_a_folder(analytics):
    df = analytics.read(_doc("in a join"))
    assert list(df.columns) == ["image", "neighbour", "similarity"]
    prefix = f"{analytics.folder}/2024/"
    images = sorted(p for p in analytics.paths.values() if p.startswith(prefix))
    assert sorted(set(df["image"])) == images and len(df) == 6 * 5
    assert df["image"].is_monotonic_increasing
    by_path = {p: i for i, p in analytics.paths.items()}
    for image, rows in df.groupby("image", sort=False):
        image_id = by_path[image]
        reference = analytics.nearest(analytics.vector(image_id), 5, exclude={image_id})
        assert rows["neighbour"].tolist() == [analytics.paths[i] for i, _ in reference]
        np.testing.assert_allclose(rows["similarity"].astype(float),
                                   [round(1 - d, 3) for _, d in reference], atol=0.0011)
        assert rows["similarity"].astype(float).is_monotonic_decreasing


def test_doc_any_vector_the_mean_of_three_images(analytics):
    df = analytics.read(_doc("avg(embedding)"))
    mean = analytics.vectors[:3].mean(axis=0)  # the ids of DOC_IDS are the first three
    reference = analytics.nearest(mean, 10)
    assert df["id"].tolist() == [i for i, _ in reference]
    np.testing.assert_allclose(df["distance"], [d for _, d in reference], atol=ATOL)


def test_doc_materialised_cte_for_citus_gives_the_join_answer(analytics):
    cte = analytics.read(_doc("AS MATERIALIZED"))
    join = analytics.read(_doc("in a join"))
    assert cte["image"].tolist() == join["image"].tolist()
    assert cte["neighbour"].tolist() == join["neighbour"].tolist()


def test_a_bare_string_with_a_like_pattern_is_refused_as_the_doc_warns(analytics):
    """pandas hands a bare string to the driver as is, where % starts a placeholder: the doc says to
    wrap queries in sqlalchemy.text(), and quotes this error."""
    with pytest.raises(pd.errors.DatabaseError, match="only '%s', '%b', '%t' are allowed as placeholders"):
        pd.read_sql(analytics.localise(_doc("in a join")), analytics.engine)
    assert "only '%s', '%b', '%t' are allowed as placeholders" in DOC.read_text()


def test_doc_notebook_line_runs_as_written(analytics):
    """The notebook row of the doc's tool table, evaluated with URL = the reader's URL."""
    line = re.search(r"^\| notebook[^|]*\| `(pd\.read_sql\(.*?)`", DOC.read_text(), flags=re.M)
    assert line, "docs/sql.md's tool table should have a notebook row with a pd.read_sql(...) line"
    df = eval(analytics.localise(line.group(1)), {"pd": pd, "sqlalchemy": sqlalchemy, "URL": analytics.url})
    reference = analytics.nearest(analytics.vector(analytics.anchor), 10, exclude={analytics.anchor})
    assert df["id"].tolist() == [i for i, _ in reference]


def test_reader_cannot_write(analytics):
    statements = [
        "INSERT INTO images (path, sha256, bytes, width, height, format, mtime, embedding) "
        "SELECT path || '.copy', sha256, bytes, width, height, format, mtime, embedding FROM images",
        "UPDATE images SET path = 'x'",
        "DELETE FROM images",
        "CREATE TABLE notes (x int)",
        "DROP TABLE images",
    ]
    for statement in statements:
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as caught, analytics.engine.begin() as c:
            c.execute(sqlalchemy.text(statement))
        assert isinstance(caught.value.orig, psycopg.errors.InsufficientPrivilege), statement
    # pandas' own write path is refused the same way.
    with pytest.raises(sqlalchemy.exc.ProgrammingError, match="permission denied"):
        pd.DataFrame({"x": [1]}).to_sql("notes", analytics.engine, index=False)
    with db.connect(analytics.settings) as conn:
        counts = conn.execute("SELECT count(*), count(*) FILTER (WHERE path = 'x') FROM images").fetchone()
    assert counts == (12, 0)
