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
    """One JSON line, on disk when this returns. Written with one O_APPEND write, so two processes appending to
    one file (two annotators ranking into it) never interleave their lines."""
    data = memoryview((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_jsonl_tail(path: Path) -> bool:
    """Before appending to a JSON-lines file: a last line without its newline is completed when it is a whole JSON
    value (an editor dropped the newline), and cut off when it is not (a write interrupted by a crash), so the next
    line does not run into it. True when something was cut off."""
    path = Path(path)
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:].decode("utf-8"))
            whole = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        if whole:
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    return not whole


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
