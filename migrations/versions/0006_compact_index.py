"""The compact index: the HNSW graph over a PCA reduction of the embeddings, the exact re-rank by
the full vector.

A `halfvec(2048)` graph element is 4 KB and pgvector stores one per 8 KB page: 8 KB of index per
image, and every step of a graph search reads 2048 halves. `vecsearch db reindex --dims N`
(vecsearch/compact.py) fits a PCA projection on a sample of the table's own rows, keeps it here,
writes each row's reduced vector, and builds the graph over those instead:

- `vecsearch_projection`: one row per fitted projection (`version`), its `dims` principal axes
  (`components`, halfvec(2048) each) and `offsets` (each axis . the sample mean), so that
  reduce(x) = components . x - offsets. At most one is `in_use`: the one the graph is built for.
- `images.reduced` / `images.reduced_version`: the row's reduced vector and the projection it
  came from. The compact graph is a partial index `WHERE reduced_version = <in-use version>`, so
  one graph never mixes versions. Rows written without one (plain SQL INSERT or COPY of path +
  embedding) have NULL there and are answered by an exact pass over them
  (`images_unreduced_idx`) until the next `vecsearch db reindex` or load puts them in the graph;
  an UPDATE of `embedding` by SQL clears the row's reduced vector (trigger).
- `vecsearch_reduce(q, version)`: the reduction in SQL, for query vectors given to
  `vecsearch_similar_to`.
- `vecsearch_similar_to` / `vecsearch_similar`: same signatures, defaults and answers. With a
  projection in use, the candidates are the ef_search nearest rows by L2 distance in the reduced
  space (which ranks as the cosine distance of the full vectors does, up to the dropped
  variance), every one re-ranked by its exact cosine distance; without one, 0004's query.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
from alembic.script import ScriptDirectory

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The same limits as vecsearch.limits (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200
EXACT_BELOW = 2000

SCHEMA = """
ALTER TABLE images ADD COLUMN reduced halfvec, ADD COLUMN reduced_version integer;
ALTER TABLE images ADD CONSTRAINT images_reduced_check
    CHECK ((reduced IS NULL) = (reduced_version IS NULL));
CREATE INDEX images_unreduced_idx ON images (id) WHERE reduced IS NULL;

CREATE TABLE vecsearch_projection (
    version    integer PRIMARY KEY,
    dims       integer NOT NULL CHECK (dims BETWEEN 1 AND 2000),
    in_use     boolean NOT NULL DEFAULT false,
    fitted_at  timestamptz NOT NULL DEFAULT now(),
    fitted_on  bigint NOT NULL,            -- rows of the sample it was fitted on
    retained   double precision NOT NULL,  -- share of the sample's variance the axes keep
    components halfvec[] NOT NULL,         -- dims principal axes, halfvec(2048) each
    offsets    real[] NOT NULL,            -- each axis . the sample's mean
    reason     text,                       -- why this projection was chosen
    CHECK (cardinality(components) = dims AND cardinality(offsets) = dims)
);
ALTER TABLE vecsearch_projection ALTER COLUMN components SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX vecsearch_projection_in_use_idx ON vecsearch_projection (in_use) WHERE in_use;
COMMENT ON TABLE vecsearch_projection IS
    'PCA projections of images.embedding fitted by `vecsearch db reindex --dims`; the one in_use is '
    'what the compact HNSW index (images.reduced) is built over.';
"""

# Clears the reduced vector of a row whose embedding an UPDATE changed without giving a new one:
# its old reduced vector would place it wrongly in the graph. The row is then answered exactly.
TRIGGER = """
CREATE FUNCTION vecsearch_clear_reduced() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.embedding IS DISTINCT FROM OLD.embedding AND NEW.reduced IS NOT DISTINCT FROM OLD.reduced THEN
        NEW.reduced := NULL;
        NEW.reduced_version := NULL;
    END IF;
    RETURN NEW;
END
$fn$;
DO $do$
BEGIN
    -- Citus creates triggers on distributed tables only when told to; this one reads no table.
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.enable_unsafe_triggers = on;
    END IF;
    CREATE TRIGGER images_clear_reduced BEFORE UPDATE OF embedding ON images
        FOR EACH ROW EXECUTE FUNCTION vecsearch_clear_reduced();
END
$do$;
"""

# On a database already distributed by Citus the projection goes to every node.
REFERENCE = """
DO $do$
DECLARE
    distributed boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition '
                'WHERE logicalrelid = ''images''::regclass)' INTO distributed;
    END IF;
    IF distributed THEN
        EXECUTE 'SELECT create_reference_table(''vecsearch_projection'')';
    END IF;
END
$do$
"""

REDUCE = """
CREATE FUNCTION vecsearch_reduce(q vector, projection integer) RETURNS halfvec
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $fn$
    SELECT (SELECT array_agg(-(q::halfvec(2048) <#> u.c) - u.o ORDER BY u.n)::halfvec
            FROM unnest(p.components, p.offsets) WITH ORDINALITY AS u(c, o, n))
    FROM vecsearch_projection p WHERE p.version = projection
$fn$;
COMMENT ON FUNCTION vecsearch_reduce(vector, integer) IS
    'Vector q in the reduced space of projection `projection` (vecsearch_projection.version): '
    'each axis . q minus its offset.';
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
    projection    integer;
    dims          integer;
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
        SELECT p.version, p.dims INTO projection, dims FROM vecsearch_projection p WHERE p.in_use;
        candidates := least({MAX_K}, greatest(k + 10, 2 * k));
        IF projection IS NOT NULL THEN
            -- The reduced space only ranks candidates: re-rank all that the graph gives.
            candidates := least({MAX_K}, greatest(candidates, ef_search));
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
            USING q, candidates, under, exclude, k,
                  CASE WHEN projection IS NULL THEN NULL ELSE vecsearch_reduce(q, projection) END;
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

SIGNATURES = ("vecsearch_similar(bigint, integer, integer, text, boolean)",
              "vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[])")

GRANT = """
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        GRANT SELECT ON vecsearch_projection TO vecsearch_reader;
        GRANT EXECUTE ON FUNCTION
            vecsearch_reduce(vector, integer),
            vecsearch_search_settings(integer),
            vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[]),
            vecsearch_similar(bigint, integer, integer, text, boolean)
            TO vecsearch_reader;
    END IF;
END
$do$
"""


def _previous():
    return ScriptDirectory.from_config(op.get_context().config).get_revision("0004").module


def upgrade() -> None:
    for statement in SCHEMA.split(";\n"):  # one at a time: Citus prepares each command alone
        if statement.strip():
            op.execute(statement)
    op.execute(REFERENCE)
    op.execute(TRIGGER)
    op.execute(REDUCE)
    before = _previous()
    # vecsearch_similar calls vecsearch_similar_to: both go, then come back with the new body.
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(SIMILAR_TO)
    op.execute(before.SIMILAR)
    for comment in before.COMMENTS:
        op.execute(comment)
    op.execute(GRANT)


def downgrade() -> None:
    # A compact index cannot serve 0004's functions: the full one must be built again first.
    op.execute("""
        DO $do$
        BEGIN
            IF EXISTS (SELECT FROM vecsearch_projection WHERE in_use) THEN
                RAISE EXCEPTION 'a compact index is in use: run `vecsearch db reindex --dims full` '
                                'before downgrading';
            END IF;
        END
        $do$""")
    before = _previous()
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(before.SIMILAR_TO)
    op.execute(before.SIMILAR)
    for comment in before.COMMENTS:
        op.execute(comment)
    op.execute("DROP FUNCTION vecsearch_reduce(vector, integer)")
    op.execute("DROP TRIGGER images_clear_reduced ON images")
    op.execute("DROP FUNCTION vecsearch_clear_reduced()")
    op.execute("DROP TABLE vecsearch_projection")
    op.execute("DROP INDEX images_unreduced_idx")
    op.execute("ALTER TABLE images DROP CONSTRAINT images_reduced_check")
    op.execute("ALTER TABLE images DROP COLUMN reduced, DROP COLUMN reduced_version")
    op.execute(before.GRANT)
