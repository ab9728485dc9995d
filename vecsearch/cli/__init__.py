"""The `vecsearch` command: a thin typer layer over the library modules.

Heavy imports (torch, numpy, SQLAlchemy, alembic) happen inside the commands that need them,
so `vecsearch similar` starts in a fraction of a second.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__, db
from ..config import Settings
from ..errors import InvalidInput, VecsearchError, database_failure
from ..limits import DEFAULT_EF_SEARCH, DEFAULT_K, MAX_EF_SEARCH, MAX_K, WEB_MAX_UPLOAD_MB, WEB_PORT
from ..output import printable
from .common import (
    BATCH_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    err,
    out,
    output_format,
    print_neighbours,
    settings,
    warnings_as_lines,
)
from .db_commands import db_app
from .dupes_commands import dupes_command
from .eval_commands import eval_app

app = typer.Typer(
    help="Image similarity search inside PostgreSQL (ResNet50 embeddings, pgvector HNSW).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Typer vendors click (typer._click); its exceptions, reached through a public one.
_click = sys.modules[typer.BadParameter.__module__]
app.add_typer(db_app, name="db")
app.command("dupes")(dupes_command)
app.add_typer(eval_app, name="eval")

def _version(value: bool) -> None:
    if value:
        print(f"vecsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="PostgreSQL URL (overrides VECSEARCH_DATABASE_URL; "
        "default: the embedded server).", show_default=False)] = None,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Data directory (overrides VECSEARCH_HOME).", show_default=False)] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = Settings.from_env(database_url=database_url, home=home)


# -- serve ----------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Anything but loopback lets everyone who can reach "
        "this machine browse and download your indexed images.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).")] = WEB_PORT,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Weights of the recorded model for search by upload: a state-dict FILE, "
        "or 'random' for a database loaded with --weights random (default: the recorded model's "
        "own). Loaded on the first upload.", show_default=False)] = None,
    max_upload_mb: Annotated[int, typer.Option(
        "--max-upload-mb", min=1, help="Largest image upload accepted, in MB.")] = WEB_MAX_UPLOAD_MB,
) -> None:
    """Web gallery: browse thumbnails, click for neighbours, search by upload or arithmetic; JSON API."""
    from .. import web

    def announce(line: str) -> None:
        out.print(line, markup=False)
        sys.stdout.flush()

    web.serve(settings(ctx), host=host, port=port, weights=weights,
              max_upload_bytes=max_upload_mb * 1024 * 1024, announce=announce)


# -- queries: similar, search, db reader -----------------------------------------------------

_K = Annotated[int, typer.Option("--k", "-k", help=f"How many neighbours (1-{MAX_K}).")]
_EF_SEARCH = Annotated[int | None, typer.Option(
    "--ef-search", help=f"HNSW candidates per query, 1-{MAX_EF_SEARCH} (default: the database's own, "
    f"`vecsearch db recall --tune`, else {DEFAULT_EF_SEARCH}), raised to max(k + 10, 2k) when "
    "smaller (the candidates the exact re-rank needs): higher is slower and closer to exact.",
    show_default=False)]
_EXACT = Annotated[bool, typer.Option(
    "--exact", help="Exact scan instead of the HNSW index (slow on large tables).")]
_UNDER = Annotated[Path | None, typer.Option(
    "--under", help="Only images whose path is under DIR.", show_default=False)]
_TAKEN_AFTER = Annotated[str | None, typer.Option(
    "--taken-after", metavar="DATE", help="Only photos taken on or after DATE (YYYY-MM-DD or "
    "YYYY-MM-DDTHH:MM[:SS], the camera's local time; EXIF DateTimeOriginal). Still k results.",
    show_default=False)]
_TAKEN_BEFORE = Annotated[str | None, typer.Option(
    "--taken-before", metavar="DATE", help="Only photos taken before DATE (as --taken-after; the two "
    "make a range: --taken-after 2024-01-01 --taken-before 2025-01-01 is 2024).", show_default=False)]
_CAMERA = Annotated[str | None, typer.Option(
    "--camera", metavar="TEXT", help="Only photos whose camera make or model contains TEXT (any case, "
    "e.g. 'canon', 'iphone 15').", show_default=False)]
_FORMAT = Annotated[str, typer.Option(
    "--format", "-f", help="table, json, csv, or paths (one per line, for pipes).")]
_WEIGHTS = Annotated[str | None, typer.Option(
    "--weights", help="Weights file of the recorded model, for a database loaded with --weights FILE "
    "(only used to embed image files).", show_default=False)]


def neighbours_command(
    ctx: typer.Context,
    query_text: Annotated[str, typer.Argument(
        metavar="QUERY", help="similar: an image id; or arithmetic on ids and image files, e.g. "
        "'12 + 40*0.5 - 7' or './beach.jpg + 40' (weighted sum of unit vectors; the ids in it "
        "are excluded from the results). search: an image file; it need not be in the database.")],
    k: _K = DEFAULT_K,
    ef_search: _EF_SEARCH = None,
    exact: _EXACT = False,
    under: _UNDER = None,
    taken_after: _TAKEN_AFTER = None,
    taken_before: _TAKEN_BEFORE = None,
    camera: _CAMERA = None,
    fmt: _FORMAT = "table",
    weights: _WEIGHTS = None,
    device: Annotated[str, typer.Option(
        "--device", help=DEVICE_HELP + " Only used to embed image files.")] = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", help=PRECISION_HELP + " Only used to embed image files.")] = "auto",
) -> None:
    """`vecsearch similar QUERY` and `vecsearch search FILE`: one command, two readings of QUERY."""
    from .. import catalogue, expr, query
    from ..limits import check_query

    fmt = output_format(fmt)
    if (device, precision) != ("auto", "auto"):
        from ..engine import check_choice

        check_choice(device, precision)
    filters = query.Filters(
        None if taken_after is None else query.parse_when(taken_after, "--taken-after"),
        None if taken_before is None else query.parse_when(taken_before, "--taken-before"), camera)
    options = {"ef_search": ef_search, "exact": exact, "under": under, "taken_after": filters.taken_after,
               "taken_before": filters.taken_before, "camera": filters.camera}
    s = settings(ctx)
    engine = {"device": device, "precision": precision, "home": s.home}
    with db.connect(s) as conn, warnings_as_lines():
        if ctx.info_name == "search":
            neighbours = query.search_file(conn, query_text, k, weights=weights, **options, **engine)
            print_neighbours(neighbours, fmt, f"neighbours of {query_text}")
            return
        terms = expr.parse(query_text)
        check_query(k, ef_search)

        def embed(path: Path):  # numpy, Pillow and the model load only when an expression names a file
            from ..embed import file_embedder

            return file_embedder(conn, weights, **engine)(path)

        neighbours, _ = expr.neighbours_of_terms(conn, terms, k, embed, **options)
        title = f"neighbours of {query_text}"
        if fmt == "table" and expr.is_single_id(terms):
            title += ": " + catalogue.get_image(conn, terms[0].ref)["path"]
    print_neighbours(neighbours, fmt, title)


app.command("similar", help="The k images nearest to an image id (itself excluded) or to an "
            "arithmetic expression.")(neighbours_command)
app.command("search", help="The k images nearest to an image file, embedded with the model the "
            "database records.")(neighbours_command)


# -- load -----------------------------------------------------------------------------------


@app.command("load")
def load_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(
        help="Folder of images, searched recursively.", show_default=False)],
    weights: Annotated[str, typer.Option(
        "--weights", help="default: torchvision's ImageNet weights (IMAGENET1K_V2, downloaded once into "
        "TORCH_HOME); FILE: a local ResNet50 state dict (air-gapped machines); random: a seeded "
        "untrained network, for smoke tests only.")] = "default",
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help=BATCH_HELP, show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, help="Decode processes [default: CPU cores - 1; 0 decodes in the main "
        "process].", show_default=False)] = None,
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "auto",
    recheck_engine: Annotated[bool, typer.Option(
        "--recheck-engine", help="Time the engines again on the first batch instead of reusing the "
        "measurement kept in the data directory (after changing drivers or hardware settings).")] = False,
    prune: Annotated[bool, typer.Option(
        "--prune", help="Delete rows under FOLDER whose files are gone.")] = False,
    reembed: Annotated[bool, typer.Option(
        "--reembed", help="Re-embed every image in the database (the way to switch models).")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print only skipped files and errors.")] = False,
    errors: Annotated[Path | None, typer.Option(
        "--errors", help="Write the skipped files to this CSV (path, reason).", show_default=False)] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="K/N", help="Load only share K of N of the files (by a hash of the path): "
        "N loaders, on N machines or GPUs, split one folder; together they equal one load.",
        show_default=False)] = None,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Then keep the database equal to FOLDER as files arrive, change, move and "
        "vanish (implies --prune), until Ctrl-C.")] = False,
    reread_metadata: Annotated[bool, typer.Option(
        "--reread-metadata", help="Read the photo metadata (EXIF date, camera, lens, GPS) of unchanged "
        "files again, without re-embedding them (files loaded before it was read are done by any "
        "load).")] = False,
) -> None:
    """Embed the images under FOLDER into the database; unchanged files are not read again.

    Exit code 0: everything loaded; 2: some files were skipped as unreadable (each listed with its
    reason); 1: a fatal error; 130: interrupted (what was committed stays; a re-run completes it).
    """
    from .. import load as loader
    from .. import progress
    from ..embed import Embedder

    with warnings_as_lines(quiet):
        try:
            s = settings(ctx)
            embedder = Embedder(weights, device=device, batch_size=batch_size, precision=precision,
                                home=s.home, recheck=recheck_engine)
            if watch:
                _watch(s, folder, embedder, progress.for_terminal(err, quiet), workers, errors,
                       reembed or shard)
            summary = loader.load(s, folder, embedder, prune=prune, reembed=reembed,
                                  progress=progress.for_terminal(err, quiet), errors_csv=errors,
                                  workers=workers, shard=_parse_shard(shard),
                                  reread_metadata=reread_metadata)
        except KeyboardInterrupt:
            err.print("interrupted: rows committed so far are kept; run the same load again to finish",
                      markup=False)
            raise typer.Exit(130) from None
    if not quiet:
        out.print(printable(summary.describe()), markup=False)
    if summary.interrupted:
        err.print("rows committed so far are kept: run the same load again to finish", markup=False)
    if summary.errors_csv_error:
        err.print(printable(f"error: {summary.errors_csv_error}"), markup=False)
    raise typer.Exit(summary.exit_code)


def _watch(s: Settings, folder: Path, embedder, report, workers: int | None, errors: Path | None,
           refused: object) -> None:
    """`load --watch`: vecsearch/watch.py; ends with its one summary line and exit code."""
    from .. import watch

    if refused:
        raise InvalidInput("--watch follows one folder: it cannot be combined with --reembed or --shard")
    summary = watch.watch(s, folder, embedder, progress=report, workers=workers, errors_csv=errors)
    out.print(printable(summary.describe()), markup=False)
    raise typer.Exit(summary.exit_code)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text, re.ASCII)  # not ² or other digits
    if not found or int(found.group(2)) < 1:
        raise InvalidInput(f"--shard {text!r}: give K/N, e.g. --shard 2/4 for the second of 4 loaders")
    return int(found.group(1)), int(found.group(2))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with distinct exit codes (tracebacks with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("VECSEARCH_DEBUG"))
    try:
        code = app(args=args, prog_name="vecsearch", standalone_mode=False)
    except _click.NoArgsIsHelpError as e:
        e.show()
        sys.exit(1)
    except _click.ClickException as e:
        # A bad option value or an unknown option is bad input: exit 1 like InvalidInput, not
        # click's 2, which `vecsearch load` means as "finished, some files skipped".
        ctx = getattr(e, "ctx", None)
        words = ctx.command_path.split(" ")[1:] if ctx is not None else []
        usage = isinstance(e, _click.UsageError)
        hint = f" (see `{' '.join(['vecsearch', *words])} --help`)" if usage else ""
        err.print(printable(f"error: {e.format_message()}{hint}"), markup=False)
        sys.exit(1)
    except typer.Abort:
        err.print("Aborted!", markup=False)
        sys.exit(1)
    except VecsearchError as e:
        if debug:
            raise
        err.print(printable(f"error: {e}", lines=True), markup=False)
        sys.exit(e.exit_code)
    except Exception as e:
        import psycopg

        cause = getattr(e, "orig", e)  # SQLAlchemy (the migrations) wraps the driver's error
        if debug or not isinstance(cause, psycopg.OperationalError):
            raise
        failure = database_failure(cause)
        err.print(printable(f"error: {failure}"), markup=False)
        sys.exit(failure.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
