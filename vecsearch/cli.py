"""The `vecsearch` command: a thin typer layer over the library modules.

Heavy imports (torch, numpy, SQLAlchemy, alembic) happen inside the commands that need them,
so `vecsearch similar` starts in a fraction of a second.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__, db, server
from .config import Settings
from .errors import DatabaseUnavailable, InvalidInput, VecsearchError, first_line
from .limits import MAX_K
from .output import printable

app = typer.Typer(
    help="Image similarity search inside PostgreSQL (ResNet50 embeddings, pgvector HNSW).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Manage the database: start, stop, status, URL, psql, migrations.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# A usage error (bad option value, unknown option) is bad input: exit 1 like InvalidInput, not
# click's 2, which `vecsearch load` means as "finished, some files skipped".
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_UsageError.exit_code = 1


def _show_usage_error(self, file=None) -> None:
    """One `error:` line instead of click's Usage/Try/Error block."""
    words = self.ctx.command_path.split(" ")[1:] if self.ctx is not None else []
    hint = f" (see `{' '.join(['vecsearch', *words])} --help`)"
    err.print(printable(f"error: {self.format_message()}{hint}"), markup=False)


_UsageError.show = _show_usage_error


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


def settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def _embedded_only(s: Settings, what: str) -> None:
    if not s.embedded:
        raise VecsearchError(
            f"`vecsearch db {what}` manages the embedded server, but VECSEARCH_DATABASE_URL "
            "(or --database-url) points at another server: unset it to use the embedded one"
        )


# -- db -------------------------------------------------------------------------------------


@db_app.command("start")
def db_start(
    ctx: typer.Context,
    tcp: Annotated[bool, typer.Option(
        "--tcp/--no-tcp", help="Also listen on 127.0.0.1 with a generated password "
        "(for tools that cannot use a unix socket).", show_default=False)] = None,
    port: Annotated[int, typer.Option(help="TCP port with --tcp.")] = 5433,
) -> None:
    """Start the embedded server (commands also start it on demand) and migrate the schema."""
    s = settings(ctx)
    _embedded_only(s, "start")
    if tcp is not None:
        server.configure_tcp(s.home, port if tcp else None)
    db.connect(s).close()
    out.print(db.database_url(s))


@db_app.command("stop")
def db_stop(ctx: typer.Context) -> None:
    """Stop the embedded server."""
    s = settings(ctx)
    _embedded_only(s, "stop")
    out.print("stopped" if server.stop(s.home) else "not running")


@db_app.command("url")
def db_url(
    ctx: typer.Context,
    tcp: Annotated[bool, typer.Option("--tcp", help="The TCP URL (after `db start --tcp`).")] = False,
) -> None:
    """Print a libpq URL for psql, Metabase, Grafana or a notebook."""
    s = settings(ctx)
    if not tcp:
        print(db.database_url(s))
        return
    _embedded_only(s, "url --tcp")
    url = server.tcp_url(s.home, server.ensure_running(s.home))
    if url is None:
        raise VecsearchError("TCP is off: run `vecsearch db start --tcp` first")
    print(url)


@db_app.command("psql", context_settings={"allow_extra_args": True,
                                          "ignore_unknown_options": True})
def db_psql(ctx: typer.Context) -> None:
    """Open psql on the database (extra arguments go to psql)."""
    s = settings(ctx)
    db.connect(s).close()  # started and migrated first
    url = db.database_url(s)
    psql = str(server.bin_path("psql"))
    os.execv(psql, [psql, url, *ctx.args])


@db_app.command("migrate")
def db_migrate(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply schema migrations (commands also do this on first use)."""
    out.print(printable(f"schema at {db.migrate_to(db.database_url(settings(ctx)), revision)}"),
              markup=False)


@db_app.command("backup")
def db_backup(ctx: typer.Context, file: Annotated[Path, typer.Argument(help="Dump file to write.")]) -> None:
    """Back up the database to FILE (pg_dump custom format)."""
    from . import backup

    backup.backup(settings(ctx), file)
    out.print(printable(f"backed up to {file}"), markup=False)


@db_app.command("restore")
def db_restore(ctx: typer.Context, file: Annotated[Path, typer.Argument(
        help="A file written by `vecsearch db backup`.")],
        wait: Annotated[float, typer.Option(
            "--wait", min=0, help="Seconds to wait for other sessions using the tables.")] = 60) -> None:
    """Replace the rows of the vecsearch tables with a backup's (its data only: no SQL from FILE runs)."""
    from . import backup

    rows = backup.restore(settings(ctx), file, wait=wait,
                          notify=lambda line: err.print(line, markup=False))
    out.print(printable(f"restored {rows} images from {file}"), markup=False)


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Server state, versions, schema revision, image count and index size."""
    s = settings(ctx)
    if s.embedded:
        running = server.running(s.home)
        state = f"running (pid {running.pid})" if running else "stopped"
        out.print(printable(f"server:    embedded, {state}"), markup=False)
        out.print(printable(f"data dir:  {server.pgdata(s.home)}"), markup=False)
        if running is None:
            return
        if running.listen:
            out.print(printable(f"tcp:       {running.listen}:{running.port}"), markup=False)
    else:
        out.print(printable(f"server:    {db.redact(s.database_url)}"), markup=False)
    with db.connect(s) as conn:
        for label, value in db.status(conn):
            out.print(printable(f"{label + ':':<10} {value}"), markup=False)


# -- dupes ----------------------------------------------------------------------------------


def _progress():
    """Transient progress bars on stderr (nothing when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


@app.command("dupes")
def dupes_command(
    ctx: typer.Context,
    threshold: Annotated[float, typer.Option(
        "--threshold", "-t", help="Cosine distance under which two images are near-duplicates. "
        "Default 0.05 (similarity 0.95), meant for the pretrained ResNet50: a judgement, not a "
        "measurement (pretrained weights could not be downloaded where vecsearch was built): half "
        "of imagededup's CNN default (similarity 0.9), favouring precision; re-encodes and "
        "resizes should sit far below it. `vecsearch eval perturb` prints the distances copies "
        "get on your own images. Exact copies (same sha256) are always grouped.")] = 0.05,
    under: Annotated[Path | None, typer.Option(
        "--under", help="Only images whose path is under DIR.", show_default=False)] = None,
    k: Annotated[int, typer.Option(
        "--k", "-k", help="Neighbours asked per image (grown automatically for big groups).")] = 10,
    ef_search: Annotated[int, typer.Option(
        "--ef-search", help="HNSW candidates per image: higher is slower and misses fewer.")] = 100,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", help="Parallel database connections [default: CPU cores, at most 4].",
        show_default=False)] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table, json, csv, or paths (every member's path).")] = "table",
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write a contact sheet of the groups (thumbnails inline) to FILE.",
        show_default=False)] = None,
) -> None:
    """Groups of near-duplicate images, the suggested keeper (largest resolution, then file) first.

    Each image's neighbours within the threshold come from the HNSW index, joined into groups
    (union-find): no all-pairs matrix, so it scales to 100k+ images in bounded memory.
    """
    from . import dupes, output, query

    fmt = _output_format(fmt)
    query.check_ef_search(ef_search)
    if html is not None and not html.parent.is_dir():
        raise InvalidInput(f"--html {html}: the folder {html.parent} does not exist")
    s = settings(ctx)
    with db.connect(s) as conn, _progress() as bar:
        task = bar.add_task("dupes", total=None)
        result = dupes.find_duplicates(
            conn, threshold, under=under, k=k, ef_search=ef_search,
            jobs=jobs if jobs is not None else min(4, os.cpu_count() or 1),
            progress=lambda done, total: bar.update(task, completed=done, total=total))
    output.render(result.rows(), dupes.COLUMNS, fmt,
                  title=f"near-duplicates (cosine distance < {threshold:g})")
    members = sum(len(g.members) for g in result.groups)
    groups = f"{len(result.groups)} group{'' if len(result.groups) == 1 else 's'}"
    err.print(f"{groups} ({members} images, {members - len(result.groups)} "
              f"removable) among {result.images} images in {result.seconds:.1f} s", markup=False)
    if result.unreached:
        err.print(f"{result.unreached} images the HNSW graph search did not reach were compared "
                  "exactly with all others", markup=False)
    if result.truncated:
        err.print(f"warning: {len(result.truncated)} images have more than {MAX_K} near "
                  "neighbours; their groups may be incomplete (lower --threshold)", markup=False)
    if html is not None:
        dupes.write_contact_sheet(result, html, s.home)
        err.print(printable(f"contact sheet: {html}"), markup=False)


# -- eval -----------------------------------------------------------------------------------

eval_app = typer.Typer(help="Measure retrieval quality on your own images (embedded into a scratch "
                       "schema that is dropped afterwards: your images table is never touched).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

_EVAL_WEIGHTS = Annotated[str, typer.Option(
    "--weights", help="'default' (torchvision's ImageNet weights), a state-dict FILE, or 'random' "
    "(an untrained network: a smoke test only).")]
_EVAL_DEVICE = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
_EVAL_BATCH = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
_EVAL_EF = Annotated[int | None, typer.Option(
    "--ef-search", help="HNSW candidates per query for the ANN side [default: that of `vecsearch "
    "similar`].", show_default=False)]
_EVAL_JSON = Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")]
_EVAL_PLOT = Annotated[Path | None, typer.Option(
    "--plot", help="Also write a PNG with one curve per metric against k (needs matplotlib: "
    "pip install 'vecsearch[plot]').", show_default=False)]
_EVAL_SEED = Annotated[int, typer.Option("--seed", help="Seed of the sampling and perturbations.")]


def _eval_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,3,5",
                                 param_hint="-k") from None
    if not ks:
        raise typer.BadParameter("give at least one k", param_hint="-k")
    return ks


def _eval_run(ctx: typer.Context, experiment, folder: Path, weights: str, device: str, batch_size: int,
              json_out: bool, plot: Path | None, **options) -> None:
    import json
    import warnings

    from . import output, plots
    from .embed import Embedder

    options = {key: value for key, value in options.items() if value is not None}
    if plot is not None:
        plots.plot_available()  # fail before the long part
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedder = Embedder(weights, device=device, batch_size=batch_size)
    for w in caught:
        err.print(f"warning: {w.message}", markup=False)
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        report = experiment(settings(ctx), folder, embedder, progress=progress, **options)
    if json_out:
        json.dump(report.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        output.render(report.metrics, report.columns, "table",
                      title=f"{report.experiment}: {report.queries} queries among {report.images} images, "
                            f"{report.model}")
        print()
        output.render(report.details, report.detail_columns, "table")
        for note in report.notes:
            out.print(f"note: {note}", markup=False)
    for path, reason in report.skipped[:10]:
        err.print(printable(f"skipped: {reason if reason.startswith(path) else f'{path}: {reason}'}"),
                  markup=False)
    if len(report.skipped) > 10:
        err.print(f"... and {len(report.skipped) - 10} more (all in --json)", markup=False)
    if plot is not None:
        plots.plot(report, plot)
        err.print(f"plot: {plot}", markup=False)


@eval_app.command("perturb")
def eval_perturb(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Folder of images to draw the originals from.")],
    originals: Annotated[int, typer.Option("--originals", "-n", help="How many originals.")] = 20,
    k: Annotated[str, typer.Option("-k", "--k", help="Comma-separated k values.")] = "1,3,5,10",
    perturbations: Annotated[str, typer.Option(
        "--perturbations", help="Comma-separated, from: crop (60-80% of each side, resized back), "
        "rotate (10-25 degrees), color (brightness/contrast/saturation x0.6-1.4, hue +-0.05), "
        "blur (Gaussian, 1-2% of the longer side), jpeg (halved, quality 20-40), noise (sigma 10-20), "
        "flip (mirror).")] = "crop,rotate,color,blur,jpeg",
    seed: _EVAL_SEED = 0,
    ef_search: _EVAL_EF = None,
    weights: _EVAL_WEIGHTS = "default",
    device: _EVAL_DEVICE = "auto",
    batch_size: _EVAL_BATCH = 16,
    json_out: _EVAL_JSON = False,
    plot: _EVAL_PLOT = None,
) -> None:
    """Can each original find its own perturbed copies? Precision, recall and F1 at each k.

    N originals (seeded draw) get one copy per perturbation; each original queries its k nearest
    and its copies are the relevant ones. ANN (HNSW) and exact search side by side, plus ANN
    recall@k against exact; per perturbation, the copies' cosine distances to their original,
    which tell where a `vecsearch dupes --threshold` belongs for your images.
    """
    from . import evaluate

    _eval_run(ctx, evaluate.perturb, folder, weights, device, batch_size, json_out, plot,
              originals=originals, ks=_eval_ks(k), seed=seed, ef_search=ef_search,
              perturbations=[p.strip() for p in perturbations.split(",") if p.strip()])


@eval_app.command("labels")
def eval_labels(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="DIR/<label>/<images>: one sub-folder per label.")],
    k: Annotated[str, typer.Option("-k", "--k", help="Comma-separated k values.")] = "1,5,10",
    per_label: Annotated[int | None, typer.Option(
        "--per-label", help="At most this many images per label (seeded draw; default all).",
        show_default=False)] = None,
    seed: _EVAL_SEED = 0,
    ef_search: _EVAL_EF = None,
    weights: _EVAL_WEIGHTS = "default",
    device: _EVAL_DEVICE = "auto",
    batch_size: _EVAL_BATCH = 16,
    json_out: _EVAL_JSON = False,
    plot: _EVAL_PLOT = None,
) -> None:
    """Precision@k of neighbours sharing the query's label (the ImageFolder layout), mean over queries."""
    from . import evaluate

    _eval_run(ctx, evaluate.labels, folder, weights, device, batch_size, json_out, plot,
              ks=_eval_ks(k), per_label=per_label, seed=seed, ef_search=ef_search)


def _output_format(fmt: str) -> str:
    from .output import Format

    try:
        return Format(fmt)
    except ValueError:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(f.value for f in Format)}",
                                 param_hint="--format") from None


# -- serve ----------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Anything but loopback lets everyone who can reach "
        "this machine browse and download your indexed images.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).")] = 8000,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Weights of the recorded model for search by upload: a state-dict FILE, "
        "or 'random' for a database loaded with --weights random (default: the recorded model's "
        "own). Loaded on the first upload.", show_default=False)] = None,
    max_upload_mb: Annotated[int, typer.Option(
        "--max-upload-mb", min=1, help="Largest image upload accepted, in MB.")] = 20,
) -> None:
    """Web gallery: browse thumbnails, click for neighbours, search by upload or arithmetic; JSON API."""
    from . import web

    def announce(line: str) -> None:
        out.print(line, markup=False)
        sys.stdout.flush()

    web.serve(settings(ctx), host=host, port=port, weights=weights,
              max_upload_bytes=max_upload_mb * 1024 * 1024, announce=announce)


# -- queries: similar, search, db reader -----------------------------------------------------

_K = Annotated[int, typer.Option("--k", "-k", help="How many neighbours (1-1000).")]
_EF_SEARCH = Annotated[int | None, typer.Option(
    "--ef-search", help="HNSW candidates per query, 1-1000 (default 200): higher is slower and "
    "closer to exact.", show_default=False)]
_EXACT = Annotated[bool, typer.Option(
    "--exact", help="Exact scan instead of the HNSW index (slow on large tables).")]
_UNDER = Annotated[Path | None, typer.Option(
    "--under", help="Only images whose path is under DIR.", show_default=False)]
_FORMAT = Annotated[str, typer.Option(
    "--format", "-f", help="table, json, csv, or paths (one per line, for pipes).")]
_WEIGHTS = Annotated[str | None, typer.Option(
    "--weights", help="Weights file of the recorded model, for a database loaded with --weights FILE "
    "(only used to embed image files).", show_default=False)]


@app.command("similar")
def similar_command(
    ctx: typer.Context,
    query_text: Annotated[str, typer.Argument(
        metavar="QUERY", help="An image id; or arithmetic on ids and image files, e.g. "
        "'12 + 40*0.5 - 7' or './beach.jpg + 40' (weighted sum of unit vectors; the ids in it "
        "are excluded from the results).")],
    k: _K = 10,
    ef_search: _EF_SEARCH = None,
    exact: _EXACT = False,
    under: _UNDER = None,
    fmt: _FORMAT = "table",
    weights: _WEIGHTS = None,
) -> None:
    """The k images nearest to an image id (itself excluded) or to an arithmetic expression."""
    from . import catalogue, expr, query

    fmt = _output_format(fmt)
    terms = expr.parse(query_text)
    query.check_args(k, ef_search)
    with db.connect(settings(ctx)) as conn, _warnings_as_lines():
        neighbours, _ = query.neighbours_of_terms(conn, terms, k, query.file_embedder(conn, weights),
                                                  ef_search=ef_search, exact=exact, under=under)
        title = f"neighbours of {query_text}"
        if fmt == "table" and expr.is_single_id(terms):
            title += ": " + catalogue.get_image(conn, terms[0].ref)["path"]
    _print_neighbours(neighbours, fmt, title)


@app.command("search")
def search_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An image file; it need not be in the database.")],
    k: _K = 10,
    ef_search: _EF_SEARCH = None,
    exact: _EXACT = False,
    under: _UNDER = None,
    fmt: _FORMAT = "table",
    weights: _WEIGHTS = None,
) -> None:
    """The k images nearest to an image file, embedded with the model the database records."""
    from . import query

    fmt = _output_format(fmt)
    with db.connect(settings(ctx)) as conn, _warnings_as_lines():
        neighbours = query.search_file(conn, file, k, weights=weights, ef_search=ef_search,
                                       exact=exact, under=under)
    _print_neighbours(neighbours, fmt, f"neighbours of {file}")


@contextmanager
def _warnings_as_lines():
    """Python warnings (e.g. the random-weights test model) as one `warning: ...` line each."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: err.print(
            printable(f"warning: {message}"), markup=False)
        yield


def _print_neighbours(neighbours, fmt: str, title: str | None) -> None:
    from . import output, query

    output.render(query.rows(neighbours), query.COLUMNS, fmt, title=title)


@db_app.command("reader")
def db_reader(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Login name for the tool, e.g. metabase.")],
    drop: Annotated[bool, typer.Option("--drop", help="Drop this reader login instead.")] = False,
) -> None:
    """Create a read-only login for an analytics tool and print its URL (again: new password).

    The login can SELECT the tables and call vecsearch_similar()/vecsearch_similar_to(), nothing
    else. Tools that cannot use a unix socket need `vecsearch db start --tcp` first.
    """
    from . import reader

    s = settings(ctx)
    with db.connect(s) as conn:
        if drop:
            reader.drop(conn, name)
            out.print(printable(f"dropped {name}"), markup=False)
            return
        password = reader.create(conn, name)
        url = reader.url(s, conn, name, password)
    print(url)
    if "?host=/" in url:
        err.print("note: a unix-socket URL; for tools in a container or on another machine run "
                  "`vecsearch db start --tcp`, then this command again", markup=False)


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
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model forward.")] = 16,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Decode processes [default: CPU cores - 1; 0 decodes in the main process].",
        show_default=False)] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="fp32, or bf16: autocast, used only if on the first batch it keeps cosine >= "
        "0.999 to fp32 and is faster (else fp32, with a warning).")] = "fp32",
    prune: Annotated[bool, typer.Option(
        "--prune", help="Delete rows under FOLDER whose files are gone.")] = False,
    reembed: Annotated[bool, typer.Option(
        "--reembed", help="Re-embed every image in the database (the way to switch models).")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print only skipped files and errors.")] = False,
    errors: Annotated[Path | None, typer.Option(
        "--errors", help="Write the skipped files to this CSV (path, reason).", show_default=False)] = None,
) -> None:
    """Embed the images under FOLDER into the database; unchanged files are not read again.

    Exit code 0: everything loaded; 2: some files were skipped as unreadable (each listed with its
    reason); 1: a fatal error; 130: interrupted (what was committed stays; a re-run completes it).
    """
    import warnings

    from . import load as loader
    from . import progress
    from .embed import Embedder

    def show(message, category, *args, **kwargs) -> None:
        err.print(printable(f"warning: {message}"), markup=False)

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        warnings.showwarning = show
        try:
            embedder = Embedder(weights, device=device, batch_size=batch_size, precision=precision)
            summary = loader.load(settings(ctx), folder, embedder, prune=prune, reembed=reembed,
                                  progress=progress.for_terminal(err, quiet), errors_csv=errors,
                                  workers=workers)
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


def main() -> None:
    """Console entry point: one-line errors with distinct exit codes (tracebacks with --debug)."""
    debug = "--debug" in sys.argv[1:] or bool(os.environ.get("VECSEARCH_DEBUG"))
    try:
        app()
    except VecsearchError as e:
        if debug:
            raise
        err.print(printable(f"error: {e}", lines=True), markup=False)
        sys.exit(e.exit_code)
    except Exception as e:
        import psycopg

        if debug or not isinstance(e, psycopg.OperationalError):
            raise
        # Class 08 and 57P (shutdown, crash) or no SQLSTATE: the connection itself is gone; else the
        # server refused the work (disk full, out of memory...). One line either way.
        sqlstate = getattr(e, "sqlstate", None) or ""
        what = "database connection lost" if sqlstate[:2] in ("", "08") or sqlstate.startswith("57P") \
            else "database error"
        first = first_line(e)
        err.print(printable(f"error: {what}: {first}"), markup=False)
        sys.exit(DatabaseUnavailable.exit_code)
