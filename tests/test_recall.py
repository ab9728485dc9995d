"""`vecsearch db recall`: recall of the index on the database's own rows against the exact scan,
and --tune, which makes the ef_search reaching 0.99 the database's default for every caller."""

from __future__ import annotations

import numpy as np
import psycopg
from conftest import clustered, exact_neighbours, insert_vectors, invoke_cli

from vecsearch import compact, hnsw, query, recall
from vecsearch import eval as evaluation
from vecsearch.limits import DEFAULT_EF_SEARCH


def test_recall_is_measured_against_exact_and_tune_sets_the_database_default(settings, conn):
    vectors = clustered(3000, seed=31, clusters=3, noise=3.0)  # hard: few huge, noisy clusters
    ids = insert_vectors(conn, vectors)
    # A deliberately sparse graph: with the default m 16 this table's recall at the candidate floor
    # comes out at 0.995 to 1.0 from one build to the next, which leaves nothing to measure or tune.
    hnsw.reindex(conn, 8, 32)
    sample = recall.sample(conn, 40, seed=1)
    assert len(set(sample)) == 40 and recall.sample(conn, 40, seed=1) == sample
    [measured] = recall.measure(conn, sample, 10, [1])
    # The same held-out-style queries (half the rows themselves, half moved off them), answered
    # through the neighbour query and scored against numpy's exact answers.
    asked = recall.queries(conn, sample)
    assert len(asked) == 40 and sum(bool(exclude) for _, exclude in asked) == 20

    def exact(v: list[float], exclude: list[int]) -> set[int]:
        return {i for i, _ in exact_neighbours(vectors, ids, np.asarray(v), 10, exclude=exclude)}

    expected = np.mean([len({n.id for n in query.similar_to(conn, v, 10, exclude=ex, ef_search=1)}
                            & exact(v, ex)) / 10 for v, ex in asked])
    assert abs(measured.recall - expected) < 1e-9 and measured.recall < 0.9, measured

    chosen, steps = recall.tune(conn, sample)
    assert [m.ef_search for m in steps] == list(recall.STEPS[:len(steps)]) and chosen == steps[-1].ef_search
    assert steps[-1].recall >= recall.TARGET or chosen == recall.STEPS[-1]
    assert len(steps) >= 2 and all(m.recall < recall.TARGET for m in steps[:-1]), steps
    with psycopg.connect(settings.database_url) as other:  # every new session, readers included
        assert other.execute("SHOW vecsearch.ef_search").fetchone()[0] == str(chosen)
        # Callers that give no ef_search get the database's: at 1, the candidate floor (k + 10).
        other.execute("SET vecsearch.ef_search = 1")
        low = [[r[0] for r in other.execute("SELECT id FROM vecsearch_similar(%s, 10)", [q])] for q in sample]
        explicit = [[n.id for n in query.similar(conn, q, 10, ef_search=1)] for q in sample]
        assert low == explicit
        assert low != [[n.id for n in query.similar(conn, q, 10, ef_search=1000)] for q in sample]
        # `vecsearch eval` runs the very query `similar` runs: no ef_search of its own.
        default = [[n.id for n in query.similar(conn, q, 10, ef_search=DEFAULT_EF_SEARCH)] for q in sample]
        assert low != default
        ann = evaluation.neighbours(other, "public", sample, 10, exact=False)
        assert [[i for i, _ in ann[q]] for q in sample] == low

    env = {"VECSEARCH_DATABASE_URL": settings.database_url}
    status = invoke_cli("db", "status", env=env, check=True).stdout
    assert f"ef_search: {chosen} (this database's" in status
    out = invoke_cli("db", "recall", "--sample", "10", env=env, check=True).stdout
    assert out.startswith("index: full: ") and f"\nef_search {chosen}: recall@10 " in out
    assert "over 10 held-out-style queries" in out


def test_recall_of_an_empty_table_is_one_line(settings):
    result = invoke_cli("db", "recall", env={"VECSEARCH_DATABASE_URL": settings.database_url})
    assert result.returncode != 0 and "the images table is empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_exact_answers_come_from_one_pass_and_equal_the_exact_scans(conn, monkeypatch):
    vectors = clustered(2500, seed=32, clusters=4, noise=2.0)
    vectors[::7] *= 3.5  # rows written by SQL need not be unit length: cosine ignores it
    insert_vectors(conn, vectors)
    monkeypatch.setattr(compact, "PASS_ROWS", 700)  # several blocks, the last one short
    truth = recall.exact_answers(conn, recall.sample(conn, 30, seed=4))
    scans, _ = recall._answers(conn, truth.asked, 10, None, True)
    assert truth.answers == scans
    assert all(exclude[0] not in found for (_, exclude), found in zip(truth.asked, truth.answers,
                                                                      strict=True)
               if exclude)
