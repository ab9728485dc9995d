"""`vecsearch db ...`: the database's commands (server, URLs, migrations, backups, reader logins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .. import db, server
from ..errors import VecsearchError
from ..limits import RESTORE_WAIT_S
from ..output import printable
from .common import embedded_only, err, out, settings

db_app = typer.Typer(help="Manage the database: start, stop, status, URL, psql, migrations, "
                     "Citus distribution.",
                     no_args_is_help=True)


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
    embedded_only(s, "start")
    if tcp is not None:
        server.configure_tcp(s.home, port if tcp else None)
    db.connect(s).close()
    out.print(db.database_url(s))


@db_app.command("stop")
def db_stop(ctx: typer.Context) -> None:
    """Stop the embedded server."""
    s = settings(ctx)
    embedded_only(s, "stop")
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
    embedded_only(s, "url --tcp")
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
    from .. import backup

    backup.backup(settings(ctx), file)
    out.print(printable(f"backed up to {file}"), markup=False)


@db_app.command("restore")
def db_restore(ctx: typer.Context, file: Annotated[Path, typer.Argument(
        help="A file written by `vecsearch db backup`.")],
        wait: Annotated[float, typer.Option(
            "--wait", min=0, help="Seconds to wait for other sessions using the tables.")] = RESTORE_WAIT_S
) -> None:
    """Replace the rows of the vecsearch tables with a backup's (its data only: no SQL from FILE runs)."""
    from .. import backup

    rows = backup.restore(settings(ctx), file, wait=wait,
                          notify=lambda line: err.print(line, markup=False))
    out.print(printable(f"restored {rows} images from {file}"), markup=False)


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Server state, versions, schema revision, image count, index size and whether the server's
    cache (shared_buffers) holds the index."""
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
    from .. import citus

    with db.connect(s) as conn:
        cluster = citus.status(conn)
        replaced = dict(cluster)
        local = db.status(conn, rows=not citus.is_distributed(conn))
        lines = [(label, replaced.pop(label, value)) for label, value in local]
        lines += [(label, value) for label, value in cluster if label in replaced]
        for label, value in lines:
            out.print(printable(f"{label + ':':<10} {value}"), markup=False)


@db_app.command("distribute")
def db_distribute(
    ctx: typer.Context,
    shards: Annotated[int | None, typer.Option(
        "--shards", help="Shards of the images table [default: 2 per worker].",
        show_default=False)] = None,
) -> None:
    """On a Citus coordinator: distribute the images table by path (one HNSW graph per shard)
    and make the model record a reference table. Rows already there move without the index, which
    is then built on every shard at once. Safe to run again, also after a kill (docs/scaling.md)."""
    from .. import citus, progress

    with db.connect(settings(ctx), session="distribute") as conn:
        out.print(printable(citus.distribute(conn, shards, progress.for_terminal(err))), markup=False)


@db_app.command("reindex")
def db_reindex(
    ctx: typer.Context,
    m: Annotated[int | None, typer.Option(
        "--m", help="HNSW links per node (2-100) [default: the index's own].", show_default=False)] = None,
    ef_construction: Annotated[int | None, typer.Option(
        "--ef-construction", help="Candidates while building (4-1000, at least 2 m) [default: the "
        "index's own].", show_default=False)] = None,
    dims: Annotated[str | None, typer.Option(
        "--dims", help="The graph's vectors: N (a compact graph over a PCA projection to N dims "
        "fitted on this table, every candidate re-ranked by the full vector), full (the whole "
        "vector), or auto (the smallest N that keeps recall@10 >= 0.99 here with a short re-rank, "
        "else with a deep one, measured; else full) "
        "[default: the representation in use, refitted].", show_default=False)] = None,
) -> None:
    """Rebuild the HNSW index, with new build parameters or representation if given (parallel,
    memory for the whole graph). Queries use the old index meanwhile; a killed rebuild leaves the
    old one, and its projection, in place. Also rebuilds an index an ETL dropped."""
    from .. import compact, hnsw, progress

    with db.connect(settings(ctx), session="reindex") as conn:
        done = hnsw.reindex(conn, m, ef_construction, progress.for_terminal(err), dims=dims)
        options = hnsw.index_options(conn)
        what = compact.describe(conn)
    out.print(printable(f"reindexed in {done.seconds:.1f} s: m={options['m']}, "
                        f"ef_construction={options['ef_construction']}; {what}"), markup=False)
    if done.recall is not None:
        out.print(f"measured recall@10 {done.recall:.3f}; this database's default ef_search is now "
                  f"{done.ef_search}", markup=False)


@db_app.command("recall")
def db_recall(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option("--sample", help="Images sampled from the table as queries.")] = 100,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 10,
    ef_search: Annotated[int | None, typer.Option(
        "--ef-search", help="Measure at this ef_search [default: the database's].",
        show_default=False)] = None,
    tune: Annotated[bool, typer.Option(
        "--tune", help="Find the smallest ef_search reaching recall 0.99 here (with a compact "
        "index, also the fewest candidates to re-rank) and make it this database's default (for "
        "every caller, SQL clients included).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
) -> None:
    """Recall@k of the HNSW index on this database's own images, against the exact scan (how
    close `vecsearch similar` is to exact here); --tune sets the ef_search that reaches 0.99."""
    from .. import recall
    from ..compact import describe
    from ..limits import DEFAULT_EF_SEARCH

    with db.connect(settings(ctx)) as conn:
        what = describe(conn)
        ids = recall.sample(conn, sample, seed)
        if tune:
            chosen, measured = recall.tune(conn, ids, k)
        else:
            current = ef_search or db.database_ef_search(conn) or DEFAULT_EF_SEARCH
            measured = recall.measure(conn, ids, k, [current])
    out.print(printable(f"index: {what}"), markup=False)
    for m in measured:
        depth = "" if m.rerank is None else f", re-rank {m.rerank}"
        out.print(f"ef_search {m.ef_search}{depth}: recall@{k} {m.recall:.3f} (worst query "
                  f"{m.worst:.1f}) over "
                  f"{len(ids)} held-out-style queries from sampled images; p50 {m.ann_ms:.1f} ms, "
                  f"exact scan {m.exact_ms:.0f} ms",
                  markup=False)
    best = max(m.recall for m in measured)
    if tune:
        depth = "" if measured[-1].rerank is None else (
            f", the compact index re-ranks the nearest {measured[-1].rerank} of its candidates")
        out.print(f"this database's default ef_search is now {chosen}{depth}", markup=False)
    if best < recall.TARGET:
        err.print(f"note: recall below {recall.TARGET}: a higher --ef-search, or an index with more links "
                  "(`vecsearch db reindex --m 32 --ef-construction 128`), brings it closer to exact",
                  markup=False)


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
    from .. import logins

    s = settings(ctx)
    with db.connect(s) as conn:
        if drop:
            logins.drop(conn, name)
            out.print(printable(f"dropped {name}"), markup=False)
            return
        password = logins.create(conn, name)
        url = logins.url(s, conn, name, password)
    print(url)
    if "?host=/" in url:
        err.print("note: a unix-socket URL; for tools in a container or on another machine run "
                  "`vecsearch db start --tcp`, then this command again", markup=False)
