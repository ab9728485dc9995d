"""`vecsearch dupes --html`: a contact sheet of the near-duplicate groups, thumbnails inline."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from pathlib import Path

from . import thumbs
from .dupes import KEEPER_RULE, DupesResult, Group, Member
from .output import printable
from .verified_files import Verified

_PAGE_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>vecsearch dupes</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 1em; }}
section {{ border-top: 1px solid #ccc; padding: .5em 0; }}
figure {{ display: inline-block; vertical-align: top; margin: .3em; width: {px}px; }}
figure img {{ max-width: {px}px; max-height: {px}px; display: block; }}
figure.keep img {{ outline: 3px solid #2a2; }}
figcaption {{ word-break: break-all; color: #333; }}
.missing {{ width: {px}px; height: {px}px; background: #eee; color: #a00; }}
</style></head><body>
<h1>Near-duplicate groups</h1>
<p>{summary}</p>
"""


def write_contact_sheet(result: DupesResult, path: Path, home: Path,
                        groups: Iterable[Group] | None = None) -> int:
    """An HTML page with each group's thumbnails (inline JPEGs, keeper outlined in green).

    Thumbnails come from the web gallery's cache under `home` (vecsearch.thumbs). Streams to
    `path`, one thumbnail in memory at a time; returns the number of groups written.
    """
    px = thumbs.SIZES["thumb"]
    verified = Verified()
    summary = (f"{len(result.groups)} groups among {result.images} images, cosine distance "
               f"&lt; {result.threshold:g}; the suggested keeper ({KEEPER_RULE}) first.")
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        out.write(_PAGE_HEAD.format(px=px * 5 // 8, summary=summary))
        for n, group in enumerate(result.groups if groups is None else groups, 1):
            out.write(f"<section><h2>group {n} ({len(group.members)} images)</h2>\n")
            for i, m in enumerate(group.members):
                role = "keep" if i == 0 else "dupe"
                caption = (f"{role} #{m.id} &middot; d={m.distance:.4f} &middot; {m.width}x{m.height} "
                           f"&middot; {m.bytes:,} B<br>{html.escape(printable(m.path))}")
                out.write(f'<figure class="{role}">{_thumbnail(home, m, px, verified)}'
                          f"<figcaption>{caption}</figcaption></figure>\n")
            out.write("</section>\n")
            written += 1
        out.write("</body></html>\n")
    return written


def _thumbnail(home: Path, m: Member, px: int, verified: Verified) -> str:
    try:
        row = {"id": m.id, "path": m.path, "sha256": m.sha256, "bytes": m.bytes}
        data = thumbs.thumbnail(home, row, px, verified).read_bytes()
    except Exception as e:  # a vanished or unreadable file must not stop the page
        reason = html.escape(printable(f"{type(e).__name__}: {e}"[:200]))
        return f'<div class="missing">cannot read: {reason}</div>'
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(data).decode("ascii")}">'
