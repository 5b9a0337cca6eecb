"""Progress reporting, kept apart from the stages so the library knows nothing of the terminal.

Stages call a `Reporter`; the plain one writes lines to stderr, the CLI passes a Rich one (`rlhf_cli.cli.display`).
Both show text through `core.text.safe_text`: messages and samples may quote model output or data, whose terminal
control sequences must not reach the terminal.
"""

from __future__ import annotations

import sys
from typing import Any

from rlhf_cli.core.text import safe_text


class Reporter:
    """Plain-text progress on stderr; subclass to display it differently."""

    def __init__(self, stream: Any = None, every: int = 10):
        self.stream = stream or sys.stderr
        self.every = every

    def info(self, message: str) -> None:
        print(safe_text(message), file=self.stream, flush=True)

    def start(self, total: int) -> None:
        self.total = total

    def update(self, step: int, total: int, figures: dict[str, float], elapsed: float) -> None:
        if step == total or step % self.every == 0:
            shown = "  ".join(f"{k} {fmt(v)}" for k, v in figures.items())
            self.info(f"step {step}/{total}  {shown}  {elapsed:.0f}s")

    def samples(self, title: str, rows: list[dict[str, Any]]) -> None:
        """A few examples (e.g. prompt, response, score) to show while training."""
        self.info(title)
        for r in rows:
            self.info("  " + "  ".join(f"{k}: {fmt(v) if isinstance(v, float) else v!r}" for k, v in r.items()))

    def finish(self) -> None:
        pass

    def plan(self, report: Any) -> None:
        """A `--dry-run` report (`rlhf_cli.core.dry_run.DryRunReport`): kept as `self.planned`, printed on stdout."""
        self.planned = report
        print(f"{report.stage} dry run", flush=True)
        for name, value in report.summary.items():
            print(safe_text(f"  {name}: {value}"))
        print("settings:")
        for name, value, source in report.settings:
            print(safe_text(f"  {name} = {value!r} ({source})"), flush=True)


class Quiet(Reporter):
    def info(self, message: str) -> None:
        pass

    def plan(self, report: Any) -> None:
        self.planned = report

    def update(self, step: int, total: int, figures: dict[str, float], elapsed: float) -> None:
        pass


def fmt(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4g}"
