"""Duplicate decisions: what the user settled about a near-duplicate group, kept in the database.

One row per file of a settled group, keyed by (sha256, path) and not by the image id: a re-load
of the same files (new ids) keeps its decisions, and an edited file (new sha256) is no longer
covered by them, so its group is proposed again. `decision` ties the rows of one group together;
`role` is 'keep' (the keeper), 'dupe' (a copy of the keeper) or 'distinct' (the user said the
group's files are not duplicates). A file is in at most one decision: settling it again replaces
its row. `vecsearch dupes` and the gallery's /duplicates leave out every group whose files all
have a decision; `vecsearch dupes --decisions` exports them.

Readable by vecsearch_reader; a reference table on a Citus-distributed database (small, written
by the gallery, joined to images by sha256 and path, not by the distribution column alone).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE vecsearch_dupe_decisions (
    sha256     text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    path       text NOT NULL,
    decision   uuid NOT NULL,
    role       text NOT NULL CHECK (role IN ('keep', 'dupe', 'distinct')),
    distance   double precision CHECK (distance >= 0),
    threshold  double precision CHECK (threshold >= 0 AND threshold < 2),
    decided_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sha256, path)
);
CREATE INDEX vecsearch_dupe_decisions_decision_idx ON vecsearch_dupe_decisions (decision);
COMMENT ON TABLE vecsearch_dupe_decisions IS
    'Near-duplicate groups the user settled (gallery /duplicates), one row per file, keyed by '
    'content and path so that a re-load keeps them. role: keep, dupe (of the keeper) or distinct '
    '(not duplicates). vecsearch never deletes or moves a file itself.'
"""

# On a database already distributed by Citus the table goes to every node (as 0006's projection).
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
        EXECUTE 'SELECT create_reference_table(''vecsearch_dupe_decisions'')';
    END IF;
END
$do$
"""

GRANT = """
DO $do$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vecsearch_reader') THEN
        GRANT SELECT ON vecsearch_dupe_decisions TO vecsearch_reader;
    END IF;
END
$do$
"""


def upgrade() -> None:
    for statement in SCHEMA.split(";\n"):  # one at a time: Citus prepares each command alone
        if statement.strip():
            op.execute(statement)
    op.execute(REFERENCE)
    op.execute(GRANT)


def downgrade() -> None:
    op.execute("DROP TABLE vecsearch_dupe_decisions")
