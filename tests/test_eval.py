"""`vecsearch eval`: metrics against hand-computed values, scratch schema, end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import invoke_cli, make_image
from PIL import Image, ImageFilter
from psycopg import sql

from vecsearch import db, scratch
from vecsearch import eval as evaluation
from vecsearch.errors import InvalidInput, VecsearchError
from vecsearch.eval import metrics, plots
from vecsearch.images import open_image

# -- metrics on hand-made neighbour lists ----------------------------------------------------

# q1 has 5 relevant copies, q2 has 2; q2 got only 3 neighbours back.
RESULTS = {"q1": ["a1", "x", "a2", "y", "a3"], "q2": ["x", "y", "b1"]}
RELEVANT = {"q1": {"a1", "a2", "a3", "a4", "a5"}, "q2": {"b1", "b2"}}
# Worked by hand (precision = hits/k, recall = hits/|relevant|, F1 per query then averaged):
#   k=1: q1 P=1 R=1/5 F1=1/3;     q2 P=0 R=0 F1=0
#   k=3: q1 P=2/3 R=2/5 F1=1/2;   q2 P=1/3 R=1/2 F1=2/5
#   k=5: q1 P=3/5 R=3/5 F1=3/5;   q2 P=1/5 R=1/2 F1=2/7   (a short list counts as misses)
EXPECTED = {1: (0.5, 0.1, 1 / 6), 3: (0.5, 0.45, 0.45), 5: (0.4, 0.55, (3 / 5 + 2 / 7) / 2)}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_mean_precision_recall_f1_equals_hand_computed(k):
    assert metrics.mean_precision_recall_f1(RESULTS, RELEVANT, k) == pytest.approx(EXPECTED[k])


def test_single_query_metrics_and_edge_cases():
    assert metrics.precision_recall_f1(["a1", "x", "a2"], {"a1", "a2", "a3", "a4", "a5"}, 3) == \
        pytest.approx((2 / 3, 2 / 5, 0.5))
    assert metrics.precision_recall_f1([], {"a"}, 2) == (0.0, 0.0, 0.0)
    assert metrics.precision_recall_f1(["a"], set(), 1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        metrics.precision_recall_f1(["a"], {"a"}, 0)


def test_ann_recall_against_exact_and_label_precision():
    ann = {"q1": [1, 2, 3], "q2": [4, 5, 6]}
    exact = {"q1": [1, 3, 9], "q2": [6, 5, 4]}
    assert metrics.recall_against_exact(ann, exact, 1) == pytest.approx(0.5)  # q1 1/1, q2 0/1
    assert metrics.recall_against_exact(ann, exact, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.label_precision(["cat", "dog", "cat"], "cat", 2) == 0.5
    assert metrics.label_precision(["cat", "dog", "cat"], "cat", 3) == pytest.approx(2 / 3)
    assert metrics.label_precision(["cat", "dog", "cat"], "cat", 5) == pytest.approx(2 / 5)


# -- perturbations ---------------------------------------------------------------------------


def test_perturbations_are_seeded_and_change_the_picture(tmp_path):
    img = open_image(make_image(tmp_path / "a.png", seed=3, size=(160, 120)))
    pixels = np.asarray(img, dtype=np.int16)
    for name, p in metrics.PERTURBATIONS.items():
        assert p.description
        one, again, other = (metrics.perturbed(img, name, 0, 1), metrics.perturbed(img, name, 0, 1),
                             metrics.perturbed(img, name, 0, 2))
        assert one.mode == "RGB"
        assert np.array_equal(np.asarray(one), np.asarray(again)), name  # same seed, same copy
        if name == "jpeg":
            assert one.size == (80, 60)
            continue
        assert one.size == img.size, name
        assert np.abs(np.asarray(one, dtype=np.int16) - pixels).mean() > 2, name  # visibly changed
        if name != "flip":  # the only one without randomness
            assert not np.array_equal(np.asarray(one), np.asarray(other)), name
    assert set(metrics.DEFAULT_PERTURBATIONS) <= set(metrics.PERTURBATIONS)
    assert len(metrics.DEFAULT_PERTURBATIONS) == 5


# -- the scratch schema ----------------------------------------------------------------------


def _schemas(conn) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", [scratch.SCRATCH_PREFIX])]


def test_scratch_schema_mirrors_the_tables_and_is_dropped(conn):
    with scratch.scratch_schema(conn) as schema:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema])}
        assert tables == {"images", "embedding_model", "vecsearch_projection", "vecsearch_dupe_decisions"}
        indexes = {r[0]: r[1] for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", [schema])}
        public = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'images'")}
        assert public <= set(indexes)  # same names: a bulk load drops and rebuilds the scratch one
        assert f"ON {schema}.images USING hnsw (((embedding)::halfvec(2048)) halfvec_cosine_ops)" in \
            indexes["images_embedding_hnsw"]
        assert _schemas(conn) == [schema]
    assert _schemas(conn) == []
    # A run killed with SIGKILL leaves its schema; the next run on this machine drops it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = f"{scratch.SCRATCH_PREFIX}{scratch._host_tag()}_{dead.pid}_0000"
    other_host = "ffffff" if scratch._host_tag() != "ffffff" else "000000"
    elsewhere = f"{scratch.SCRATCH_PREFIX}{other_host}_{dead.pid}_0000"  # not ours to judge
    for name in (left, elsewhere):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    with scratch.scratch_schema(conn) as schema:
        assert sorted(_schemas(conn)) == sorted([schema, elsewhere])
    conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(elsewhere)))
    with pytest.raises(RuntimeError), scratch.scratch_schema(conn):
        raise RuntimeError("a failed run drops its schema too")
    assert _schemas(conn) == []


def test_neighbours_in_scratch_ann_and_exact_equal_numpy(conn):
    rng = np.random.default_rng(5)
    vectors = np.maximum(rng.normal(0, 1, (60, db.DIM)), 0).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with scratch.scratch_schema(conn) as schema:
        with conn.cursor().copy(sql.SQL("COPY {}.images (path, sha256, bytes, width, height, format, mtime, "
                                        "embedding) FROM STDIN").format(sql.Identifier(schema))) as copy:
            for i, v in enumerate(vectors):
                copy.write_row([f"/v/{i}", f"{i:064x}", 1, 1, 1, "PNG", "2026-01-01", v])
        ids = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}.images ORDER BY id")
                                          .format(sql.Identifier(schema)))]
        by_row = {r[0]: int(r[1].rsplit("/", 1)[1]) for r in conn.execute(
            sql.SQL("SELECT id, path FROM {}.images").format(sql.Identifier(schema)))}
        exact = evaluation.neighbours(conn, schema, ids, 5, exact=True)
        ann = evaluation.neighbours(conn, schema, ids, 5, exact=False)
        assert conn.execute("SELECT count(*) FROM public.images").fetchone()[0] == 0
    distances = 1 - vectors @ vectors.T
    for q in ids:
        row = by_row[q]
        order = [j for j in np.argsort(distances[row], kind="stable") if j != row][:5]
        assert [by_row[i] for i, _ in exact[q]] == order
        assert [d for _, d in exact[q]] == pytest.approx([distances[row][j] for j in order], abs=1e-5)
    # On 60 rows the graph search is exact.
    assert {q: [i for i, _ in f] for q, f in ann.items()} == {q: [i for i, _ in f] for q, f in exact.items()}


# -- end to end, real images through the random-weights model --------------------------------


def _hand_metrics(per_query: list[dict], k: int, method: str) -> tuple[float, float, float]:
    """The reference: P, R, F1 of each query's list written out again, then averaged."""
    ps, rs, fs = [], [], []
    for q in per_query:
        top = [name for name, _ in q[method][:k]]
        hits = sum(1 for name in top if name in q["relevant"])
        p, r = hits / k, hits / len(q["relevant"])
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if hits else 0.0)
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


def test_perturb_end_to_end(settings, conn, embedder, tmp_path):
    folder = tmp_path / "photos"
    for seed in (11, 12, 13):
        make_image(folder / f"p{seed}.png", seed=seed, size=(256, 192))
    (folder / "broken.jpg").write_bytes(b"not an image")
    report = evaluation.perturb(settings, folder, embedder, originals=3, ks=(1, 3, 5), seed=4)
    assert (report.queries, report.images, report.ks) == (3, 18, [1, 3, 5])
    assert sorted(report.originals) == sorted(str(p) for p in folder.glob("p*.png"))
    assert any(path.endswith("broken.jpg") for path, _ in report.skipped)
    for row in report.metrics:
        for method in ("ann", "exact"):
            assert (row[f"{method}_precision"], row[f"{method}_recall"], row[f"{method}_f1"]) == \
                pytest.approx(_hand_metrics(report.per_query, row["k"], method))
    # The exact lists and distances equal numpy on vectors embedded here, outside the database.
    names, images = [], []
    for n, original in enumerate(report.originals):
        names.append(f"{n:05d}_original")
        images.append(open_image(original))
        work = open_image(original, draft=evaluation.WORK_PX)
        work.thumbnail((evaluation.WORK_PX, evaluation.WORK_PX))
        for kind in metrics.DEFAULT_PERTURBATIONS:
            names.append(f"{n:05d}_{kind}")
            images.append(metrics.perturbed(work, kind, 4, n))
    vectors = embedder.embed_images(images)
    distances = 1 - vectors @ vectors.T
    for q in report.per_query:
        row = names.index(q["query"])
        order = [j for j in np.argsort(distances[row]) if j != row][:5]
        assert [name for name, _ in q["exact"]] == [names[j] for j in order]
        assert [d for _, d in q["exact"]] == pytest.approx([distances[row][j] for j in order], abs=1e-4)
    assert [d["perturbation"] for d in report.details] == list(metrics.DEFAULT_PERTURBATIONS)
    assert all(d["copies"] == 3 for d in report.details)
    # The user's table and the scratch schema: untouched, and gone.
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    assert _schemas(conn) == []
    with pytest.raises(InvalidInput, match="unknown perturbation"):
        evaluation.perturb(settings, folder, embedder, perturbations=["smudge"])


def test_labels_end_to_end_via_cli(settings, conn, embedder, tmp_path):
    folder = tmp_path / "labelled"
    # Each label: variants of one picture (resized, blurred, re-encoded), so same-label neighbours
    # come first even for an untrained network.
    for label, seed in (("cats", 21), ("dogs", 22), ("owls", 23)):
        base = make_image(folder / label / "a.png", seed=seed, size=(240, 180))
        img = Image.open(base)
        img.resize((200, 150)).save(folder / label / "b.png")
        img.filter(ImageFilter.GaussianBlur(1)).save(folder / label / "c.jpg", quality=85)
    make_image(folder / "unlabelled.png", seed=99)
    plot = tmp_path / "labels.png"
    result = invoke_cli("eval", "labels", str(folder), "-k", "1,2,4", "--weights", "random", "--json",
                     "--plot", str(plot), check=True)
    report = json.loads(result.stdout)
    assert "--weights random" in result.stderr
    assert (report["experiment"], report["images"], report["ks"]) == ("labels", 9, [1, 2, 4])
    assert {q["query"].split("/")[0] for q in report["per_query"]} == {"cats", "dogs", "owls"}
    for row in report["metrics"]:
        k = row["k"]
        hand = [sum(1 for name, _ in q["exact"][:k] if name.split("/")[0] == q["label"]) / k
                for q in report["per_query"]]
        assert row["exact_precision"] == pytest.approx(sum(hand) / len(hand))
    by_k = {row["k"]: row for row in report["metrics"]}
    assert by_k[1]["exact_precision"] == by_k[1]["ann_precision"] == 1.0
    assert by_k[2]["exact_precision"] == 1.0
    assert by_k[4]["exact_precision"] == pytest.approx(0.5)  # only 2 others share a label
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    assert _schemas(conn) == []
    table = invoke_cli("eval", "labels", str(folder / "cats"), "--weights", "random")
    assert table.returncode == 1 and "needs at least 2 sub-folders" in table.stderr


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(VecsearchError, match=r"pip install 'vecsearch\[plot\]'"):
        plots.plot_available()


def test_eval_ann_neighbours_are_row_for_row_what_vecsearch_similar_returns(indexed, indexed_conn):
    """eval measures the search that ships: the same query, candidates and settings as `similar`."""
    import json

    from conftest import invoke_cli

    from vecsearch import query

    conn, ids = indexed_conn, indexed.rows.ids
    probes = ids[::50]
    for ef_search in (10, 200):
        ann = evaluation.neighbours(conn, "public", probes, 10, exact=False, ef_search=ef_search)
        exact = evaluation.neighbours(conn, "public", probes, 10, exact=True)
        for q in probes:
            shipped = query.similar(conn, q, 10, ef_search=ef_search)
            assert ann[q] == [(n.id, n.distance) for n in shipped]
        for q in probes[:3]:
            args = ("similar", str(q), "-k", "10", "--ef-search", str(ef_search), "-f", "json")
            cli = json.loads(invoke_cli(*args, check=True).stdout)
            assert [r["id"] for r in cli] == [i for i, _ in ann[q]]
        assert all(len(exact[q]) == 10 for q in probes)
