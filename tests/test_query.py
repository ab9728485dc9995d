"""Neighbour queries: `vecsearch similar` / `search`, vector arithmetic, filters, errors.

Most tests use synthetic CNN-like vectors inserted with COPY (fast); the image tests embed real
Pillow pictures with the random-weights test model. Every result is checked against a numpy
reference computed from the same vectors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    HNSW_TEMPLATE,
    Rows,
    clustered,
    exact_neighbours,
    fresh_database,
    insert_vectors,
    invoke_cli,
    make_image,
)
from PIL import Image, ImageFilter

from vecsearch import db, expr, paths, query
from vecsearch.config import Settings
from vecsearch.errors import InvalidInput, NotFound


def assert_same(neighbours: list[query.Neighbour], reference) -> None:
    assert [n.id for n in neighbours] == [i for i, _ in reference]
    np.testing.assert_allclose([n.distance for n in neighbours], [d for _, d in reference], atol=1e-6)


class Loaded:
    """A database of 2500 synthetic rows (enough for the planner to use the HNSW index): a clone
    of conftest's hnsw_rows template (10% under /photos/a/, 13 rows under /photos/rare/, the rest
    under /photos/b/; /photos/ab/ shares the prefix "/photos/a" but is not under /photos/a)."""

    def __init__(self, url: str, home: Path, rows: Rows) -> None:
        self.settings = Settings(database_url=url, home=home)
        self.env = {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(home)}
        self.vectors, self.ids, self.paths = rows.vectors, rows.ids, rows.paths
        self.mask = rows.mask


@pytest.fixture(scope="module")
def loaded(pg_home, hnsw_rows):
    with fresh_database(pg_home, HNSW_TEMPLATE) as url:
        yield Loaded(url, pg_home, hnsw_rows)


@pytest.fixture
def lconn(loaded):
    with db.connect(loaded.settings) as conn:
        yield conn


def test_similar_by_id_matches_exact_reference_and_excludes_itself(loaded, lconn):
    hits = 0
    for j in (0, 1, 500, 1234, 2499):
        image_id = loaded.ids[j]
        reference = exact_neighbours(loaded.vectors, loaded.ids, loaded.vectors[j], 10, exclude=[image_id])
        ann = query.similar(lconn, image_id, 10)
        assert image_id not in [n.id for n in ann]
        assert [n.distance for n in ann] == sorted(n.distance for n in ann)
        # Re-ranked: every distance returned is the exact full-precision one.
        by_id = {i: d for i, d in exact_neighbours(loaded.vectors, loaded.ids, loaded.vectors[j], 2500)}
        np.testing.assert_allclose([n.distance for n in ann], [by_id[n.id] for n in ann], atol=1e-6)
        hits += len({n.id for n in ann} & {i for i, _ in reference})
        assert_same(query.similar(lconn, image_id, 10, exact=True), reference)
    assert hits / 50 >= 0.96  # recall@10 of the index at the default ef_search


def test_ann_equals_exact_on_a_small_set(conn):
    vectors = clustered(400, seed=2)
    ids = insert_vectors(conn, vectors)
    for j in range(0, 400, 20):
        ann = query.similar(conn, ids[j], 10)
        assert_same(ann, exact_neighbours(vectors, ids, vectors[j], 10, exclude=[ids[j]]))
        assert ann == query.similar(conn, ids[j], 10, exact=True)


def test_near_copy_vector_comes_first(conn):
    vectors = clustered(300, seed=3)
    rng = np.random.default_rng(4)
    copy = vectors[17] + rng.normal(scale=0.002, size=db.DIM).astype(np.float32)
    ids = insert_vectors(conn, np.vstack([vectors, copy / np.linalg.norm(copy)]))
    first = query.similar(conn, ids[17], 5)[0]
    assert first.id == ids[-1] and first.similarity > 0.99


def test_under_filter_returns_k_rows_when_k_match(loaded, lconn):
    j = 0
    for prefix, k in (("/photos/a", 40), ("/photos/rare", 5), ("/photos/b/", 100)):
        image_id = loaded.ids[j]
        ann = query.similar(lconn, image_id, k, under=prefix)
        directory = paths.under_prefix(prefix)
        reference = exact_neighbours(loaded.vectors, loaded.ids, loaded.vectors[j], k, exclude=[image_id],
                          mask=loaded.mask(directory))
        assert len(ann) == k
        assert all(n.path.startswith(directory) for n in ann)  # /photos/ab/ is not under /photos/a
        hits = len({n.id for n in ann} & {i for i, _ in reference})
        assert hits >= 0.9 * k, (prefix, hits)
        assert_same(query.similar(lconn, image_id, k, under=prefix, exact=True), reference)


def test_under_filter_with_fewer_matches_than_k_returns_them_all(loaded, lconn):
    ann = query.similar(lconn, loaded.ids[0], 50, under="/photos/rare/")
    assert len(ann) == loaded.mask("/photos/rare/").sum() < 50
    reference = exact_neighbours(loaded.vectors, loaded.ids, loaded.vectors[0], 50,
                                 mask=loaded.mask("/photos/rare/"))
    assert_same(ann, reference)


def test_under_relative_dir_is_made_absolute(loaded, lconn, monkeypatch):
    monkeypatch.chdir("/")
    assert query.similar(lconn, loaded.ids[0], 10, under="photos/rare") == \
        query.similar(lconn, loaded.ids[0], 10, under="/photos/rare")


def test_ef_search_and_large_k(loaded, lconn):
    image_id = loaded.ids[5]
    # k above the default ef_search: ef_search is raised to k, so all k rows come back.
    big = query.similar(lconn, image_id, 300)
    assert len(big) == 300 and len({n.id for n in big}) == 300
    reference = exact_neighbours(loaded.vectors, loaded.ids, loaded.vectors[5], 10, exclude=[image_id])
    low = query.similar(lconn, image_id, 10, ef_search=10)
    high = query.similar(lconn, image_id, 10, ef_search=400)
    recall = [len({n.id for n in r} & {i for i, _ in reference}) for r in (low, high)]
    assert recall[1] >= recall[0] and recall[1] >= 9


def test_similar_to_vector_list_and_exclude(loaded, lconn):
    q = clustered(1, seed=99)[0]
    exclude = [n.id for n in query.similar_to(lconn, q, 3, exact=True)]
    result = query.similar_to(lconn, q.tolist(), 10, exclude=exclude, exact=True)
    assert_same(result, exact_neighbours(loaded.vectors, loaded.ids, q, 10, exclude=exclude))
    with pytest.raises(InvalidInput, match="512 dimensions"):
        query.similar_to(lconn, [0.1] * 512)


def test_library_errors(loaded, lconn, conn):
    with pytest.raises(NotFound, match="no image with id 999999"):
        query.similar(lconn, 999999)
    for k in (0, -1, 1001):
        with pytest.raises(InvalidInput, match="k must be between 1 and 1000"):
            query.similar(lconn, loaded.ids[0], k)
    with pytest.raises(InvalidInput, match="ef-search"):
        query.similar(lconn, loaded.ids[0], ef_search=5000)
    with pytest.raises(NotFound, match="no other images under /nowhere/"):
        query.similar(lconn, loaded.ids[0], under="/nowhere")
    with pytest.raises(NotFound, match="has no images"):
        query.similar(conn, 1)  # `conn`: an empty database
    with pytest.raises(NotFound, match="has no images"):
        query.similar_to(conn, clustered(1, seed=0)[0])


# -- arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, terms", [
    ("12", [expr.Term(1.0, 12)]),
    ("12 + 40*0.5 - 7", [expr.Term(1.0, 12), expr.Term(0.5, 40), expr.Term(-1.0, 7)]),
    ("12+40*0.5-7", [expr.Term(1.0, 12), expr.Term(0.5, 40), expr.Term(-1.0, 7)]),
    ("-7 + 0.5*40 - -3", [expr.Term(-1.0, 7), expr.Term(0.5, 40), expr.Term(1.0, 3)]),
    ("40*2", [expr.Term(2.0, 40)]),
    ("./beach.jpg + 40", [expr.Term(1.0, Path("beach.jpg")), expr.Term(1.0, 40)]),
    ("2024-06-01-sea.jpg - 3", [expr.Term(1.0, Path("2024-06-01-sea.jpg")), expr.Term(-1.0, 3)]),
    ("./beach.jpg*2 - 1e-1*5", [expr.Term(2.0, Path("beach.jpg")), expr.Term(-0.1, 5)]),
    ("'my photo.jpg' * 0.5 + 1", [expr.Term(0.5, Path("my photo.jpg")), expr.Term(1.0, 1)]),
])
def test_parse(text, terms):
    assert expr.parse(text) == terms


@pytest.mark.parametrize("text, position, message", [
    ("12 + * 3", 5, "expected an image id or file, not '*'"),
    ("12 +", 4, "expected an image id or file after '+'"),
    ("12 40", 3, "expected + or - before '40'"),
    ("0.5", 0, "0.5 is a weight, not an image"),
    ("0.5*0.2 + 1", 0, "neither 0.5 nor 0.2 is an image id"),
    ("12*2*3", 4, "one weight per term"),
    ("a.jpg * b.jpg", 6, "two images multiplied"),
    ("1 + 'x.jpg", 4, "unterminated quote"),
    ("1 - 99999999999999999999", 4, "too large for an image id"),
])
def test_parse_errors_point_at_the_bad_token(text, position, message):
    with pytest.raises(InvalidInput) as info:
        expr.parse(text)
    first, shown, caret = str(info.value).splitlines()
    assert first == f"bad expression at position {position + 1}: " + first.split(": ", 1)[1]
    assert message in first
    assert shown == f"  {text}" and caret == "  " + " " * position + "^"


def test_empty_expression():
    with pytest.raises(InvalidInput, match="empty expression"):
        expr.parse("   ")


def test_arithmetic_matches_numpy_reference(loaded, lconn):
    a, b, c = (loaded.ids[j] for j in (12, 40, 7))
    vector, exclude = expr.evaluate(lconn, expr.parse(f"{a} + {b}*0.5 - {c}"), embed_file=None)
    v = loaded.vectors.astype(np.float64)
    reference = v[12] + 0.5 * v[40] - v[7]
    reference /= np.linalg.norm(reference)
    np.testing.assert_allclose(vector, reference, atol=1e-6)
    assert sorted(exclude) == sorted([a, b, c])
    result = query.similar_to(lconn, vector, 10, exclude=exclude, exact=True)
    assert_same(result, exact_neighbours(loaded.vectors, loaded.ids, reference, 10, exclude=[a, b, c]))
    # The same through the CLI.
    out = invoke_cli("similar", f"{a} + {b}*0.5 - {c}", "-k", "10", "--exact", "-f", "json",
                  env=loaded.env, check=True)
    assert [r["id"] for r in json.loads(out.stdout)] == [n.id for n in result]


def test_arithmetic_errors(loaded, lconn):
    a = loaded.ids[3]
    with pytest.raises(InvalidInput, match="cancels out"):
        expr.evaluate(lconn, expr.parse(f"{a} - {a}"), embed_file=None)
    with pytest.raises(NotFound, match="no image with id 888888, 999999"):
        expr.evaluate(lconn, expr.parse(f"{a} + 999999 - 888888"), embed_file=None)


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_similar_formats(loaded, lconn):
    image_id = loaded.ids[100]
    result = query.similar(lconn, image_id, 5)
    rows = json.loads(invoke_cli("similar", str(image_id), "-k", "5", "-f", "json", env=loaded.env,
                              check=True).stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [(r["id"], r["path"]) for r in rows] == [(n.id, n.path) for n in result]
    np.testing.assert_allclose([r["similarity"] for r in rows], [n.similarity for n in result])
    csv_lines = invoke_cli("similar", str(image_id), "-k", "5", "--format", "csv", env=loaded.env,
                        check=True).stdout.splitlines()
    assert csv_lines[0] == "rank,id,similarity,path" and len(csv_lines) == 6
    paths = invoke_cli("similar", str(image_id), "-k", "5", "-f", "paths", env=loaded.env, check=True).stdout
    assert paths.splitlines() == [n.path for n in result]
    table = invoke_cli("similar", str(image_id), "-k", "5", env=loaded.env, check=True).stdout
    assert loaded.paths[100] in table  # the title names the query image
    for word in ("rank", "id", "similarity", "path", result[0].path):
        assert word in table


@pytest.mark.parametrize("args, message", [
    (["similar", "999999"], "error: no image with id 999999"),
    (["similar", "5", "-k", "0"], "error: k must be between 1 and 1000, not 0"),
    (["similar", "5", "-k", "100000"], "error: k must be between 1 and 1000, not 100000"),
    (["similar", "5", "--ef-search", "0"], "error: ef-search must be between 1 and 1000"),
    (["similar", "5 + * 3"], "error: bad expression at position 5"),
    (["similar", "5", "--under", "/nowhere"], "error: no other images under /nowhere/"),
    (["search", "/nonexistent.jpg"], "error: no such image file: /nonexistent.jpg"),
])
def test_cli_errors_are_one_clear_line(loaded, args, message):
    result = invoke_cli(*args, env=loaded.env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    if "expression" not in message:
        assert len(result.stderr.strip().splitlines()) == 1


def test_cli_search_needs_a_recorded_model(loaded, tmp_path):
    # Synthetic rows, no `vecsearch load`: nothing says which model to embed the file with.
    result = invoke_cli("search", str(make_image(tmp_path / "x.png", seed=1)), env=loaded.env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the database records no model to embed files with")


def test_cli_on_an_empty_database(settings):
    result = invoke_cli("similar", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: the database has no images: run `vecsearch load DIR` first"


def test_similar_never_imports_torch_or_numpy(loaded):
    """The query path stays light: no torch, numpy, SQLAlchemy, alembic or pydantic (typer >= 0.29)."""
    code = ("import sys; from vecsearch.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'sqlalchemy', 'alembic', 'pydantic')"
            " if m in sys.modules)\nprint('HEAVY', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, "similar", str(loaded.ids[0]), "-k", "3"],
                            capture_output=True, text=True, env={**os.environ, **loaded.env},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr
    assert loaded.paths[0] in result.stdout


# -- real images, the random-weights test model ------------------------------------------------


@pytest.fixture(scope="module")
def photos(pg_home, embedder, tmp_path_factory):
    """Eight distinct pictures and a blurred, resized JPEG copy of picture 0, loaded."""
    from vecsearch import models

    folder = tmp_path_factory.mktemp("photos")
    files = [make_image(folder / f"p{seed}.png", seed) for seed in range(8)]
    copy = folder / "p0_copy.jpg"
    Image.open(files[0]).filter(ImageFilter.GaussianBlur(1)).resize((300, 225)).save(copy, quality=80)
    outside = tmp_path_factory.mktemp("outside") / "p0_other_copy.jpg"
    Image.open(files[0]).resize((280, 210)).save(outside, quality=70)
    files.append(copy)
    vectors = np.stack([embedder.embed_file(f) for f in files])
    with fresh_database(pg_home) as url:
        settings = Settings(database_url=url, home=pg_home)
        with db.connect(settings) as conn:
            models.ensure_model(conn, embedder.record)
            ids = insert_vectors(conn, vectors, [str(f) for f in files])
        yield {"settings": settings, "files": files, "ids": ids, "vectors": vectors, "copy": copy,
               "outside": outside, "env": {"VECSEARCH_DATABASE_URL": url, "VECSEARCH_HOME": str(pg_home)}}


def test_neighbours_of_a_near_copy_image_come_first(photos):
    with db.connect(photos["settings"]) as conn:
        assert query.similar(conn, photos["ids"][0], 3)[0].id == photos["ids"][-1]
        assert query.similar(conn, photos["ids"][-1], 3)[0].id == photos["ids"][0]


def test_search_file_embeds_with_the_recorded_model(photos, embedder):
    with db.connect(photos["settings"]) as conn:
        # A file outside the database: its original and the other copy come first.
        found = query.search_file(conn, photos["outside"], 3, embedder=embedder)
        assert {n.id for n in found[:2]} == {photos["ids"][0], photos["ids"][-1]}
        # A file that is in the database does not find itself.
        found = query.search_file(conn, photos["files"][0], 3, embedder=embedder)
        assert photos["ids"][0] not in [n.id for n in found] and found[0].id == photos["ids"][-1]


def test_search_file_refuses_another_model(photos, embedder):
    from vecsearch import models
    from vecsearch.errors import SchemaMismatch

    with db.connect(photos["settings"]) as conn:
        conn.execute("UPDATE embedding_model SET weights = %s", [models.DEFAULT_WEIGHTS])
        try:
            with pytest.raises(SchemaMismatch, match="IMAGENET1K_V2"):
                query.search_file(conn, photos["outside"], 3, embedder=embedder)
        finally:
            conn.execute("UPDATE embedding_model SET weights = %s", [embedder.record.weights])


def test_cli_arithmetic_with_a_file_term_embeds_it_with_the_recorded_model(photos, embedder):
    """`similar "'FILE' + ID"`: the CLI embeds the file term (loaded only then) as the library does."""
    ids, vectors = photos["ids"], photos["vectors"]
    text = f"'{photos['outside']}' + {ids[3]}*0.5"
    result = invoke_cli("similar", text, "-k", "4", "--exact", "-f", "paths", env=photos["env"], check=True)
    reference = embedder.embed_file(photos["outside"]).astype(np.float64) + 0.5 * vectors[3]
    expected = exact_neighbours(vectors, ids, reference, 4, exclude=[ids[3]])
    paths = {i: str(f) for i, f in zip(ids, photos["files"], strict=True)}
    assert result.stdout.split() == [paths[i] for i, _ in expected]


def test_cli_search_file(photos):
    result = invoke_cli("search", str(photos["outside"]), "-k", "2", "-f", "paths", env=photos["env"],
                     check=True)
    assert set(result.stdout.split()) == {str(photos["files"][0]), str(photos["copy"])}
    assert result.stderr.startswith("warning: --weights random") and "Traceback" not in result.stderr


def test_arithmetic_with_a_file_term(photos, embedder):
    ids, vectors = photos["ids"], photos["vectors"]
    with db.connect(photos["settings"]) as conn:
        terms = expr.parse(f"'{photos['files'][0]}' + {ids[3]}*0.5 - {ids[5]}")
        vector, exclude = expr.evaluate(conn, terms, embedder.embed_file)
        reference = vectors[0].astype(np.float64) + 0.5 * vectors[3] - vectors[5]
        np.testing.assert_allclose(vector, reference / np.linalg.norm(reference), atol=1e-5)
        # The file is in the database: its row is excluded like the ids.
        assert sorted(exclude) == sorted([ids[0], ids[3], ids[5]])
        result = query.similar_to(conn, vector, 4, exclude=exclude)
        assert_same(result, exact_neighbours(vectors, ids, reference, 4, exclude=exclude))
