"""`vecsearch eval --plot`: a report's metrics against k as a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VecsearchError

if TYPE_CHECKING:
    from . import Report


def plot_available() -> None:
    """Raise a one-line error naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VecsearchError("--plot needs matplotlib, which is not installed: pip install "
                             "'vecsearch[plot]' (or pip install matplotlib)") from None


def plot(report: Report, path: Path) -> None:
    """One curve per metric against k (ANN solid, exact dashed), written as a PNG."""
    plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = {}
    for column in report.columns[1:]:
        method, _, metric = column.partition("_")
        colour = colours.setdefault(metric, f"C{len(colours)}")
        # exact: wide, dashed, hollow markers underneath, so equal ANN curves do not hide them
        if method == "exact":
            style = dict(linestyle="--", linewidth=3, alpha=0.5, marker="s", markersize=9,
                         markerfacecolor="none")
        else:
            style = dict(linestyle="-", linewidth=1.5, marker="o", markersize=4)
        ax.plot(report.ks, [row[column] for row in report.metrics], color=colour,
                label=column.replace("_", " "), zorder=1 if method == "exact" else 2, **style)
    ax.set_xlabel("k")
    ax.set_xticks(report.ks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"vecsearch eval {report.experiment}: {report.queries} queries, {report.images} images\n"
                 f"{report.model}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
