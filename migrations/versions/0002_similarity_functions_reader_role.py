"""SQL interface for analytics tools: vecsearch_similar(), vecsearch_similar_to(), role vecsearch_reader.

Raw SQL on purpose: this file is the reference for what psql, Metabase, Grafana or a notebook
can call. The CLI (vecsearch/query.py) calls these same functions, so SQL users and the
`vecsearch similar` command get the same answers.

How a query runs (see ../shared/NOTES.md for the measurements behind each choice):
- candidates come from the HNSW index on `embedding::halfvec(2048)` (the ORDER BY repeats that
  exact cast, or the planner cannot use the index), then are re-ranked by the full-precision
  `embedding <=> q`, so order and distances are exact;
- the graph search keeps `ef_search` candidates (recall); only the best 2k of them (at least
  k + 10) are fetched, because every row an index scan returns costs a TOAST read and a 2048-d
  distance (it is in the scan's target list): at ef_search 100, LIMIT 100 took 7 ms where
  LIMIT 10 took 2. The re-rank only settles half-precision near-ties at the k-th place;
- `hnsw.ef_search` caps the rows one index scan returns, so it is raised to the candidate
  LIMIT when needed; `hnsw.iterative_scan = relaxed_order` keeps scanning when filters (`under`,
  the excluded ids) reject candidates. Both are function-level SET clauses: whatever the function
  sets is restored when it returns, so a caller's session settings are never changed;
- the queries run with EXECUTE, planned for each call with its actual values: a cached generic
  plan (LIMIT of unknown size) could pick a sequential scan and keep it; the candidate query
  runs with enable_seqscan off, because the planner costs 2048-d distances and TOAST reads as
  nearly free and prefers a sequential scan on tables of thousands of rows;
- a path prefix (`under`) matching fewer than 2000 rows is answered by an exact scan of those
  rows (cheaper than walking the graph past all the others); and if the index scan still yields
  fewer than k rows (the scan gave up after hnsw.max_scan_tuples), the exact scan over the
  filtered rows answers instead, so a filter returns k rows whenever k matching rows exist.

Roles are cluster-wide: `vecsearch_reader` is created once per server (if missing), and each
migrated database grants it read access.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The same limits as vecsearch.query (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200  # recall@10 0.995 at 100k vectors (bench/ann.py)
# A path prefix matching fewer rows than this is answered by an exact scan of those rows.
EXACT_BELOW = 2000

SIMILAR_TO = f"""
CREATE FUNCTION vecsearch_similar_to(
    q         vector,
    k         integer  DEFAULT 10,
    ef_search integer  DEFAULT {DEFAULT_EF_SEARCH},
    under     text     DEFAULT NULL,
    exact     boolean  DEFAULT false,
    exclude   bigint[] DEFAULT '{{}}'
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE plpgsql STABLE ROWS 10
SET search_path FROM CURRENT
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = {DEFAULT_EF_SEARCH}
SET enable_seqscan = on
AS $fn$
DECLARE
    -- Exact scans filter with starts_with(), which a btree on path serves (C collation); the
    -- candidate query uses a form no btree serves, so the filter cannot pull it off the HNSW index.
    where_under   text := CASE WHEN under IS NULL THEN '' ELSE ' AND starts_with(i.path, $4)' END;
    ann_under     text := CASE WHEN under IS NULL THEN '' ELSE ' AND left(i.path, length($4)) = $4' END;
    matching      bigint;
    candidates    integer;
    ann_ids       bigint[];
    ann_paths     text[];
    ann_distances double precision[];
BEGIN
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
    exclude := coalesce(exclude, '{{}}');
    IF NOT exact AND under IS NOT NULL THEN
        -- Few rows under the prefix: scanning them exactly is faster than walking the graph
        -- past all the others (and exact).
        EXECUTE 'SELECT count(*) FROM (SELECT FROM images i WHERE starts_with(i.path, $1) LIMIT $2) s'
            INTO matching USING under, {EXACT_BELOW};
        exact := matching < {EXACT_BELOW};
    END IF;
    IF NOT exact THEN
        -- Scoped to this call by the SET clauses above (a SET LOCAL inside such a function is
        -- undone when it returns). The planner costs a sequential scan as if 2048-d distances
        -- and TOAST reads were free and picks it over the index on tables of thousands of
        -- rows (50 ms instead of 1 ms at 3000): the candidate query is told not to.
        candidates := least({MAX_K}, greatest(k + 10, 2 * k));
        PERFORM set_config('hnsw.ef_search', greatest(candidates, ef_search)::text, true);
        PERFORM set_config('enable_seqscan', 'off', true);
        EXECUTE format($q$
            SELECT array_agg(c.id ORDER BY c.distance, c.id),
                   array_agg(c.path ORDER BY c.distance, c.id),
                   array_agg(c.distance ORDER BY c.distance, c.id)
            FROM (
                SELECT a.id, a.path, a.embedding <=> $1 AS distance
                FROM (
                    SELECT i.id, i.path, i.embedding
                    FROM images i
                    WHERE i.id <> ALL ($5) %s
                    ORDER BY i.embedding::halfvec(2048) <=> $1::halfvec(2048)
                    LIMIT $3
                ) a
                ORDER BY 3, 1
                LIMIT $2
            ) c $q$, ann_under)
            INTO ann_ids, ann_paths, ann_distances
            USING q, k, candidates, under, exclude;
        PERFORM set_config('enable_seqscan', 'on', true);
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
        SELECT i.id, i.path, i.embedding <=> $1
        FROM images i
        WHERE i.id <> ALL ($5) %s
        ORDER BY 3, 1
        LIMIT $2 $q$, where_under)
        USING q, k, NULL::integer, under, exclude;
END
$fn$
"""

SIMILAR = f"""
CREATE FUNCTION vecsearch_similar(
    image_id  bigint,
    k         integer DEFAULT 10,
    ef_search integer DEFAULT {DEFAULT_EF_SEARCH},
    under     text    DEFAULT NULL,
    exact     boolean DEFAULT false
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE sql STABLE ROWS 10
SET search_path FROM CURRENT
AS $fn$
    -- The query vector never leaves the server; the image itself is excluded.
    SELECT * FROM vecsearch_similar_to(
        (SELECT i.embedding FROM images i WHERE i.id = image_id),
        k, ef_search, under, exact, ARRAY[image_id])
$fn$
"""

COMMENTS = [
    "COMMENT ON FUNCTION vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[]) IS "
    "'The k images nearest to vector q by cosine distance (HNSW candidates re-ranked exactly). "
    "ef_search: candidates from the index (recall vs speed); under: path prefix filter; "
    "exact: exact scan; exclude: ids left out.'",
    "COMMENT ON FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean) IS "
    "'The k images nearest to image image_id by cosine distance, itself excluded; "
    "no rows if the id does not exist. Usable in joins: FROM images i, LATERAL vecsearch_similar(i.id, 5).'",
]

READER = """
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        BEGIN
            CREATE ROLE vecsearch_reader NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;  -- another database's migration won the race
            WHEN insufficient_privilege THEN
                RAISE WARNING 'vecsearch: cannot create role vecsearch_reader (%): '
                    'read-only logins (`vecsearch db reader`) are unavailable here', SQLERRM;
                RETURN;
        END;
        COMMENT ON ROLE vecsearch_reader IS
            'vecsearch read-only access: SELECT on its tables, EXECUTE on its functions';
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO vecsearch_reader', current_database());
    GRANT USAGE ON SCHEMA public TO vecsearch_reader;
    GRANT SELECT ON images, embedding_model, alembic_version TO vecsearch_reader;
    -- Tables that later migrations add are readable too.
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO vecsearch_reader;
    GRANT EXECUTE ON FUNCTION
        vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[]),
        vecsearch_similar(bigint, integer, integer, text, boolean)
        TO vecsearch_reader;
END
$do$
"""


# Revoke this database's grants; drop the role only when nothing else uses it (other databases
# of the cluster, or logins made by `vecsearch db reader` that are members of it).
UNREADER = """
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        RETURN;
    END IF;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM vecsearch_reader;
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM vecsearch_reader;
    REVOKE USAGE ON SCHEMA public FROM vecsearch_reader;
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM vecsearch_reader', current_database());
    IF NOT EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
                   WHERE r.rolname = 'vecsearch_reader') THEN
        BEGIN
            DROP ROLE vecsearch_reader;
        EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
            NULL;  -- still granted in another database
        END;
    END IF;
END
$do$
"""


def upgrade() -> None:
    op.execute(SIMILAR_TO)
    op.execute(SIMILAR)
    for comment in COMMENTS:
        op.execute(comment)
    op.execute(READER)


def downgrade() -> None:
    op.execute("DROP FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)")
    op.execute("DROP FUNCTION vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[])")
    op.execute(UNREADER)
