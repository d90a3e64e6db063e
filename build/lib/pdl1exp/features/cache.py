"""Content-addressed Parquet cache of feature tables (atomic writes, never half-read)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

__all__ = ["FeatureCache"]


class FeatureCache:
    """Feature tables stored as ``<folder>/<key>.parquet``.

    Args:
        folder: the cache folder (created on first write).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.parquet"

    def get(self, key: str) -> pd.DataFrame | None:
        """The cached table, or None on a miss."""
        path = self.path(key)
        return pd.read_parquet(path) if path.exists() else None

    def put(self, key: str, table: pd.DataFrame) -> Path:
        """Write to a temporary file, then rename: readers see all of it or nothing."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        table.to_parquet(partial)
        os.replace(partial, path)
        return path
