"""One schema for a single PostgreSQL and a Citus cluster: images keyed by path; neighbour
functions that Citus runs per shard.

Keys. Citus needs every unique constraint of a distributed table to contain its distribution
column, so `id PRIMARY KEY` and `path UNIQUE` cannot both stay. `path` is what a row is (one
row per file, the upsert's conflict target) and what `vecsearch load --shard` and Citus hash,
so it becomes the primary key and the distribution column. `id` keeps every value and its
identity sequence (new ids come only from it: GENERATED ALWAYS) and gets a plain btree index:
`vecsearch similar <id>` finds the row as before. Nothing is rewritten but the two indexes.

Functions. Same arguments, defaults and answers as 0003's; what changed:
- the candidate query computes the exact distance of each candidate where it is read (on each
  shard under Citus, which pushes the `ORDER BY <halfvec distance> LIMIT n` down whole and
  merges the shards' rows), instead of carrying 8 KB vectors to the re-rank;
- under Citus (images distributed), `hnsw.ef_search`, `hnsw.iterative_scan` and
  `enable_seqscan` reach the workers: a SET LOCAL with `citus.propagate_set_commands = local`
  is sent to every shard's connection of this transaction (from vecsearch_search_settings(),
  a nested statement: Citus sends none from the function's own body, a SET clause or
  set_config()), and the workers' defaults are set back the same way after the candidate
  query. On the coordinator the function's SET clauses restore everything when it returns;
- it is VOLATILE (0003's was STABLE): only a volatile function may run a SET statement;
- `ef_search` defaults to NULL: the database's own `vecsearch.ef_search` (set by `vecsearch db
  recall --tune`, which measures the recall on the database's own rows), else 200;
- `vecsearch_similar(id)` reads the query vector into a variable first: a scalar subquery on a
  distributed table inside the call is a join Citus refuses.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
from alembic.script import ScriptDirectory

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The same limits as vecsearch.limits (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200
# A path prefix matching fewer rows than this is answered by an exact scan of those rows.
EXACT_BELOW = 2000

KEYS = """
ALTER TABLE images DROP CONSTRAINT images_pkey;
ALTER TABLE images DROP CONSTRAINT images_path_key;
ALTER TABLE images ADD CONSTRAINT images_pkey PRIMARY KEY (path);
CREATE INDEX images_id_idx ON images (id);
"""

# SET LOCAL of the candidate query's settings. A function of its own because Citus sends a SET
# LOCAL to the workers (with citus.propagate_set_commands = local) only from a nested statement
# of a function, such as this one's PERFORM; set_config() and SET clauses are never sent.
SEARCH_SETTINGS = """
CREATE FUNCTION vecsearch_search_settings(ef_search integer) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $fn$
BEGIN
    IF ef_search IS NULL THEN  -- the defaults again
        SET LOCAL hnsw.ef_search TO DEFAULT;
        SET LOCAL hnsw.iterative_scan TO DEFAULT;
        SET LOCAL enable_seqscan TO DEFAULT;
        RETURN;
    END IF;
    EXECUTE format('SET LOCAL hnsw.ef_search = %s', ef_search);
    SET LOCAL hnsw.iterative_scan = relaxed_order;  -- filters (under, exclude) keep the scan going
    -- The planner costs a sequential scan as if 2048-d distances and TOAST reads were free and
    -- picks it over the index on tables of thousands of rows: the candidate query is told not to.
    SET LOCAL enable_seqscan = off;
END
$fn$
"""

SIMILAR_TO = f"""
CREATE FUNCTION vecsearch_similar_to(
    q         vector,
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
    ann_ids       bigint[];
    ann_paths     text[];
    ann_distances double precision[];
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
        candidates := least({MAX_K}, greatest(k + 10, 2 * k));
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
                    ORDER BY i.embedding::halfvec(2048) <=> $1::halfvec(2048)
                    LIMIT $2::integer
                ) a
                ORDER BY 3, 1
                LIMIT $5::integer
            ) c $q$, ann_under)
            INTO ann_ids, ann_paths, ann_distances
            USING q, candidates, under, exclude, k;
        IF distributed THEN  -- the workers' own settings for the rest of the caller's transaction
            PERFORM vecsearch_search_settings(NULL);
            EXECUTE format('SET LOCAL citus.propagate_set_commands = %L', propagate);
        END IF;
        EXECUTE 'SET LOCAL enable_seqscan = on';
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
    q vector;
BEGIN
    -- The query vector never leaves the server; the image itself is excluded.
    SELECT i.embedding INTO q FROM images i WHERE i.id = image_id LIMIT 1;
    RETURN QUERY SELECT * FROM vecsearch_similar_to(q, k, ef_search, under, exact, ARRAY[image_id]);
END
$fn$
"""

COMMENTS = [
    "COMMENT ON FUNCTION vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[]) IS "
    "'The k images nearest to vector q by cosine distance (HNSW candidates re-ranked exactly). "
    "ef_search: candidates from the index (recall vs speed; NULL: the database''s vecsearch.ef_search, "
    "else 200); under: path prefix filter; exact: exact scan; exclude: ids left out.'",
    "COMMENT ON FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean) IS "
    "'The k images nearest to image image_id by cosine distance, itself excluded; "
    "no rows if the id does not exist. Usable in joins: FROM images i, LATERAL vecsearch_similar(i.id, 5).'",
]

# The functions were recreated: readers get them back (where 0002 could create their role).
GRANT = """
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        GRANT EXECUTE ON FUNCTION
            vecsearch_search_settings(integer),
            vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[]),
            vecsearch_similar(bigint, integer, integer, text, boolean)
            TO vecsearch_reader;
    END IF;
END
$do$
"""


def upgrade() -> None:
    op.execute(KEYS)
    # Dropped and created again: the ef_search default changes (NULL: the database's own).
    op.execute("DROP FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)")
    op.execute("DROP FUNCTION vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[])")
    op.execute(SEARCH_SETTINGS)
    op.execute(SIMILAR_TO)
    op.execute(SIMILAR)
    for comment in COMMENTS:
        op.execute(comment)
    op.execute(GRANT)


def downgrade() -> None:
    op.execute("DROP INDEX images_id_idx")
    op.execute("ALTER TABLE images DROP CONSTRAINT images_pkey")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_pkey PRIMARY KEY (id)")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_path_key UNIQUE (path)")
    script = ScriptDirectory.from_config(op.get_context().config)
    op.execute("DROP FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)")
    op.execute("DROP FUNCTION vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[])")
    op.execute("DROP FUNCTION vecsearch_search_settings(integer)")
    op.execute(script.get_revision("0003").module.SIMILAR_TO)
    before = script.get_revision("0002").module
    op.execute(before.SIMILAR)
    for comment in before.COMMENTS:
        op.execute(comment)
    op.execute(GRANT.replace("            vecsearch_search_settings(integer),\n", ""))
