"""Photo metadata as columns, and filters on them in the neighbour query.

- `images` gets the EXIF fields the decode worker reads from the file it is decoding anyway
  (vecsearch/exif.py): `taken_at` (the local time the photo was taken, as the camera showed it)
  and `taken_offset` (its UTC offset, where the file records one: UTC is taken_at - taken_offset),
  `camera_make`, `camera_model`, `lens`, `gps_latitude` / `gps_longitude` (decimal degrees, south
  and west negative), `orientation` (EXIF 1..8). NULL where the file says nothing usable.
  `metadata_version` is which reading of the EXIF the row holds (vecsearch.exif.VERSION); NULL
  for the rows of earlier revisions: the next `vecsearch load` of their folder reads them (the
  file only, no re-embedding), as `vecsearch load --reread-metadata` does for every row.
- `vecsearch_nearest` (THE neighbour query), `vecsearch_similar_to` and `vecsearch_similar` take
  three more optional arguments, NULL by default, so every earlier call means what it meant:
  `taken_after` (taken_at >= it), `taken_before` (taken_at < it: the two make a half-open range)
  and `camera` (a case-insensitive substring of camera_make || ' ' || camera_model). Rows without
  a taken_at (or camera) never pass such a filter. Like `under`, a filter keeps k rows coming:
  iterative index scans, and an exact scan of the matching rows where fewer than 2000 match.
  A btree on taken_at serves the count and that exact scan; the candidate query compares
  `taken_at + interval '0'`, which no btree serves, so the filter cannot pull it off the HNSW index.

Revision ID: 0009
Revises: 0008
"""

from alembic import op
from alembic.script import ScriptDirectory

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The same limits as vecsearch.limits (hnsw.ef_search itself accepts 1..1000).
MAX_K = 1000
DEFAULT_EF_SEARCH = 200
EXACT_BELOW = 2000

SCHEMA = """
ALTER TABLE images
    ADD COLUMN taken_at         timestamp,
    ADD COLUMN taken_offset     interval,
    ADD COLUMN camera_make      text,
    ADD COLUMN camera_model     text,
    ADD COLUMN lens             text,
    ADD COLUMN gps_latitude     double precision,
    ADD COLUMN gps_longitude    double precision,
    ADD COLUMN orientation      smallint,
    ADD COLUMN metadata_version smallint;
ALTER TABLE images ADD CONSTRAINT images_metadata_check CHECK (
    isfinite(taken_at)
    AND taken_offset BETWEEN interval '-12 hours' AND interval '14 hours'
    AND gps_latitude BETWEEN -90 AND 90 AND gps_longitude BETWEEN -180 AND 180
    AND (gps_latitude IS NULL) = (gps_longitude IS NULL)
    AND orientation BETWEEN 1 AND 8
    AND length(camera_make) <= 128 AND length(camera_model) <= 128 AND length(lens) <= 128
    AND metadata_version > 0);
CREATE INDEX images_taken_at_idx ON images (taken_at);
COMMENT ON COLUMN images.taken_at IS
    'When the photo was taken (EXIF DateTimeOriginal, else DateTimeDigitized): local wall-clock time '
    'as the camera showed it; NULL when the file has none (or an impossible one)';
COMMENT ON COLUMN images.taken_offset IS
    'UTC offset of taken_at where the file records it (EXIF OffsetTimeOriginal): '
    'UTC = taken_at - taken_offset';
COMMENT ON COLUMN images.gps_latitude IS 'EXIF GPS latitude, decimal degrees (south negative)';
COMMENT ON COLUMN images.gps_longitude IS 'EXIF GPS longitude, decimal degrees (west negative)';
COMMENT ON COLUMN images.orientation IS 'EXIF orientation 1..8 (already applied to the pixels embedded)';
COMMENT ON COLUMN images.metadata_version IS
    'Which reading of the EXIF the metadata columns hold; NULL: not read yet (the next load reads it)'
"""

NEAREST = f"""
CREATE FUNCTION vecsearch_nearest(
    q            vector,
    q_reduced    halfvec,
    q_version    integer,
    k            integer   DEFAULT 10,
    ef_search    integer   DEFAULT NULL,
    under        text      DEFAULT NULL,
    exact        boolean   DEFAULT false,
    exclude      bigint[]  DEFAULT '{{}}',
    taken_after  timestamp DEFAULT NULL,
    taken_before timestamp DEFAULT NULL,
    camera       text      DEFAULT NULL
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE plpgsql VOLATILE ROWS 10  -- VOLATILE: only such a function may run SET LOCAL
SET search_path FROM CURRENT
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = {DEFAULT_EF_SEARCH}
SET enable_seqscan = on
AS $fn$
DECLARE
    -- Exact scans filter with starts_with() and plain comparisons, which btrees on path (C
    -- collation) and taken_at serve; the candidate query uses forms no btree serves, so a filter
    -- cannot pull it off the HNSW index.
    where_under   text := CASE WHEN under IS NULL THEN '' ELSE ' AND starts_with(i.path, $4)' END;
    ann_under     text := CASE WHEN under IS NULL THEN '' ELSE ' AND left(i.path, length($3)) = $3' END;
    -- The metadata filters, as literals (the planner sees their selectivity).
    where_meta    text := concat(
        CASE WHEN taken_after IS NULL THEN ''
             ELSE format(' AND i.taken_at >= %L::timestamp', taken_after) END,
        CASE WHEN taken_before IS NULL THEN ''
             ELSE format(' AND i.taken_at < %L::timestamp', taken_before) END,
        CASE WHEN camera IS NULL THEN ''
             ELSE format(' AND strpos(lower(concat_ws(%L, i.camera_make, i.camera_model)), %L) > 0',
                         ' ', lower(camera)) END);
    ann_meta      text := replace(where_meta, 'i.taken_at ', '(i.taken_at + interval ''0'') ');
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
    IF NOT exact AND (under IS NOT NULL OR where_meta <> '') THEN
        -- Few rows pass the filters: scanning them exactly is faster than walking the graph
        -- past all the others (and exact).
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM images i WHERE true %s %s LIMIT $2) s',
                       CASE WHEN under IS NULL THEN '' ELSE ' AND starts_with(i.path, $1)' END, where_meta)
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
        -- autocommit would run without it, with the workers' defaults). The filters go into the
        -- index scan itself: iterative scans (relaxed_order) walk on until enough rows pass.
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
            ) c $q$, ann_under || ann_meta || CASE WHEN projection IS NULL THEN ''
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
                ) c $q$, where_under || where_meta)
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
        LIMIT $2::integer $q$, where_under || where_meta)
        USING q, k, NULL::integer, under, exclude;
END
$fn$
"""

SIMILAR_TO = """
CREATE FUNCTION vecsearch_similar_to(
    q            vector,
    k            integer   DEFAULT 10,
    ef_search    integer   DEFAULT NULL,
    under        text      DEFAULT NULL,
    exact        boolean   DEFAULT false,
    exclude      bigint[]  DEFAULT '{}',
    taken_after  timestamp DEFAULT NULL,
    taken_before timestamp DEFAULT NULL,
    camera       text      DEFAULT NULL
) RETURNS TABLE (id bigint, path text, distance double precision)
LANGUAGE sql VOLATILE ROWS 10
SET search_path FROM CURRENT
AS $fn$
    SELECT * FROM vecsearch_nearest(q, NULL, NULL, k, ef_search, under, exact, exclude,
                                    taken_after, taken_before, camera)
$fn$
"""

SIMILAR = """
CREATE FUNCTION vecsearch_similar(
    image_id     bigint,
    k            integer   DEFAULT 10,
    ef_search    integer   DEFAULT NULL,
    under        text      DEFAULT NULL,
    exact        boolean   DEFAULT false,
    taken_after  timestamp DEFAULT NULL,
    taken_before timestamp DEFAULT NULL,
    camera       text      DEFAULT NULL
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
    RETURN QUERY SELECT * FROM vecsearch_nearest(q, rq, rv, k, ef_search, under, exact, ARRAY[image_id],
                                                 taken_after, taken_before, camera);
END
$fn$
"""

NEAREST_SIGNATURE = ("vecsearch_nearest(vector, halfvec, integer, integer, integer, text, boolean, "
                     "bigint[], timestamp, timestamp, text)")
SIGNATURES = ("vecsearch_similar(bigint, integer, integer, text, boolean, timestamp, timestamp, text)",
              "vecsearch_similar_to(vector, integer, integer, text, boolean, bigint[], timestamp, "
              "timestamp, text)")
FILTERS = ("taken_after, taken_before: taken_at >= taken_after and < taken_before (the camera''s local "
           "time); camera: a case-insensitive substring of camera_make || '' '' || camera_model. Rows "
           "without them never pass; k rows still come back where that many pass.")

COMMENTS = [
    f"COMMENT ON FUNCTION {SIGNATURES[1]} IS "
    "'The k images nearest to vector q by cosine distance (HNSW candidates re-ranked exactly). "
    "ef_search: candidates from the index (recall vs speed; NULL: the database''s vecsearch.ef_search, "
    f"else 200); under: path prefix filter; exact: exact scan; exclude: ids left out; {FILTERS}'",
    f"COMMENT ON FUNCTION {SIGNATURES[0]} IS "
    "'The k images nearest to image image_id by cosine distance, itself excluded; "
    "no rows if the id does not exist. Usable in joins: FROM images i, LATERAL vecsearch_similar(i.id, 5). "
    f"Filters as vecsearch_similar_to: {FILTERS}'",
    f"COMMENT ON FUNCTION {NEAREST_SIGNATURE} IS 'vecsearch_similar_to with the query''s reduced vector "
    "given where the caller has it (a row''s reduced, reduced_version): used when q_version is the "
    "projection in use, else q is reduced here.'",
]


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


# On a Citus coordinator, the ALTER TABLE below runs on every shard in parallel, after which Citus
# refuses to propagate function DDL in the same transaction ("there was a parallel operation on a
# distributed table"): one connection per node for all of it. Elsewhere a harmless placeholder.
SEQUENTIAL = "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'"


def upgrade() -> None:
    op.execute(SEQUENTIAL)
    for statement in SCHEMA.split(";\n"):  # one at a time: Citus prepares each command alone
        if statement.strip():
            op.execute(statement)
    before = _revision("0007")
    for signature in (*before.SIGNATURES, "vecsearch_nearest(vector, halfvec, integer, integer, "
                      "integer, text, boolean, bigint[])"):
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(NEAREST)
    op.execute(SIMILAR_TO)
    op.execute(SIMILAR)
    for comment in COMMENTS:
        op.execute(comment)
    op.execute(_grant(", ".join((NEAREST_SIGNATURE, *SIGNATURES))))


def downgrade() -> None:
    op.execute(SEQUENTIAL)
    for signature in (*SIGNATURES, NEAREST_SIGNATURE):
        op.execute(f"DROP FUNCTION {signature}")
    before = _revision("0007")
    op.execute(before.NEAREST)
    op.execute(before.SIMILAR_TO)
    op.execute(before.SIMILAR)
    for comment in _revision("0004").COMMENTS + before.COMMENTS:
        op.execute(comment)
    op.execute(_grant("vecsearch_nearest(vector, halfvec, integer, integer, integer, text, boolean, "
                      "bigint[]), " + ", ".join(before.SIGNATURES)))
    op.execute("DROP INDEX images_taken_at_idx")
    op.execute("ALTER TABLE images DROP CONSTRAINT images_metadata_check")
    op.execute("ALTER TABLE images DROP COLUMN taken_at, DROP COLUMN taken_offset, DROP COLUMN camera_make, "
               "DROP COLUMN camera_model, DROP COLUMN lens, DROP COLUMN gps_latitude, "
               "DROP COLUMN gps_longitude, DROP COLUMN orientation, DROP COLUMN metadata_version")
