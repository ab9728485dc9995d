"""`vecsearch dupes`: near-duplicate groups, their keepers and the stored decisions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import db, dupes, sheet
from ..errors import InvalidInput
from ..limits import DEFAULT_K, MAX_K, check_ef_search
from ..output import display_path, printable
from .common import err, output_format, settings, stage_bars


def dupes_command(
    ctx: typer.Context,
    threshold: Annotated[float, typer.Option(
        "--threshold", "-t", help="Cosine distance under which two images are near-duplicates. "
        "Default 0.05 (similarity 0.95), meant for the pretrained ResNet50: a judgement, not a "
        "measurement: half of imagededup's CNN default (similarity 0.9), favouring precision; re-encodes and "
        "resizes should sit far below it. `vecsearch eval perturb` prints the distances copies "
        "get on your own images. Exact copies (same sha256) are always grouped.")] = dupes.DEFAULT_THRESHOLD,
    under: Annotated[Path | None, typer.Option(
        "--under", help="Only images whose path is under DIR.", show_default=False)] = None,
    k: Annotated[int, typer.Option(
        "--k", "-k", help="Neighbours asked per image (grown automatically for big groups).")] = DEFAULT_K,
    ef_search: Annotated[int, typer.Option(
        "--ef-search", help="HNSW candidates per image: higher is slower and misses fewer.")
    ] = dupes.EF_SEARCH,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", help="Parallel database connections [default: CPU cores, at most 4].",
        show_default=False)] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table, json, csv, or paths (every member's path).")] = "table",
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write a contact sheet of the groups (thumbnails inline) to FILE.",
        show_default=False)] = None,
    include_settled: Annotated[bool, typer.Option(
        "--include-settled", help="Also groups whose every file has a decision (gallery /duplicates).")
    ] = False,
    decisions: Annotated[bool, typer.Option(
        "--decisions", help="Print the stored decisions (gallery /duplicates) instead of searching.")
    ] = False,
    move_to: Annotated[str | None, typer.Option(
        "--move-to", help="With --decisions: print a shell script that moves the decided duplicates "
        "into DIR (under their own absolute paths), to read and run yourself.", show_default=False)
    ] = None,
) -> None:
    """Groups of near-duplicate images, the suggested keeper (the most pixels, then the largest
    file, then the oldest) first; groups already settled in the gallery are left out.

    Each image's neighbours within the threshold come from the HNSW index, joined into groups
    (union-find): no all-pairs matrix, so it scales to 100k+ images in bounded memory.
    """
    from .. import decisions as decided
    from .. import dupes, output

    fmt = output_format(fmt)
    if move_to is not None and not decisions:
        raise InvalidInput("--move-to goes with --decisions")
    if decisions:
        with db.connect(settings(ctx)) as conn:
            rows = decided.export(conn)
        if move_to is not None:
            sys.stdout.write(decided.move_script(rows, str(Path(move_to).expanduser().absolute())))
        else:
            output.render(rows, decided.COLUMNS, fmt, title="duplicate decisions")
        err.print(f"{len({r['decision'] for r in rows})} decisions ({len(rows)} files)", markup=False)
        return
    check_ef_search(ef_search)
    if html is not None and not html.parent.is_dir():
        raise InvalidInput(f"--html {html}: the folder {html.parent} does not exist")
    s = settings(ctx)
    with db.connect(s) as conn, stage_bars() as bars:
        result = dupes.find_duplicates(
            conn, threshold, under=under, k=k, ef_search=ef_search,
            jobs=jobs if jobs is not None else min(4, os.cpu_count() or 1),
            progress=bars)
        settled = 0
        if not include_settled:
            seen = decided.review(conn, result.groups)
            result.groups, settled = seen.pending, seen.settled
    output.render(result.rows(), dupes.COLUMNS, fmt,
                  title=f"near-duplicates (cosine distance < {threshold:g})")
    members = sum(len(g.members) for g in result.groups)
    groups = f"{len(result.groups)} group{'' if len(result.groups) == 1 else 's'}"
    err.print(f"{groups} ({members} images, {members - len(result.groups)} "
              f"removable) among {result.images} images in {result.seconds:.1f} s", markup=False)
    if settled:
        err.print(f"{settled} settled group{'' if settled == 1 else 's'} left out (--include-settled "
                  "shows them, --decisions lists the decisions)", markup=False)
    if result.unreached:
        err.print(f"{result.unreached} images the HNSW graph search did not reach were compared "
                  "exactly with all others", markup=False)
    if result.truncated:
        err.print(f"warning: {len(result.truncated)} images have more than {MAX_K} near "
                  "neighbours; their groups may be incomplete (lower --threshold)", markup=False)
    if html is not None:
        sheet.write_contact_sheet(result, html, s.home)
        err.print(printable(f"contact sheet: {display_path(str(html))}"), markup=False)
