"""`vecsearch eval ...`: retrieval quality on the user's own images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..output import printable
from .common import BATCH_HELP, DEVICE_HELP, err, out, settings, stage_bars, warnings_as_lines

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

    from .. import output
    from ..embed import Embedder
    from ..eval import plots

    options = {key: value for key, value in options.items() if value is not None}
    if plot is not None:
        plots.plot_available()  # fail before the long part
    with warnings_as_lines():
        embedder = Embedder(weights, device=device, batch_size=batch_size, home=settings(ctx).home)
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
    from .. import eval as evaluation

    _eval_run(ctx, evaluation.perturb, folder, weights, device, batch_size, json_out, plot,
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
    from .. import eval as evaluation

    _eval_run(ctx, evaluation.labels, folder, weights, device, batch_size, json_out, plot,
              ks=_eval_ks(k), per_label=per_label, seed=seed, ef_search=ef_search)
