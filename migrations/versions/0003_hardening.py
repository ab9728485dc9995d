"""Hardening: the neighbour function refuses a zero vector and ignores NULL excluded ids; reader
logins get no temporary objects (so no temporary functions either) and no CREATE in public.

- `vecsearch_similar_to(q => <zero vector>)` returned NaN distances and `exclude => ARRAY[NULL]`
  returned no rows at all, both silently: the first is now an error, the second excludes nothing.
  Otherwise the function is 0002's, unchanged (written out again: this file is its reference now).
- PostgreSQL grants TEMPORARY on every database, and (before 15) CREATE on schema public, to
  PUBLIC: every login, readers included, could create temporary tables and functions. Both are
  revoked from PUBLIC here and granted to the role that runs the migrations (vecsearch itself).
  On a server where that role lacks the privilege to revoke, a warning says so and nothing fails.

Revision ID: 0003
Revises: 0002
"""

from alembic import op
from alembic.script import ScriptDirectory

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The same limits as vecsearch.query (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200
# A path prefix matching fewer rows than this is answered by an exact scan of those rows.
EXACT_BELOW = 2000

SIMILAR_TO = f"""
CREATE OR REPLACE FUNCTION vecsearch_similar_to(
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
    IF vector_norm(q) = 0 THEN
        RAISE EXCEPTION 'q is a zero vector: its cosine distance to anything is undefined'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A NULL among the excluded ids would make `id <> ALL (exclude)` NULL for every row.
    exclude := array_remove(coalesce(exclude, '{{}}'), NULL);
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


PRIVILEGES = """
DO $do$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), current_user);
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CREATE ON SCHEMA public TO %I', current_user);
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'vecsearch: cannot revoke TEMPORARY/CREATE from PUBLIC (%): reader logins can '
        'create temporary tables and functions here', SQLERRM;
END
$do$
"""


def upgrade() -> None:
    op.execute(SIMILAR_TO)
    op.execute(PRIVILEGES)


def downgrade() -> None:
    op.execute("DO $do$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', "
               "current_database()); END $do$")
    op.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    previous = ScriptDirectory.from_config(op.get_context().config).get_revision("0002").module
    op.execute(previous.SIMILAR_TO.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
