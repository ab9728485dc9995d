"""What the `vecsearch` commands share: the consoles, the settings, output and progress helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from ..config import Settings
from ..errors import VecsearchError
from ..output import printable
from ..progress import Progress

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def embedded_only(s: Settings, what: str) -> None:
    if not s.embedded:
        raise VecsearchError(
            f"`vecsearch db {what}` manages the embedded server, but VECSEARCH_DATABASE_URL "
            "(or --database-url) points at another server: unset it to use the embedded one"
        )


@contextmanager
def stage_bars() -> Iterator[Progress]:
    """For dupes and eval: progress.Bar (a load's bar, one line per stage) on a terminal, else
    nothing at all (their output is the table that follows)."""
    from ..progress import Bar

    if not err.is_terminal:
        yield Progress()
        return
    bar = Bar(err)
    try:
        yield bar
    finally:
        bar.stop()


DEVICE_HELP = "auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda[:N] or mps."
BATCH_HELP = "Images per model forward [default: the device's: 16 on a CPU, 128 on CUDA, 64 on MPS]."
PRECISION_HELP = ("auto: a reduced precision (bf16 on a CPU with native bf16, fp16 or bf16 on a GPU) where "
                  "it keeps every vector checked within cosine 0.9999 of fp32 and is faster, else fp32; "
                  "timed once per machine and model, and only when the work repays it; "
                  "fp32 forces the reference; bf16 or fp16 ask for one (timed and checked).")


def output_format(fmt: str) -> str:
    from ..output import Format

    try:
        return Format(fmt)
    except ValueError:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(f.value for f in Format)}",
                                 param_hint="--format") from None


@contextmanager
def warnings_as_lines(quiet: bool = False) -> Iterator[None]:
    """Python warnings (e.g. the random-weights test model) as one `warning: ...` line each on
    stderr, or none with `quiet`: how every command shows them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "always")
        warnings.showwarning = lambda message, *args, **kwargs: err.print(
            printable(f"warning: {message}"), markup=False)
        yield


def print_neighbours(neighbours, fmt: str, title: str | None) -> None:
    from .. import output, query

    output.render(query.rows(neighbours), query.COLUMNS, fmt, title=title)
