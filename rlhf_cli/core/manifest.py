"""Checkpoint manifests: the proof that a stage folder is finished, and what the next stage inherits.

`rlhf_manifest.json` is written last, atomically, into every finished stage folder. A folder without it is
never taken as a finished stage. Stages train into a sibling staging folder and only move it into place once
the manifest is written, so an interrupted or failed run never damages a finished one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.core import launch
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.stages import a_stage, command_for

MANIFEST = "rlhf_manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.data.get("stage", "?")

    @property
    def args(self) -> dict[str, Any]:
        return self.data.get("args", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data.get("metrics", {})


def read_manifest(folder: str | Path) -> Manifest | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable manifest ({e}); re-run the stage that made {folder}") from None
    return Manifest(Path(folder), data)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("rlhf-cli", "torch", "transformers", "trl", "datasets", "accelerate", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(folder: Path, *, stage: str, parents: list[str], args: dict[str, Any],
                   data: dict[str, Any], metrics: dict[str, Any], started: float) -> Path:
    """Write the model card (README.md), then the manifest last and atomically (temp file + rename). Under
    several processes only rank 0 writes."""
    from rlhf_cli.core.model_card import write_model_card

    if not launch.is_main():
        return folder / MANIFEST
    now = time.time()
    body = {
        "format": FORMAT_VERSION,
        "stage": stage,
        "parents": parents,
        "args": args,
        "data": data,
        "metrics": metrics,
        "processes": launch.world_size(),
        "versions": library_versions(),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(now - started, 2),
    }
    write_model_card(folder, body)
    atomic_write_text(folder / MANIFEST, json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n")
    return folder / MANIFEST


def stage_dir(explicit: str | None, run: str | None, stage: str) -> Path | None:
    """Where a stage lives: the explicit path wins, else RUN/stage."""
    if explicit:
        return Path(explicit)
    if run:
        return Path(run) / stage
    return None


def stage_output(out: str | None, run: str | None, stage: str, overwrite: bool,
                 kind: type[StagedOutput] | None = None, **kw: Any) -> StagedOutput:
    """The staged output folder of a stage: --out, else RUN/stage; one clear error when neither is given."""
    folder = stage_dir(out, run, stage)
    if folder is None:
        raise ConfigError(f"--out: missing; pass --out DIR or --run DIR (writes DIR/{stage})")
    return (kind or StagedOutput)(folder, overwrite, **kw)


def require_stage(folder: str | Path, expected: str, flag: str) -> Manifest:
    """A finished stage folder of the expected kind, or one clear error naming the command that makes it."""
    p = Path(folder)
    make = command_for(expected)
    if not p.exists():
        raise CheckpointError(f"{flag} {p}: no such folder; expected a finished {expected} stage, made by `{make}`")
    m = read_manifest(p)
    if m is None:
        raise CheckpointError(
            f"{flag} {p}: no {MANIFEST}, so not a finished stage (interrupted?); expected a {expected} stage, "
            f"made by `{make}`")
    if m.stage != expected:
        raise CheckpointError(
            f"{flag} {p}: is {a_stage(m.stage)}, expected {a_stage(expected)}, made by `{make}`")
    return m


def manifest_if_stage(folder: str | Path) -> Manifest | None:
    """The manifest of a local stage folder, None for hub ids and plain model folders."""
    p = Path(folder)
    return read_manifest(p) if p.is_dir() else None


class StagedOutput:
    """Train into `OUT.partial`, move into `OUT` only when complete.

    A finished stage already at OUT is refused unless `overwrite`; it is then replaced only at the very end,
    so a crash in between leaves it intact.
    """

    def __init__(self, out: Path, overwrite: bool, flag: str = "--out"):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{flag} {self.out}: is a file; expected a folder path")
        if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
            m = read_manifest(self.out)
            what = f"a finished {m.stage} stage" if m else "files (not a finished stage)"
            raise ConfigError(
                f"{flag} {self.out}: already holds {what}; pass --overwrite to replace it, or choose another --out")
        self.partial = self.out.with_name(self.out.name + ".partial")

    def __enter__(self) -> Path:
        if launch.is_main():  # under several processes, rank 0 makes the folder while the others wait
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        _barrier()
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return  # keep .partial for inspection; the finished folder (if any) is untouched
        _barrier()  # every rank is done with OUT.partial
        if launch.is_main():
            self._move()
        _barrier()  # no rank returns OUT before it is in place

    def _move(self) -> None:
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.out)


def _barrier() -> None:
    if launch.world_size() > 1:
        from rlhf_cli.core import runtime  # torch: only under several processes

        runtime.barrier()


class ResumableOutput(StagedOutput):
    """StagedOutput whose OUT.partial survives into a --resume run (and is kept when a run stops early)."""

    def __init__(self, out: Path, overwrite: bool, resume: bool = False, flag: str = "--out"):
        super().__init__(out, overwrite, flag)
        self.resume = resume

    def __enter__(self) -> Path:
        if self.resume and self.partial.is_dir():
            return self.partial
        return super().__enter__()
