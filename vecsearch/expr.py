"""Vector arithmetic on images: `12 + 40*0.5 - 7`, `./beach.jpg + 40`, `"my photo.jpg" - 3*0.5`.

Grammar (whitespace separates tokens; spaces around operators are optional between numbers and
required next to file names, which may contain `-` and `+`):

    expression := ["+"|"-"] product (("+"|"-") product)*
    product    := operand ["*" operand]        one image and at most one weight, either side
    operand    := INTEGER (an image id) | NUMBER (a weight) | FILE ('quoted' if it has spaces)

A word made only of digits, dots and operators is arithmetic; any other word is a file name.
In a product of two integers the first is the image id (`40*2`: image 40, weight 2).

The query vector is the weighted sum of the terms' unit vectors, normalised, as in the classic
image-embedding arithmetic experiments; the ids in the expression are excluded from results.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from .errors import InvalidInput, NotFound
from .paths import absolute
from .query import Neighbour, ids_of_paths, similar, similar_to

if TYPE_CHECKING:
    import numpy as np

MAX_ID = 2**63 - 1
_NUMBER = r"(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_ARITHMETIC_WORD = re.compile(rf"(?:[-+*]|{_NUMBER})+")
_ARITHMETIC_TOKEN = re.compile(rf"[-+*]|{_NUMBER}")
_WEIGHTED_FILE = re.compile(rf"(?P<file1>[^*]+)(?P<star>\*)(?P<number>{_NUMBER})"
                            rf"|(?P<number2>{_NUMBER})(?P<star2>\*)(?P<file2>[^*]+)")


@dataclass(frozen=True)
class Term:
    weight: float
    ref: int | Path  # an image id, or an image file
    position: int = field(default=0, compare=False)  # where it starts in the expression


@dataclass(frozen=True)
class _Token:
    kind: str  # "op", "int", "float", "file"
    text: str
    position: int


def parse(text: str) -> list[Term]:
    """The terms of an expression; InvalidInput pointing at the first bad token."""
    tokens = _tokenize(text)
    if not tokens:
        raise InvalidInput("empty expression: give an image id, a file, or ids and files joined "
                           "by + and -")
    terms: list[Term] = []
    sign, i = _sign(tokens, 0, 1.0)
    while True:
        term, i = _product(text, tokens, i, sign)
        terms.append(term)
        if i == len(tokens):
            return terms
        token = tokens[i]
        if token.kind != "op" or token.text == "*":
            raise _error(text, token.position, f"expected + or - before {token.text!r}")
        sign, i = _sign(tokens, i, 1.0)
        sign, i = _sign(tokens, i, sign)  # a unary sign after the operator: `12 - -7`
        if i == len(tokens):
            raise _error(text, len(text), f"expected an image id or file after {token.text!r}")


def is_single_id(terms: list[Term]) -> bool:
    """An expression that is one image id, unweighted: the plain neighbours of that image."""
    return len(terms) == 1 and isinstance(terms[0].ref, int) and terms[0].weight == 1


def _sign(tokens: list[_Token], i: int, sign: float) -> tuple[float, int]:
    """Consume a + or - at `i`, if there is one."""
    if i < len(tokens) and tokens[i].kind == "op" and tokens[i].text in ("+", "-"):
        return (-sign if tokens[i].text == "-" else sign), i + 1
    return sign, i


def evaluate(conn: psycopg.Connection, terms: list[Term], embed_file: Callable[[Path], np.ndarray]
             ) -> tuple[np.ndarray, list[int]]:
    """The normalised weighted sum of the terms' unit vectors, and the ids to exclude.

    Excluded: the ids in the expression, and rows stored under the path of a file term.
    """
    import numpy as np


    ids = sorted({t.ref for t in terms if isinstance(t.ref, int)})
    vectors: dict[int | Path, np.ndarray] = {}
    if ids:
        rows = conn.execute("SELECT id, embedding FROM images WHERE id = ANY(%s::bigint[])",
                            [ids]).fetchall()
        vectors.update({row[0]: _as_array(row[1]) for row in rows})
        missing = [i for i in ids if i not in vectors]
        if missing:
            raise NotFound(f"no image with id {', '.join(map(str, missing))}")
    files = []
    for term in terms:
        if isinstance(term.ref, Path):
            file = absolute(term.ref)
            if file not in vectors:
                vectors[file] = np.asarray(embed_file(file), dtype=np.float64)
                files.append(file)
    total = np.zeros_like(next(iter(vectors.values())), dtype=np.float64)
    # The direction is all that counts, so the weights are divided by the largest first: `1*5e-324`,
    # `1*1e-300` and `1*1e308 + 2*1e308` are queries like any other, never under- or overflows.
    largest = max(abs(t.weight) for t in terms)
    if largest == 0:
        raise InvalidInput("the expression cancels out: its weighted sum is the zero vector")
    for term in terms:
        v = vectors[term.ref if isinstance(term.ref, int) else absolute(term.ref)]
        total += (term.weight / largest) * v / np.linalg.norm(v)
    norm = np.linalg.norm(total)
    # Relative to the terms' own scale: `12 - 12` cancels out.
    scale = sum(abs(t.weight) / largest for t in terms)
    if not np.isfinite(norm) or norm < 1e-6 * scale:
        raise InvalidInput("the expression cancels out: its weighted sum is the zero vector")
    return (total / norm).astype(np.float32), ids + ids_of_paths(conn, files)


def _as_array(value) -> np.ndarray:
    import numpy as np

    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float64)


def _product(text: str, tokens: list[_Token], i: int, sign: float) -> tuple[Term, int]:
    first = _operand(text, tokens, i)
    i += 1
    if i < len(tokens) and tokens[i].text == "*" and tokens[i].kind == "op":
        star = tokens[i]
        second = _operand(text, tokens, i + 1) if i + 1 < len(tokens) else None
        if second is None:
            raise _error(text, len(text), "expected a weight or image after '*'")
        i += 2
        if i < len(tokens) and tokens[i].text == "*":
            raise _error(text, tokens[i].position, "one weight per term: write ID*WEIGHT")
        return _weighted(text, first, second, star, sign), i
    if first.kind == "float":
        raise _error(text, first.position,
                     f"{first.text} is a weight, not an image: write ID*{first.text}")
    return Term(sign, _ref(text, first), first.position), i


def _operand(text: str, tokens: list[_Token], i: int) -> _Token:
    token = tokens[i]
    if token.kind == "op":
        raise _error(text, token.position, f"expected an image id or file, not {token.text!r}")
    return token


def _weighted(text: str, a: _Token, b: _Token, star: _Token, sign: float) -> Term:
    if a.kind == "file" and b.kind == "file":
        raise _error(text, star.position, "two images multiplied: a weight must be a number")
    if a.kind == "file" or (a.kind == "int" and b.kind != "file"):
        image, weight = a, b
    elif b.kind in ("file", "int"):
        image, weight = b, a
    else:
        raise _error(text, a.position, f"neither {a.text} nor {b.text} is an image id")
    value = float(weight.text)
    if not math.isfinite(value):
        raise _error(text, weight.position, f"weight {weight.text} is not a finite number")
    return Term(sign * value, _ref(text, image), min(a.position, b.position))


def _ref(text: str, token: _Token) -> int | Path:
    if token.kind == "file":
        return Path(token.text)
    value = int(token.text)
    if value > MAX_ID:
        raise _error(text, token.position, f"{token.text} is too large for an image id")
    return value


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "'\"":
            end = text.find(text[i], i + 1)
            if end < 0:
                raise _error(text, i, "unterminated quote")
            if end == i + 1:
                raise _error(text, i, "empty file name")
            tokens.append(_Token("file", text[i + 1:end], i))
            i = end + 1
            continue
        end = i
        while end < n and not text[end].isspace():
            end += 1
        word = text[i:end]
        if _ARITHMETIC_WORD.fullmatch(word):
            for m in _ARITHMETIC_TOKEN.finditer(word):
                kind = "op" if m.group() in ("+", "-", "*") else _number_kind(m.group())
                tokens.append(_Token(kind, m.group(), i + m.start()))
        elif m := _WEIGHTED_FILE.fullmatch(word):  # ./beach.jpg*2 or 2*./beach.jpg
            for name in ("file1", "star", "number", "number2", "star2", "file2"):
                if m.group(name) is not None:
                    kind = ("file" if name.startswith("file") else "op" if name.startswith("star")
                            else _number_kind(m.group(name)))
                    tokens.append(_Token(kind, m.group(name), i + m.start(name)))
        else:
            tokens.append(_Token("file", word, i))
        i = end
    return tokens


def _number_kind(text: str) -> str:
    return "int" if text.isdigit() else "float"


def _error(text: str, position: int, message: str) -> InvalidInput:
    return InvalidInput(f"bad expression at position {position + 1}: {message}\n"
                        f"  {text}\n  {' ' * position}^")


def neighbours_of_terms(conn: psycopg.Connection, terms: Sequence[Any], k: int,
                        embed_file: Callable[[Path], np.ndarray], *, ef_search: int | None = None,
                        exact: bool = False, under: str | Path | None = None, **filters: Any
                        ) -> tuple[list[Neighbour], list[int]]:
    """Neighbours of a parsed expression (expr.parse) and the ids it excludes: an image id alone
    is `similar`; anything else is the normalised weighted sum, its ids and files left out.
    `filters`: taken_after, taken_before, camera (query.Filters)."""
    options = {"ef_search": ef_search, "exact": exact, "under": under, **filters}
    if is_single_id(terms):
        return similar(conn, terms[0].ref, k, **options), [terms[0].ref]
    vector, exclude = evaluate(conn, terms, embed_file)
    return similar_to(conn, vector, k, exclude=exclude, **options), exclude
