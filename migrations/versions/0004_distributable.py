"""One schema for a single PostgreSQL and a Citus cluster: images keyed by path; neighbour
functions that Citus runs per shard.

Keys. Citus needs every unique constraint of a distributed table to contain its distribution
column, so `id PRIMARY KEY` and `path UNIQUE` cannot both stay. `path` is what a row is (one
row per file, the upsert's conflict target) and what `vecsearch load --shard` and Citus hash,
so it becomes the primary key and the distribution column. `id` keeps every value and its
identity sequence (new ids come only from it: GENERATED ALWAYS) and gets a plain btree index:
`vecsearch similar <id>` finds the row as before. Nothing is rewritten but the two indexes.

Functions. Same arguments, defaults and answers as 0003's; what changed:
- the candidate query is one flat `ORDER BY <halfvec distance> LIMIT n` that also computes the
  exact distance of each candidate where it is read (on each shard under Citus, which pushes
  such a query down whole and merges the shards' rows); the re-rank sorts those n rows. 0003's
  nested form made Citus materialise the candidates (8 KB vectors included) before re-ranking;
- under Citus (images distributed), `hnsw.ef_search`, `hnsw.iterative_scan` and
  `enable_seqscan` reach the workers: a SET LOCAL with `citus.propagate_set_commands = local`
  is sent to every shard's connection of this transaction (a function's SET clause and
  set_config() are not), and set back to the workers' defaults the same way after the
  candidate query. On the coordinator the function's SET clauses restore everything when it
  returns, as before;
- it is VOLATILE (0003's was STABLE): only a volatile function may run a SET statement;
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

SIMILAR_TO = f"""
CREATE OR REPLACE FUNCTION vecsearch_similar_to(
    q         vector,
    k         integer  DEFAULT 10,
    ef_search integer  DEFAULT {DEFAULT_EF_SEARCH},
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
    ann_ids       bigint[] := '{{}}';
    ann_paths     text[] := '{{}}';
    ann_distances double precision[] := '{{}}';
    c_id          bigint;
    c_path        text;
    c_distance    double precision;
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
        -- The planner costs a sequential scan as if 2048-d distances and TOAST reads were free
        -- and picks it over the index on tables of thousands of rows: the candidate query is
        -- told not to. All of it is undone when the function returns (its SET clauses).
        IF distributed THEN
            propagate := current_setting('citus.propagate_set_commands');
            EXECUTE 'SET LOCAL citus.propagate_set_commands = local';
        END IF;
        EXECUTE format('SET LOCAL hnsw.ef_search = %s', greatest(candidates, ef_search));
        EXECUTE 'SET LOCAL hnsw.iterative_scan = relaxed_order';
        EXECUTE 'SET LOCAL enable_seqscan = off';
        -- One flat ORDER BY ... LIMIT, which Citus pushes to every shard whole and merges; the
        -- re-rank below runs on the candidates alone.
        FOR c_id, c_path, c_distance IN EXECUTE format($q$
                SELECT i.id, i.path, i.embedding <=> $1::vector
                FROM images i
                WHERE i.id <> ALL ($4::bigint[]) %s
                ORDER BY i.embedding::halfvec(2048) <=> $1::halfvec(2048)
                LIMIT $2::integer $q$, ann_under)
            USING q, candidates, under, exclude
        LOOP
            ann_ids := ann_ids || c_id;
            ann_paths := ann_paths || c_path;
            ann_distances := ann_distances || c_distance;
        END LOOP;
        IF distributed THEN
            -- The workers' own settings again for the rest of the caller's transaction. (SET
            -- LOCAL, never SET or RESET: those would outlive the function's SET clauses.)
            EXECUTE 'SET LOCAL hnsw.ef_search TO DEFAULT';
            EXECUTE 'SET LOCAL hnsw.iterative_scan TO DEFAULT';
            EXECUTE 'SET LOCAL enable_seqscan TO DEFAULT';
            EXECUTE format('SET LOCAL citus.propagate_set_commands = %L', propagate);
        END IF;
        EXECUTE 'SET LOCAL enable_seqscan = on';
        IF cardinality(ann_ids) >= k THEN  -- the exact re-rank
            RETURN QUERY SELECT * FROM unnest(ann_ids, ann_paths, ann_distances) AS c(id, path, distance)
                ORDER BY c.distance, c.id LIMIT k;
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

SIMILAR = f"""
CREATE OR REPLACE FUNCTION vecsearch_similar(
    image_id  bigint,
    k         integer DEFAULT 10,
    ef_search integer DEFAULT {DEFAULT_EF_SEARCH},
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

# The function was recreated: readers get it back (where 0002 could create their role).
GRANT = """
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        GRANT EXECUTE ON FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)
            TO vecsearch_reader;
    END IF;
END
$do$
"""


def upgrade() -> None:
    op.execute(KEYS)
    op.execute(SIMILAR_TO)
    op.execute("DROP FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)")
    op.execute(SIMILAR.replace("CREATE OR REPLACE FUNCTION", "CREATE FUNCTION", 1))
    op.execute("COMMENT ON FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean) IS "
               "'The k images nearest to image image_id by cosine distance, itself excluded; "
               "no rows if the id does not exist. Usable in joins: "
               "FROM images i, LATERAL vecsearch_similar(i.id, 5).'")
    op.execute(GRANT)


def downgrade() -> None:
    op.execute("DROP INDEX images_id_idx")
    op.execute("ALTER TABLE images DROP CONSTRAINT images_pkey")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_pkey PRIMARY KEY (id)")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_path_key UNIQUE (path)")
    previous = ScriptDirectory.from_config(op.get_context().config).get_revision("0003").module
    op.execute(previous.SIMILAR_TO)
    op.execute("DROP FUNCTION vecsearch_similar(bigint, integer, integer, text, boolean)")
    before = ScriptDirectory.from_config(op.get_context().config).get_revision("0002").module
    op.execute(before.SIMILAR)
    op.execute(before.COMMENTS[1])
    op.execute(GRANT)
