"""The Typer layer: `app` (plumbing from args dataclasses to flags), `commands` (one body per command),
`display` (Rich output). `rlhf` is `rlhf_cli.cli:main`."""

from rlhf_cli.cli.commands import app, main

__all__ = ["app", "main"]
