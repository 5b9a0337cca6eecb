"""Writing files so that a crash never leaves one half-written that looks complete.

Whole files (manifests, configs, metrics, checkpoint summaries) go to a temporary file that is flushed to disk
and then renamed over the target, so a reader sees the old file or the whole new one. Logs that grow one record
at a time (JSON lines) are appended, flushed and fsynced per record; their readers skip a last line cut short.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """One JSON line, on disk when this returns."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """The rename itself on disk (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
