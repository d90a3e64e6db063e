"""Small per-patient results kept on disk as JSON by key: rereading them costs no image read.

Used where a warm run would otherwise reread every image only to recompute what it already
knows (the manifest's checks, the ROIs' sizes). Entries are written to a temporary name and
renamed, so concurrent runs and killed ones never leave a half-written entry.
"""

from __future__ import annotations

import json
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

from pdl1exp.hashing import content_key, file_digest

__all__ = ["code_key", "read_memo", "stat_signature", "write_memo"]


def read_memo(folder: Path, key: str) -> Any | None:
    """The value stored under ``key``, or None."""
    path = folder / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_memo(folder: Path, key: str, value: Any) -> None:
    """Store a JSON-serialisable ``value`` under ``key`` (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def stat_signature(path: Path | None) -> list[list[Any]] | None:
    """Name, size, modification time and inode of a file, or of every file in a folder
    (what ``git status`` and ``make`` trust to tell a changed file); None for no file."""
    if path is None or not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f), s.st_size, s.st_mtime_ns, s.st_ino] for f in files for s in [f.stat()]]


@cache
def code_key(*modules: str) -> str:
    """A key of the source of some pdl1exp modules (paths relative to the package): a memo
    written by other code is not read back."""
    package = Path(__file__).parent
    return content_key({m: file_digest(package / m) for m in modules})
