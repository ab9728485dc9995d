"""`vecsearch dupes` and `vecsearch eval ...`: near-duplicate groups and retrieval quality."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import db, dupes, sheet
from .cli_common import BATCH_HELP, DEVICE_HELP, err, out, output_format, settings, stage_bars
from .errors import InvalidInput
from .limits import DEFAULT_K, MAX_K
from .output import display_path, printable


def dupes_command(
    ctx: typer.Context,
    threshold: Annotated[float, typer.Option(
        "--threshold", "-t", help="Cosine distance under which two images are near-duplicates. "
        "Default 0.05 (similarity 0.95), meant for the pretrained ResNet50: a judgement, not a "
        "measurement (pretrained weights could not be downloaded where vecsearch was built): half "
        "of imagededup's CNN default (similarity 0.9), favouring precision; re-encodes and "
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
    from . import decisions as decided
    from . import dupes, output, query

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
    query.check_ef_search(ef_search)
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


eval_app = typer.Typer(help="Measure retrieval quality on your own images (embedded into a scratch "
                       "schema that is dropped afterwards: your images table is never touched).",
                       no_args_is_help=True)

_EVAL_WEIGHTS = Annotated[str, typer.Option(
    "--weights", help="'default' (torchvision's ImageNet weights), a state-dict FILE, or 'random' "
    "(an untrained network: a smoke test only).")]
_EVAL_DEVICE = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
_EVAL_BATCH = Annotated[int | None, typer.Option("--batch-size", help=BATCH_HELP, show_default=False)]
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
        embedder = Embedder(weights, device=device, batch_size=batch_size, home=settings(ctx).home)
    for w in caught:
        err.print(printable(f"warning: {w.message}"), markup=False)
    with stage_bars() as bars:
        report = experiment(settings(ctx), folder, embedder, progress=bars, **options)
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
    batch_size: _EVAL_BATCH = None,
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
    batch_size: _EVAL_BATCH = None,
    json_out: _EVAL_JSON = False,
    plot: _EVAL_PLOT = None,
) -> None:
    """Precision@k of neighbours sharing the query's label (the ImageFolder layout), mean over queries."""
    from . import evaluate

    _eval_run(ctx, evaluate.labels, folder, weights, device, batch_size, json_out, plot,
              ks=_eval_ks(k), per_label=per_label, seed=seed, ef_search=ef_search)
