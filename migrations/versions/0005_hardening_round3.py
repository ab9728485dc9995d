"""Hardening, round 3: values no SQL can store, and server functions reader logins cannot call.

- `images` gets CHECK constraints with the loader's own rules: a size of at least 0 bytes, a
  picture of at least 1 x 1, a finite mtime and load time (`infinity` broke every later load of
  the folder: it has no integer form), ids from 1. A crafted backup, or any SQL, can no longer
  store such a row. They are added NOT VALID (new rows are checked at once), then validated; a
  database already holding such a row keeps it, with a warning naming the constraint.
- Large objects: PostgreSQL lets any login create them (`lo_from_bytea(0, ...)`, `lo_create`,
  `lo_creat`), so a read-only reader could store unbounded data. EXECUTE on those is revoked
  from PUBLIC in this database and granted to the role that runs the migrations.
- Advisory locks: any login could take the HNSW index lock of `vecsearch.index` and sit on it,
  making `db reindex` fail and a load skip the repair of an index a killed load dropped. EXECUTE
  on every function that takes an advisory lock is revoked from PUBLIC in this database and
  granted to the migrating role. The ACLs of pg_catalog functions are per database, so other
  databases of the cluster are unaffected. Where the migrating role may not change them (not a
  superuser), a warning says so and nothing fails.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CHECKS = {
    "images_bytes_check": "bytes >= 0",
    "images_size_check": "width > 0 AND height > 0",
    "images_mtime_check": "isfinite(mtime) AND isfinite(loaded_at)",
    "images_id_check": "id > 0",
}

ADD_CHECKS = "\n".join(f"ALTER TABLE images ADD CONSTRAINT {name} CHECK ({rule}) NOT VALID;"
                       for name, rule in CHECKS.items())

VALIDATE_CHECKS = "\n".join(f"""
DO $do$
BEGIN
    ALTER TABLE images VALIDATE CONSTRAINT {name};
EXCEPTION WHEN check_violation THEN
    RAISE WARNING 'vecsearch: rows of images break {name} ({rule}): they stay, new ones are refused';
END
$do$;""" for name, rule in CHECKS.items())

# Every signature that takes (not releases) an advisory lock, and those that create large objects.
ADVISORY = [f"pg_{try_}advisory_{xact}lock{shared}({args})"
            for try_ in ("", "try_") for xact in ("", "xact_") for shared in ("", "_shared")
            for args in ("bigint", "integer, integer")]
LARGE_OBJECTS = ["lo_creat(integer)", "lo_create(oid)", "lo_from_bytea(oid, bytea)"]
FUNCTIONS = ", ".join(ADVISORY + LARGE_OBJECTS)

PRIVILEGES = f"""
DO $do$
BEGIN
    EXECUTE format('GRANT EXECUTE ON FUNCTION {FUNCTIONS} TO %I', current_user);
    REVOKE EXECUTE ON FUNCTION {FUNCTIONS} FROM PUBLIC;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'vecsearch: cannot revoke advisory locks and large objects from PUBLIC (%): '
        'reader logins can take the index lock and store large objects here', SQLERRM;
END
$do$
"""


def upgrade() -> None:
    op.execute(ADD_CHECKS)
    op.execute(VALIDATE_CHECKS)
    op.execute(PRIVILEGES)


def downgrade() -> None:
    op.execute(f"""
DO $do$
BEGIN
    GRANT EXECUTE ON FUNCTION {FUNCTIONS} TO PUBLIC;
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$do$
""")
    for name in CHECKS:
        op.execute(f"ALTER TABLE images DROP CONSTRAINT {name}")
