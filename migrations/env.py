"""Alembic environment: migrations are raw SQL, run online against the vecsearch database."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, text

from vecsearch import db, sessions
from vecsearch.config import Settings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = config.attributes.get("database_url") or db.database_url(Settings.from_env())
# Any constant: serialises concurrent `vecsearch` processes migrating the same database.
MIGRATION_LOCK = 727_112_001

engine = create_engine(db.sqlalchemy_url(url))
with engine.connect() as connection:
    sessions.watch(connection.connection.driver_connection, "migrate")  # a killed migration stops
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
    connection.commit()
    try:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()
engine.dispose()
