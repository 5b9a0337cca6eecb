"""Rich terminal output for the CLI: a live progress display on stderr, result tables on stdout.

Text that may come from a model or a data file is shown through `shown()`: terminal control sequences removed
(`core.text.safe_text`) and Rich markup escaped, so it prints as the characters it holds."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rlhf_cli.core import launch
from rlhf_cli.core.progress import Reporter, fmt
from rlhf_cli.core.text import safe_text

# emoji=False: Rich would turn ":train:" in `--data org/name:train: ...` or a model's text into an emoji
# Under several processes (`--num-processes`) only rank 0 shows progress and results.
_quiet = not launch.is_main()
err = Console(stderr=True, emoji=False, quiet=_quiet)
out = Console(emoji=False, quiet=_quiet)

SHOWN = ("loss", "accuracy", "margin", "learning_rate", "tokens/s")


def shown(text: str) -> str:
    """`text` ready for a Rich markup string: no control sequences, markup escaped."""
    return escape(safe_text(text))


PLAIN_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (logs, CI, nohup)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RichReporter(Reporter):
    """One live display per run: step/total, the stage's live figures, elapsed time and ETA. When stderr is not
    a terminal (a log file, CI, nohup) a live display would show nothing until the end, so it writes one plain
    line instead at most every PLAIN_EVERY seconds, and at the first and last step."""

    def __init__(self, title: str, shown: tuple[str, ...] | None = SHOWN):
        """`shown`: the figure names to display (None: every figure the stage reports)."""
        self.title = title
        self.shown = shown
        self.progress: Progress | None = None
        self.task: Any = None
        self.plain = False
        self.last_line = 0.0

    def info(self, message: str) -> None:
        (self.progress.console if self.progress else err).print(shown(message), highlight=False, soft_wrap=True)

    def start(self, total: int) -> None:
        self.t0 = time.time()
        self.plain = not err.is_terminal
        if self.plain:
            self.last_line = 0.0
            return
        self.progress = Progress(
            TextColumn(f"[bold]{shown(self.title)}[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=err, transient=False, refresh_per_second=4)
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=total or None, figures="")
        self.t0 = time.time()

    def update(self, step: int, total: int, figures: dict[str, float], elapsed: float) -> None:
        if self.progress is None and not self.plain:
            self.start(total)
        line = "  ".join(f"{'lr' if k == 'learning_rate' else k} {fmt(v)}" for k, v in figures.items()
                         if self.shown is None or k in self.shown)
        if self.plain:
            now = time.time()
            if step in (1, total) or now - self.last_line >= PLAIN_EVERY:
                self.last_line = now
                eta = f"  eta {_clock(elapsed / step * (total - step))}" if total and step else ""
                err.print(shown(f"{self.title} {step}/{total or '?'}  {line}  elapsed {_clock(elapsed)}{eta}"),
                          highlight=False, soft_wrap=True)
            return
        self.progress.update(self.task, completed=step, total=total or None, figures=shown(line))

    def samples(self, title: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        t = Table(title=title, title_justify="left", show_lines=True, expand=True)
        for k in rows[0]:
            t.add_column(k, ratio=None if k == "score" else 1, justify="right" if k == "score" else "left")
        for r in rows:
            t.add_row(*(shown(fmt(v) if isinstance(v, float) else str(v)) for v in r.values()))
        (self.progress.console if self.progress else err).print(t)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def plan(self, report: Any) -> None:
        """A `--dry-run` report as two tables on stdout (the plan, then every setting with its source), then the
        command ends with exit 0: nothing after the dry-run point of the stage runs."""
        import typer

        self.planned = report
        out.print(table(f"{report.stage} dry run: the plan (no weights loaded, nothing written)", report.summary))
        t = Table(title=f"{report.stage} settings (defaults < --config < flags)", title_justify="left")
        for col in ("setting", "value", "from"):
            t.add_column(col, overflow="fold")
        for name, value, source in report.settings:
            style = "dim" if source == "default" else None
            t.add_row(shown(name), shown(repr(value) if isinstance(value, str) else str(value)), shown(source),
                      style=style)
        out.print(t)
        raise typer.Exit(0)


def table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        if v is None:
            continue
        t.add_row(shown(str(k)), shown(fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                       else str(v)))
    return t
