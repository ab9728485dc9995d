"""One settings object, read from the environment and overridden by CLI options."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path


def _default_home() -> Path:
    # platformdirs' own logic, without importing it on the query path (XDG on Linux).
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / "vecsearch"
    import sys

    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "vecsearch"
    if sys.platform == "win32":
        from platformdirs import user_data_path

        return user_data_path("vecsearch", appauthor=False)
    return Path.home() / ".local" / "share" / "vecsearch"


def _int_env(name: str, default: int, low: int, high: int) -> int:
    """An integer setting from the environment, in pgvector's accepted range."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        from .errors import InvalidInput

        raise InvalidInput(f"{name} must be an integer from {low} to {high}, not {text!r}: "
                           "fix or unset it")
    return value


@dataclass(frozen=True)
class Settings:
    """Where the database is and how its index is built.

    `database_url` set: use that Postgres (it must have pgvector). Unset: the embedded
    server whose cluster lives in `home / "pg"`.
    """

    database_url: str | None
    home: Path
    # The index of a new database (docs/benchmarks.md, "Queries": m 16 / ef_construction 64 lost
    # recall on hard data); an existing one keeps its own until `vecsearch db reindex`.
    hnsw_m: int = 32
    hnsw_ef_construction: int = 128

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        settings = cls(
            database_url=env.get("VECSEARCH_DATABASE_URL") or None,
            home=Path(env["VECSEARCH_HOME"]).expanduser() if env.get("VECSEARCH_HOME")
            else _default_home(),
            hnsw_m=_int_env("VECSEARCH_HNSW_M", cls.hnsw_m, 2, 100),
            hnsw_ef_construction=_int_env("VECSEARCH_HNSW_EF_CONSTRUCTION", cls.hnsw_ef_construction,
                                          4, 1000),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def embedded(self) -> bool:
        return self.database_url is None
