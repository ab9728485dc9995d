"""Initial schema: images with 2048-d embeddings, HNSW on the halfvec cast, model record.

Raw SQL on purpose: alembic autogenerate drops the operator class of an index on a cast
expression, and analysts read this file to learn the schema.

Revision ID: 0001
Revises:
"""

from alembic import op

from vecsearch.config import Settings

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    settings = Settings.from_env()
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute("""
        CREATE TABLE images (
            id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            path      text NOT NULL UNIQUE,          -- absolute; one row per file
            sha256    text NOT NULL,                 -- hex digest of the file's bytes
            bytes     bigint NOT NULL,
            width     integer NOT NULL,
            height    integer NOT NULL,
            format    text NOT NULL,                 -- Pillow's name: JPEG, PNG, WEBP...
            mtime     timestamptz NOT NULL,
            loaded_at timestamptz NOT NULL DEFAULT now(),
            embedding vector(2048) NOT NULL          -- L2-normalised ResNet50 pooled features
        )
    """)
    op.execute("CREATE INDEX images_sha256_idx ON images (sha256)")
    # An 8 KB vector always lives in TOAST and does not compress: skip the attempt.
    op.execute("ALTER TABLE images ALTER COLUMN embedding SET STORAGE EXTERNAL")
    # The heap looks tiny to the planner (the vectors are in TOAST), so it would plan no
    # parallel workers for scans or index builds; the GUCs still cap the real number.
    op.execute("ALTER TABLE images SET (parallel_workers = 8)")
    # HNSW indexes at most 2000 dimensions of `vector` (4000 of halfvec): index the cast,
    # and every ANN query orders by the same expression (vecsearch.db.ANN_EXPR).
    op.execute(f"""
        CREATE INDEX images_embedding_hnsw ON images
        USING hnsw ((embedding::halfvec(2048)) halfvec_cosine_ops)
        WITH (m = {int(settings.hnsw_m)}, ef_construction = {int(settings.hnsw_ef_construction)})
    """)
    # Which network, weights and preprocessing made the vectors: loading with another model
    # is refused instead of silently mixing two vector spaces. At most one row.
    op.execute("""
        CREATE TABLE embedding_model (
            singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            name          text NOT NULL,             -- e.g. torchvision.models.resnet50
            weights       text NOT NULL,             -- e.g. IMAGENET1K_V2, random(seed=0)
            preprocessing text NOT NULL,             -- resize/crop/normalisation, as JSON
            dim           integer NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE embedding_model")
    op.execute("DROP TABLE images")
