"""Plot the recall / latency frontier from the tables bench/ann.py printed.

    .venv/bin/python bench/frontier.py LOG [LOG...] --out docs/ann-frontier.png

One panel per table (distribution and size): recall@10 (the lower of by-id and held-out) against
p50 as a share of the exact scan's, one line per method and index config through its ef_search
values. The dashed lines are the goal: recall 0.99, p50 2 % of the exact scan.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

TITLE = re.compile(r"^### (\w+), ([\d,]+) rows")


def tables(text: str) -> dict[str, list[dict]]:
    """{"hard, 100,000 rows": [row, ...]} from the last copy of each table in `text`."""
    found: dict[str, list[dict]] = {}
    title = None
    for line in text.splitlines():
        match = TITLE.match(line)
        if match:
            title = f"{match.group(1)}, {match.group(2)} rows"
            found[title] = []
        elif title and line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 9 and cells[2]:
                found[title].append({"method": cells[0], "params": cells[1],
                                     "recall": min(float(cells[2]), float(cells[3])),
                                     "share": float(cells[6].rstrip("%"))})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found: dict[str, list[dict]] = {}
    for log in args.logs:
        found.update(tables(log.read_text()))
    cols = min(3, len(found))
    rows_of_panels = -(-len(found) // cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5 * cols, 4.2 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(found):]:
        ax.set_visible(False)
    def label(r: dict) -> str:
        config = re.sub(r", ef_search \d+|, search_k \d+", "", r["params"])
        return f"{r['method'].replace(' + re-rank', '')} {config}".strip()

    labels = sorted({label(r) for rows in found.values() for r in rows
                     if not r["method"].startswith("exact")})
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(labels)}
    for ax, (title, rows) in zip(axes.flat, found.items(), strict=False):
        lines = defaultdict(list)
        for r in rows:
            lines[label(r)].append(r)
        for name, points in lines.items():
            if name not in colour:
                continue
            points.sort(key=lambda r: r["share"])
            ax.plot([p["share"] for p in points], [p["recall"] for p in points], marker="o", ms=3,
                    color=colour[name], linestyle="-" if len(points) > 1 else "none")
        ax.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(2.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("p50, % of the exact scan in PostgreSQL")
        ax.set_ylabel("recall@10 (lower of by-id and held-out)")
        ax.set_ylim(max(0.6, min(p["recall"] for p in rows) - 0.02), 1.002)
    handles = [plt.Line2D([], [], color=colour[name], marker="o", ms=3) for name in labels]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
