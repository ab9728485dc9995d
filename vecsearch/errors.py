"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""


class VecsearchError(Exception):
    """A failure with a message that says what is wrong and what to do."""

    exit_code = 1


class NotFound(VecsearchError):
    """An image id, file or folder that does not exist."""


class InvalidInput(VecsearchError):
    """A malformed argument: a bad k, a broken arithmetic expression, an unreadable image."""


class DatabaseUnavailable(VecsearchError):
    """The database cannot be reached or started."""

    exit_code = 3


class DatabaseBusy(VecsearchError):
    """Other sessions hold what a command needs, for longer than it was told to wait."""


class PgvectorMissing(VecsearchError):
    """The server has no pgvector extension."""

    exit_code = 4


class SchemaMismatch(VecsearchError):
    """The database was built by another vecsearch schema version or another model."""

    exit_code = 5


class UnreadableImage(InvalidInput):
    """A file that is not a decodable image (empty, truncated, not an image, too many pixels)."""


class WeightsUnavailable(VecsearchError):
    """The pretrained weights cannot be downloaded or loaded."""


def database_failure(e: BaseException) -> DatabaseUnavailable:
    """A psycopg.OperationalError as one line: "database connection lost" (class 08, 57P shutdown
    or crash, or no SQLSTATE: the connection itself is gone), else "database error" (the server
    refused the work: disk full, out of memory...)."""
    sqlstate = getattr(e, "sqlstate", None) or ""
    lost = sqlstate[:2] in ("", "08") or sqlstate.startswith("57P")
    return DatabaseUnavailable(f"{'database connection lost' if lost else 'database error'}: {first_line(e)}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name: for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
