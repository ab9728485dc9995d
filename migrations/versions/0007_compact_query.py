"""The compact index's query, cheaper: a by-id query uses the row's own reduced vector, and only
the R nearest of the graph's candidates are re-ranked by the full vector.

0006 re-ranked every one of the ef_search candidates (each a TOASTed 8 KB vector read) and
reduced every query vector in SQL (one 2048-d product per axis), also for `vecsearch_similar(id)`,
whose row already holds its reduced vector. Now:

- `vecsearch_nearest(q, q_reduced, q_version, ...)` is the one neighbour query. `q_reduced` is
  used when `q_version` is the projection in use (a row's own `reduced` / `reduced_version`),
  else q is reduced by vecsearch_reduce(). `vecsearch_similar_to` and `vecsearch_similar` keep
  their signatures, defaults and answers and call it; so does `vecsearch dupes`.
- `vecsearch_projection.rerank`: how many of the graph's candidates, nearest in the reduced space
  first, are re-ranked exactly (at least k + 10 and 2k, at most ef_search). NULL re-ranks all of
  them, as 0006. `vecsearch db reindex --dims auto` and `vecsearch db recall --tune` set it to
  the smallest depth that keeps the measured recall; a new projection starts from NULL.

Revision ID: 0007
Revises: 0006
"""

from alembic import op
from alembic.script import ScriptDirectory

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The same limits as vecsearch.limits (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200
EXACT_BELOW = 2000

RERANK = """
ALTER TABLE vecsearch_projection ADD COLUMN rerank integer CHECK (rerank BETWEEN 1 AND 1000);
COMMENT ON COLUMN vecsearch_projection.rerank IS
    'Candidates of the compact graph re-ranked by the full vector (nearest in the reduced space '
    'first; at least k + 10 and 2k, at most ef_search); NULL: all ef_search of them.'
"""

NEAREST = f"""
CREATE FUNCTION vecsearch_nearest(
    q         vector,
    q_reduced halfvec,
    q_version integer,
    k         integer  DEFAULT 10,
    ef_search integer  DEFAULT NULL,
    under     text     DEFAULT NULL,
    exact     boolean  DEFAULT false,
    exclude   bigint[] DEFAULT '{{}}'
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE plpgsql VOLATILE ROWS 10  -- VOLATILE: only such a function may run SET LOCAL
SET search_path FROM CURRENT
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = {DEFAULT_EF_SEARCH}
SET enable_seqscan = on
AS $fn$
DECLARE
    -- Exact scans filter with starts_with(), which a btree on path serves (C collation); the
    -- candidate query uses a form no btree serves, so the filter cannot pull it off the HNSW index.
    where_under   text := CASE WHEN under IS NULL THEN '' ELSE ' AND starts_with(i.path, $4)' END;
    ann_under     text := CASE WHEN under IS NULL THEN '' ELSE ' AND left(i.path, length($3)) = $3' END;
    distributed   boolean := false;
    propagate     text;
    matching      bigint;
    candidates    integer;
    projection    integer;
    dims          integer;
    rerank        integer;
    ann_ids       bigint[];
    ann_paths     text[];
    ann_distances double precision[];
    more_ids      bigint[];
    more_paths    text[];
    more_distances double precision[];
BEGIN
    -- No ef_search given: this database's own (`vecsearch db recall --tune` measures and sets
    -- it), else the default.
    ef_search := coalesce(ef_search, nullif(current_setting('vecsearch.ef_search', true), '')::integer,
                          {DEFAULT_EF_SEARCH});
    IF k IS NULL OR k < 1 OR k > {MAX_K} THEN
        RAISE EXCEPTION 'k must be between 1 and {MAX_K}, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ef_search IS NULL OR ef_search < 1 OR ef_search > 1000 THEN
        RAISE EXCEPTION 'ef_search must be between 1 and 1000, not %', coalesce(ef_search::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF q IS NULL THEN
        RETURN;
    END IF;
    IF vector_norm(q) = 0 THEN
        RAISE EXCEPTION 'q is a zero vector: its cosine distance to anything is undefined'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A NULL among the excluded ids would make `id <> ALL (exclude)` NULL for every row.
    exclude := array_remove(coalesce(exclude, '{{}}'), NULL);
    IF NOT exact AND under IS NOT NULL THEN
        -- Few rows under the prefix: scanning them exactly is faster than walking the graph
        -- past all the others (and exact).
        EXECUTE 'SELECT count(*) FROM (SELECT 1 FROM images i WHERE starts_with(i.path, $1) LIMIT $2) s'
            INTO matching USING under, {EXACT_BELOW};
        exact := matching < {EXACT_BELOW};
    END IF;
    IF NOT exact THEN
        SELECT p.version, p.dims, p.rerank INTO projection, dims, rerank
        FROM vecsearch_projection p WHERE p.in_use;
        candidates := least({MAX_K}, greatest(k + 10, 2 * k));
        IF projection IS NOT NULL THEN
            -- The reduced space only ranks candidates: the nearest `rerank` of the graph's
            -- ef_search are re-ranked (all of them where none was measured).
            candidates := least({MAX_K}, greatest(candidates, least(coalesce(rerank, ef_search), ef_search)));
            IF q_reduced IS NULL OR q_version IS DISTINCT FROM projection THEN
                q_reduced := vecsearch_reduce(q, projection);
            END IF;
        END IF;
        IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
            EXECUTE 'SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition '
                    'WHERE logicalrelid = ''images''::regclass)' INTO distributed;
        END IF;
        -- The index scan's settings (vecsearch_search_settings), for this call only: the SET
        -- clauses above restore them when it returns. Under Citus they also go to the shards.
        IF distributed THEN
            propagate := current_setting('citus.propagate_set_commands');
            EXECUTE 'SET LOCAL citus.propagate_set_commands = local';
        END IF;
        PERFORM vecsearch_search_settings(greatest(candidates, ef_search));
        -- The inner ORDER BY ... LIMIT goes to every shard whole (each shard's HNSW index, and
        -- the exact distance of its candidates computed there) and is merged; the outer query
        -- re-ranks. Under Citus the inner query runs as a subplan, which opens a coordinated
        -- transaction: the SET LOCALs above reach the shards only in one (a flat query in
        -- autocommit would run without it, with the workers' defaults).
        EXECUTE format($q$
            SELECT array_agg(c.id ORDER BY c.distance, c.id),
                   array_agg(c.path ORDER BY c.distance, c.id),
                   array_agg(c.distance ORDER BY c.distance, c.id)
            FROM (
                SELECT a.id, a.path, a.distance
                FROM (
                    SELECT i.id, i.path, i.embedding <=> $1::vector AS distance
                    FROM images i
                    WHERE i.id <> ALL ($4::bigint[]) %s
                    ORDER BY %s
                    LIMIT $2::integer
                ) a
                ORDER BY 3, 1
                LIMIT $5::integer
            ) c $q$, ann_under || CASE WHEN projection IS NULL THEN ''
                                  ELSE format(' AND i.reduced_version = %s', projection) END,
                 CASE WHEN projection IS NULL THEN 'i.embedding::halfvec(2048) <=> $1::halfvec(2048)'
                 ELSE format('i.reduced::halfvec(%s) <-> $6::halfvec(%s)', dims, dims) END)
            INTO ann_ids, ann_paths, ann_distances
            USING q, candidates, under, exclude, k, q_reduced;
        IF projection IS NOT NULL THEN
            -- Rows the compact graph lacks (written by plain SQL since the last reindex): exact.
            EXECUTE format($q$
                SELECT array_agg(c.id), array_agg(c.path), array_agg(c.distance)
                FROM (
                    SELECT i.id, i.path, i.embedding <=> $1::vector AS distance
                    FROM images i
                    WHERE i.reduced IS NULL AND i.id <> ALL ($3::bigint[]) %s
                    ORDER BY 3, 1
                    LIMIT $2::integer
                ) c $q$, where_under)
                INTO more_ids, more_paths, more_distances
                USING q, k, exclude, under;
        END IF;
        IF distributed THEN  -- the workers' own settings for the rest of the caller's transaction
            PERFORM vecsearch_search_settings(NULL);
            EXECUTE format('SET LOCAL citus.propagate_set_commands = %L', propagate);
        END IF;
        EXECUTE 'SET LOCAL enable_seqscan = on';
        IF more_ids IS NOT NULL THEN
            SELECT array_agg(m.i ORDER BY m.d, m.i), array_agg(m.p ORDER BY m.d, m.i),
                   array_agg(m.d ORDER BY m.d, m.i)
            INTO ann_ids, ann_paths, ann_distances
            FROM (SELECT * FROM unnest(coalesce(ann_ids, '{{}}') || more_ids,
                                       coalesce(ann_paths, '{{}}') || more_paths,
                                       coalesce(ann_distances, '{{}}') || more_distances) AS u(i, p, d)
                  ORDER BY u.d, u.i LIMIT k) m;
        END IF;
        IF cardinality(ann_ids) >= k THEN
            RETURN QUERY SELECT * FROM unnest(ann_ids, ann_paths, ann_distances);
            RETURN;
        END IF;
        -- Fewer than k: a filter so selective that the index scan gave up (hnsw.max_scan_tuples),
        -- or a table of fewer than k rows. The exact scan of the filtered rows answers.
        -- (The rows just fetched went into variables, never into the result.)
    END IF;
    -- Exact: the full-precision distance, which no index serves.
    RETURN QUERY EXECUTE format($q$
        SELECT i.id, i.path, i.embedding <=> $1::vector
        FROM images i
        WHERE i.id <> ALL ($5::bigint[]) %s
        ORDER BY 3, 1
        LIMIT $2::integer $q$, where_under)
        USING q, k, NULL::integer, under, exclude;
END
$fn$
"""

SIMILAR_TO = """
CREATE FUNCTION vecsearch_similar_to(
    q         vector,
    k         integer  DEFAULT 10,
    ef_search integer  DEFAULT NULL,
    under     text     DEFAULT NULL,
    exact     boolean  DEFAULT false,
    exclude   bigint[] DEFAULT '{}'
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE sql VOLATILE ROWS 10
SET search_path FROM CURRENT
AS $fn$
    SELECT * FROM vecsearch_nearest(q, NULL, NULL, k, ef_search, under, exact, exclude)
$fn$
"""

SIMILAR = """
CREATE FUNCTION vecsearch_similar(
    image_id  bigint,
    k         integer DEFAULT 10,
    ef_search integer DEFAULT NULL,
    under     text    DEFAULT NULL,
    exact     boolean DEFAULT false
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE plpgsql STABLE ROWS 10
SET search_path FROM CURRENT
AS $fn$
DECLARE
    q  vector;
    rq halfvec;
    rv integer;
BEGIN
    -- The query vector never leaves the server; the image itself is excluded. Its own reduced
    -- vector saves reducing it again. (Variables: a scalar subquery on a distributed table
    -- inside the call is a join Citus refuses.)
    SELECT i.embedding, i.reduced, i.reduced_version INTO q, rq, rv
    FROM images i WHERE i.id = image_id LIMIT 1;
    RETURN QUERY SELECT * FROM vecsearch_nearest(q, rq, rv, k, ef_search, under, exact, ARRAY[image_id]);
END
$fn$
"""

COMMENTS = [
    "COMMENT ON FUNCTION vecsearch_nearest(vector, halfvec, integer, integer, integer, text, boolean, "
    "bigint[]) IS 'vecsearch_similar_to with the query''s reduced vector given where the caller has "
    "it (a row''s reduced, reduced_version): used when q_version is the projection in use, else q is "
    "reduced here.'",
]

SIGNATURES = ("vecsearch_similar(bigint, integer, integer, text, boolean)",
              "vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[])")


def _grant(functions: str) -> str:
    return f"""
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        GRANT EXECUTE ON FUNCTION {functions} TO vecsearch_reader;
    END IF;
END
$do$
"""


def _revision(name: str):
    return ScriptDirectory.from_config(op.get_context().config).get_revision(name).module


def upgrade() -> None:
    for statement in RERANK.split(";\n"):  # one at a time: Citus prepares each command alone
        if statement.strip():
            op.execute(statement)
    for signature in SIGNATURES:  # vecsearch_similar calls vecsearch_similar_to: both go
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(NEAREST)
    op.execute(SIMILAR_TO)
    op.execute(SIMILAR)
    for comment in _revision("0004").COMMENTS + COMMENTS:
        op.execute(comment)
    op.execute(_grant("vecsearch_nearest(vector, halfvec, integer, integer, integer, text, boolean, "
                      "bigint[]), " + ", ".join(SIGNATURES)))


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute("DROP FUNCTION vecsearch_nearest(vector, halfvec, integer, integer, integer, text, "
               "boolean, bigint[])")
    before = _revision("0006")
    op.execute(before.SIMILAR_TO)
    op.execute(_revision("0004").SIMILAR)
    for comment in _revision("0004").COMMENTS:
        op.execute(comment)
    op.execute(_grant(", ".join(SIGNATURES)))
    op.execute("ALTER TABLE vecsearch_projection DROP COLUMN rerank")
