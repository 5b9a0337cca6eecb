"""Typer plumbing: each command's flags come from its args dataclass.

A field's help text is the flag's help, flags default to "not given" so they never override `--config FILE.yaml`,
and errors print one `error: ...` line (`--debug` for the traceback). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from rlhf_cli.cli.display import err, out, shown
from rlhf_cli.core import launch
from rlhf_cli.core.config import fields_of, resolve
from rlhf_cli.core.errors import RLHFError
from rlhf_cli.core.interrupt import Interrupted


def fail(e: BaseException, debug: bool) -> None:
    """One `error: ...` line and the exit code of the error's kind; the traceback only with --debug. Under
    several processes the other ranks' consoles are quiet (rank 0 speaks), except for an error of their own."""
    if err.quiet and not isinstance(e, (Interrupted, KeyboardInterrupt)):
        err.quiet = False
        err.print(f"rank {launch.rank()}: ", end="", highlight=False)
    if debug:
        raise e
    if isinstance(e, Interrupted):
        err.print(f"[yellow]stopped:[/] {esc(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    if isinstance(e, RLHFError):
        err.print(f"[red]error:[/] {esc(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        err.print("[red]interrupted[/]: finished stages are untouched; partial output is in OUT.partial",
                  highlight=False)
        raise typer.Exit(130)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    err.print(f"[red]error:[/] unexpected {type(e).__name__}: {esc(first)} (rerun with --debug for the "
              f"traceback)", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def esc(s: str) -> str:
    """Text for a Rich markup string: markup escaped, terminal control sequences removed (it may quote data)."""
    return shown(s)


_METAVARS = {"model": "MODEL", "policy": "MODEL", "reward": "RM", "baseline": "MODEL", "compare": "MODEL",
             "data": "DATA", "eval_data": "DATA", "prompts": "DATA", "out": "DIR", "run": "DIR"}


def metavar(name: str, tp: type) -> str:
    """What a flag takes, for --help: DATA, DIR, MODEL, or the value's type."""
    return _METAVARS.get(name) or {int: "INT", float: "FLOAT"}.get(tp, "TEXT")


def args_command(parent: typer.Typer, name: str, args_cls: type, body: Callable[[Any, bool], None],
                 help: str, extra: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Register `name` with one flag per field of `args_cls` (plus --config, --debug and `extra` options)."""
    params = []
    for f, tp in fields_of(args_cls):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
        if meta.get("short"):
            decls.append(meta["short"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = meta.get("help", "")
        if meta.get("choices"):
            text += f" One of: {', '.join(meta['choices'])}."
        if default is not None and default != "":
            text += f" [default: {str(default).lower() if isinstance(default, bool) else default}]"
        opt = typer.Option(None, *decls, help=text, show_default=False, hidden=meta.get("hidden", False),
                           metavar=None if tp is bool else meta.get("metavar") or metavar(f.name, tp))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=Optional[tp]))  # noqa: UP045 (Typer needs Optional here)
    for key, (annotation, option) in (extra or {}).items():
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                                    default=typer.Option(None, "--config", help="YAML file of settings; "
                                                         "flags override it, unknown keys are errors.")))
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--debug", help="Show tracebacks.")))
    names = {f.name for f, _ in fields_of(args_cls)}

    def command(**kw: Any) -> None:
        debug = kw.pop("debug")
        try:
            args = resolve(args_cls, kw.pop("config"), {k: v for k, v in kw.items() if k in names})
            if launch.wants_launch(args):  # --num-processes / --accelerate-config: run again under accelerate
                launch.relaunch(args, say=lambda s: err.print(esc(s), highlight=False, soft_wrap=True))
            body(args, **{k: v for k, v in kw.items() if k not in names})
        except typer.Exit:
            raise
        except (KeyboardInterrupt, Exception) as e:  # RLHFError included: fail() words each kind
            fail(e, debug)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    parent.command(name, help=help)(command)


def next_command(cmd: str) -> None:
    """The command a user runs next, on stdout."""
    out.print(f"next: [bold]{esc(cmd)}[/]", highlight=False, soft_wrap=True)


def positional_command(parent: typer.Typer, name: str, args_cls: type, body: Callable[..., None], help: str,
                       positional: str, extra: dict[str, tuple[Any, Any]] | None = None) -> None:
    """`args_command`, with the field `positional` taken as an optional positional argument instead of a flag."""
    scratch = typer.Typer()
    args_command(scratch, name, args_cls, body, help, extra)
    info = scratch.registered_commands[0]
    f = next(f for f, _ in fields_of(args_cls) if f.name == positional)
    arg = typer.Argument(None, metavar=positional.upper(), show_default=False,
                         help=f"{f.metadata.get('help', '')} [default: {f.default}]")
    sig = inspect.signature(info.callback)
    info.callback.__signature__ = sig.replace(parameters=[p.replace(default=arg) if p.name == positional else p
                                                          for p in sig.parameters.values()])
    parent.registered_commands.append(info)
