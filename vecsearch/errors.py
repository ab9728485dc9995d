"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""

import re


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
    """A psycopg.OperationalError as one line: the Citus node it names when the server reports
    it cannot reach another node (class 08 from the server itself: our connection is fine),
    "database connection lost" (class 08 from libpq, 57P shutdown or crash, or no SQLSTATE: the
    connection itself is gone), else "database error" (the server refused the work: disk full,
    out of memory...)."""
    sqlstate = getattr(e, "sqlstate", None) or ""
    diag = getattr(e, "diag", None)
    node = _NODE.search(first_line(e)) if sqlstate.startswith("08") and diag and diag.severity else None
    if node:
        reason = first_line(e).split("failed with the following error: ", 1)[-1]
        return DatabaseUnavailable(
            f"the Citus node {node.group(1)} cannot be reached ({reason}): start it (a local cluster: "
            "`python -m vecsearch.cluster start ROOT`); `vecsearch db status` shows every node")
    lost = sqlstate[:2] in ("", "08") or sqlstate.startswith("57P")
    return DatabaseUnavailable(f"{'database connection lost' if lost else 'database error'}: {first_line(e)}")


# HOST:PORT in Citus's messages about another node ("connection to the remote node USER@HOST:PORT
# failed ...", "could not connect to HOST:PORT to get size of ...", "connection establishment for
# node HOST:PORT failed").
_NODE = re.compile(r"""([^\s@"]+:\d+)""")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name: for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
