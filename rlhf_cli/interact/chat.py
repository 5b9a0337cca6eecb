"""`rlhf chat`: talk to any checkpoint, compare several side by side, and record which answer you prefer.

Answers stream as they are generated and are rendered as Markdown once complete (model output is always text,
never Rich markup, and terminal control sequences in it are removed: `core.text.safe_text`; saved files keep the
raw text). Sampling settings not given come from the first model's generation_config.json, else the defaults for
small instruct models (`core.args.SAMPLING_DEFAULTS`); every model samples with the same ones.

With `--compare`, every model answers each turn. All models share one conversation: the user's turns plus, for
each turn, one assistant answer: the first model's, or the one picked with `/prefer N`. So every model always sees
the same history, and a recorded preference row holds exactly the prompt each answer was given. `/prefer N`
appends `{"prompt", "responses", "ranking": [N-1, others]}` (best first; the answers not picked are tied) to
`--save-preferences FILE`: a ranked-list preference file for `rlhf reward`.

`--prompt TEXT` answers once and prints only the answer on stdout; so does text piped on stdin (all of stdin is
one message). `-i` reads turns and /commands line by line from a non-terminal stdin instead (scripts).

    rlhf chat runs/demo/sft
    rlhf chat runs/demo/sft --compare HuggingFaceTB/SmolLM2-135M-Instruct --reward runs/demo/reward \\
        --save-preferences runs/demo/picks.jsonl
    echo "What is a reward model?" | rlhf chat runs/demo/sft
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from rlhf_cli.core import runtime
from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import ConfigError, RLHFError
from rlhf_cli.core.files import append_jsonl
from rlhf_cli.core.generation import LM, Sampling, load_lm, pick_sampling, sampling_differs, sampling_layers
from rlhf_cli.core.models import LoadOptions
from rlhf_cli.core.reward_model import RewardModel, resolve_reward_spec
from rlhf_cli.core.text import SafeStream, safe_text
from rlhf_cli.interact.args import ChatArgs

PROMPT = "you> "
WIDE = 100  # columns from which --compare answers are shown side by side

HELP = """commands:
  /reset                  forget the conversation (keeps the system prompt and settings)
  /system TEXT            set the system prompt (/system alone removes it)
  /set NAME VALUE         temperature, top_p, top_k, max_new_tokens or repetition_penalty (/set alone shows
                          them)
  /save FILE              write the conversation as JSON (model, system, settings, messages)
  /prefer N [M ...]       with --compare: keep answer N (best first; the others tie) and record it
  /help                   this list
  /quit                   leave (or Ctrl-D); Ctrl-C stops the answer being written
  //text                  send a message that starts with /"""


class ChatError(RLHFError):
    """A bad /command inside the chat: shown as one error line, the session goes on."""


@dataclass
class Reply:
    text: str = ""
    quit: bool = False


@dataclass
class Turn:
    """One model's answer to the last user message."""

    model: str
    text: str
    finished: bool  # reached EOS
    tokens: int
    stopped: bool = False  # Ctrl-C
    score: float | None = None
    dropped: int = 0  # oldest messages left out to fit the context


@dataclass
class Round:
    """Every model's answer to one user message, and the prompt they were given."""

    prompt: list[dict[str, str]]
    turns: list[Turn] = field(default_factory=list)
    stopped: bool = False
    recorded: bool = False


def check_args(args: ChatArgs) -> None:
    """Everything that can be checked before a model loads."""
    validate(args)
    if isinstance(args.compare, str):  # `compare: other/model` in a YAML file
        args.compare = [args.compare]
    if args.compare is not None and not all(isinstance(c, str) and c for c in args.compare):
        raise ConfigError(f"--compare {args.compare!r}: expected model names or folders")
    if args.save_preferences and not args.compare:
        raise ConfigError("--save-preferences: needs --compare MODEL_B; a preference needs two or more answers")
    if args.save_preferences and args.prompt is not None:
        raise ConfigError("--save-preferences: needs the interactive chat (/prefer N picks an answer); drop --prompt")
    if args.save_preferences and Path(args.save_preferences).is_dir():
        raise ConfigError(f"--save-preferences {args.save_preferences}: is a folder; expected a .jsonl file path")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt: empty; expected the message to answer")
    if args.prompt is not None and args.interactive:
        raise ConfigError("--prompt answers one message and exits; drop -i (or --prompt)")
    if args.reward:
        resolve_reward_spec(args.reward, None, "--reward")  # a wrong stage fails now, not after loading models


class ChatSession:
    """A conversation with one or more models: history, settings and the slash commands, free of any terminal.

    `ask` sends a user message to every model; `command` runs a /command line and returns the reply to show
    (a `ChatError` for bad input, which leaves the session as it was)."""

    def __init__(self, models: list[LM], sampling: Sampling | None = None, system: str | None = None,
                 scorer: RewardModel | None = None, preferences: str | Path | None = None):
        self.models = models
        self.sampling = sampling or Sampling()
        self.system = system or None
        self.scorer = scorer
        self.preferences = Path(preferences) if preferences else None
        self.messages: list[dict[str, str]] = []
        self.last: Round | None = None

    @classmethod
    def from_args(cls, args: ChatArgs, say: Callable[[str], None] = lambda s: None) -> ChatSession:
        check_args(args)
        runtime.quiet_libraries()
        threads = runtime.configure_threads(args.threads)
        loading = LoadOptions.of(args)
        specs = [args.model] + list(args.compare or [])
        models = [load_lm(s, "MODEL" if i == 0 else "--compare", args.precision, say, loading)
                  for i, s in enumerate(specs)]
        scorer = RewardModel.load(RewardModel.locate(args.reward, None, "--reward", say, loading), args.precision) \
            if args.reward else None
        say(f"loaded {', '.join(specs)}" + (f" and reward model {args.reward}" if scorer else "")
            + f" ({threads} thread{'s' if threads != 1 else ''})")
        sampling, line = pick_sampling(sampling_layers(args, models[0].path), args.max_new_tokens)
        say(line)
        for lm in models[1:]:
            note = sampling_differs(("MODEL", models[0].path), (f"--compare {lm.name}", lm.path),
                                    "so their answers compare fairly")
            if note:
                say(note)
        if args.seed is not None:
            runtime.seed_all(args.seed)
        return cls(models, sampling, args.system, scorer, args.save_preferences)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def conversation(self, user: str | None = None) -> list[dict[str, str]]:
        """What the models read: the system prompt, the shared history, and the new user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.messages + tail

    def ask(self, text: str, on_text: Callable[[int, str], None] = lambda i, s: None,
            on_start: Callable[[int], None] = lambda i: None) -> Round:
        """Every model answers `text`; `on_text(i, piece)` sees model i's answer as it is written.

        Ctrl-C (KeyboardInterrupt) while an answer is written stops it: the partial answer is kept, later models
        do not answer, and the round is marked stopped."""
        rnd = Round(self.conversation(text))
        for i, lm in enumerate(self.models):
            stream = None
            try:
                on_start(i)
                stream = lm.stream(rnd.prompt, self.sampling)
                for piece in stream:
                    on_text(i, piece)
            except KeyboardInterrupt:
                rnd.stopped = True
                if stream is None:  # stopped before this model began: it gives no answer
                    break
                stream.stop()
            except BaseException:
                if stream is not None:
                    stream.stop()
                    stream.finish()
                raise
            rest = stream.finish()
            if rest:
                on_text(i, rest)
            a = stream.answer
            rnd.turns.append(Turn(lm.name, a.text, a.finished, a.tokens, stream.stopped, dropped=stream.dropped))
            if rnd.stopped:
                break
        if not rnd.turns:
            return rnd  # nothing was said: the conversation stays as it was
        if self.scorer is not None and not rnd.stopped:
            for t in rnd.turns:
                t.score = self.scorer.score(rnd.prompt + [{"role": "assistant", "content": t.text}])
        self.messages = rnd.prompt[1 if self.system else 0:] + [{"role": "assistant", "content": rnd.turns[0].text}]
        self.last = rnd
        return rnd

    # ----------------------------------------------------------------------------------------- slash commands

    def command(self, line: str) -> Reply:
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        name = name.lower()
        if name in ("/quit", "/exit", "/q"):
            return Reply(quit=True)
        if name == "/help":
            return Reply(HELP)
        if name == "/reset":
            return Reply(self.reset())
        if name == "/system":
            return Reply(self.set_system(rest))
        if name == "/set":
            parts = rest.split()
            if not parts:
                return Reply(self.describe_settings())
            if len(parts) != 2:
                raise ChatError(f"/set {rest}: expected /set NAME VALUE, for example /set temperature 0.7")
            return Reply(self.set(*parts))
        if name == "/save":
            if not rest:
                raise ChatError("/save: expected a file name, for example /save chat.json")
            return Reply(self.save(rest))
        if name == "/prefer":
            try:
                picks = [int(p) for p in rest.replace(",", " ").split()]
            except ValueError:
                picks = []
            if not picks:
                raise ChatError(f"/prefer {rest}: expected the number of the best answer, for example /prefer 2")
            return Reply(self.prefer(picks))
        return Reply(f"unknown command {name}; /help lists the commands (//text sends a message starting with /)")

    def reset(self) -> str:
        n = len(self.messages)
        self.messages, self.last = [], None
        return f"conversation cleared ({n} messages forgotten)"

    def set_system(self, text: str) -> str:
        self.system = text or None
        return f"system prompt: {text}" if text else "system prompt removed"

    def describe_settings(self) -> str:
        return "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in dataclasses.asdict(self.sampling).items())

    def set(self, name: str, value: str) -> str:
        try:
            self.sampling = self.sampling.with_value(name, value)
        except ConfigError as e:
            raise ChatError(str(e)) from None
        return self.describe_settings()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.names[0]}
        if len(self.models) > 1:
            out["compare"] = self.names[1:]
        out.update(system=self.system, settings=dataclasses.asdict(self.sampling), messages=self.messages)
        return out

    def save(self, path: str | Path) -> str:
        p = Path(path).expanduser()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ChatError(f"/save {path}: cannot write ({e.strerror or e})") from None
        return f"saved {len(self.messages)} messages to {p}"

    def prefer(self, picks: list[int]) -> str:
        """Keep answer picks[0] in the history and append the ranking (picks best first, the rest tied) to
        --save-preferences."""
        n = len(self.models)
        if n < 2:
            raise ChatError("/prefer: needs two or more answers; start the chat with --compare MODEL_B")
        r = self.last
        if r is None:
            raise ChatError("/prefer: no answers yet; send a message first")
        if r.stopped:
            raise ChatError("/prefer: this turn was stopped before every model answered; send a message again")
        if r.recorded:
            raise ChatError("/prefer: already recorded for this turn; send a new message")
        if any(not 1 <= p <= n for p in picks) or len(set(picks)) != len(picks):
            raise ChatError(f"/prefer {' '.join(map(str, picks))}: expected different numbers from 1 to {n}")
        best = r.turns[picks[0] - 1]
        self.messages[-1] = {"role": "assistant", "content": best.text}
        rest = [i for i in range(n) if i + 1 not in picks]
        ranking: list[Any] = [p - 1 for p in picks] + ([rest] if len(rest) > 1 else rest)
        kept = f"kept answer {picks[0]} ({best.model})"
        if self.preferences is None:
            return kept + "; not recorded (start the chat with --save-preferences FILE to record picks)"
        row = {"prompt": r.prompt, "responses": [t.text for t in r.turns], "ranking": ranking,
               "models": self.names}
        try:
            self.preferences.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.preferences, row)
        except OSError as e:
            raise ChatError(f"/prefer: cannot write {self.preferences} ({e.strerror or e})") from None
        r.recorded = True
        return f"{kept}; ranking {json.dumps(ranking)} appended to {self.preferences}"


# ------------------------------------------------------------------------------------------------- terminal


class _Writer:
    """A file for Rich that hands each write to a callable."""

    def __init__(self, write: Callable[[str], Any]):
        self.write = write

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _status(t: Turn) -> str:
    bits = [f"reward {t.score:.3f}"] if t.score is not None else []
    if t.stopped:
        bits.append("stopped")
    elif not t.finished:
        bits.append(f"cut at {t.tokens} tokens (/set max_new_tokens N)")
    if t.dropped:
        bits.append(f"{t.dropped} oldest messages left out to fit the context")
    return " · ".join(bits)


class _Tail:
    """The end of a growing text that fits the screen, for the live view while an answer streams."""

    def __init__(self, title: str | None):
        self.title, self.text = title, ""

    def __rich_console__(self, console: Any, options: Any) -> Any:
        if self.title:  # stays on top while the text scrolls
            yield Text(safe_text(self.title), style="bold", no_wrap=True, overflow="ellipsis")
        lines = console.render_lines(Text(safe_text(self.text)), options.update(height=None), pad=False)
        for line in lines[-max(1, console.height - 3):]:
            yield from line
            yield Segment.line()


class ChatView:
    """Draws a session on a Rich console: streaming answers, Markdown once complete, columns for --compare."""

    def __init__(self, session: ChatSession, console: Any):
        self.session, self.console = session, console

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(Text(safe_text(text), style=style), soft_wrap=True)

    def error(self, text: str) -> None:
        self.console.print(Text.assemble(("error:", "red"), " " + safe_text(text)), soft_wrap=True)

    def ask(self, text: str) -> Round:
        s = self.session
        many = len(s.models) > 1
        tail = _Tail(None)
        live = None
        if self.console.is_terminal:  # elsewhere (pipes, tests) only the finished answer is drawn
            live = Live(tail, console=self.console, transient=True, refresh_per_second=12)
            live.start()

        def start(i: int) -> None:
            tail.title, tail.text = (f"{i + 1} · {s.names[i]}" if many else None), ""

        def add(i: int, piece: str) -> None:
            tail.text += piece

        try:
            rnd = s.ask(text, add, start)
        finally:
            if live is not None:
                live.stop()
        self.show(rnd)
        return rnd

    def _body(self, t: Turn) -> Any:
        # Markdown renders text; it never reads Rich markup, so "[red]" in an answer stays "[red]". Links show
        # their address: a model's [text](url) is not a clickable hyperlink whose target the reader cannot see.
        parts: list[Any] = [Markdown(safe_text(t.text), hyperlinks=False) if t.text
                            else Text("(empty answer)", style="dim")]
        status = _status(t)
        if status:
            parts.append(Text(status, style="dim"))
        return Group(*parts)

    def show(self, rnd: Round) -> None:
        s = self.session
        if not rnd.turns:
            self.say("stopped before any answer")
            return
        if len(s.models) == 1:
            self.console.print(self._body(rnd.turns[0]))
            return
        panels = [Panel(self._body(t), title=Text(safe_text(f"{i + 1} · {t.model}")), title_align="left")
                  for i, t in enumerate(rnd.turns)]
        if self.console.width >= WIDE:
            grid = Table.grid(expand=True, padding=(0, 1))
            for _ in panels:
                grid.add_column(ratio=1)
            grid.add_row(*panels)
            self.console.print(grid)
        else:
            for p in panels:
                self.console.print(p)
        if rnd.stopped:
            self.say("stopped: send the message again to compare all answers")
        elif s.preferences is not None:
            self.say(f"/prefer N keeps answer N and records it in {s.preferences}")
        else:
            self.say("/prefer N keeps answer N in the conversation")


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Any = None, *,
              width: int = WIDE) -> int:
    """The interactive chat: `read(prompt)` returns a line (EOFError ends the chat, KeyboardInterrupt is
    ignored at the prompt), `write` is a Rich Console or a callable taking text (drawn `width` columns wide).
    Returns the exit code."""
    console = write if isinstance(write, Console) else Console(
        file=_Writer(write or (lambda text: sys.stdout.write(text))), width=width, highlight=False,
        color_system=None)
    view = ChatView(session, console)
    names = " | ".join(session.names)
    view.say(f"chatting with {names}; /help lists the commands, Ctrl-C stops an answer, Ctrl-D or /quit leaves")
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            view.say("(Ctrl-D or /quit leaves)")
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("/") and not line.lstrip().startswith("//"):
            try:
                reply = session.command(line)
            except RLHFError as e:
                view.error(str(e))
                continue
            if reply.text:
                view.say(reply.text, style="" if reply.text == HELP else "dim")
            if reply.quit:
                return 0
            continue
        text = line.strip()
        text = text[1:] if text.startswith("//") else text
        try:
            view.ask(text)
        except KeyboardInterrupt:
            console.print()
            view.say("(interrupted)")


def answer_once(session: ChatSession, text: str, write: Callable[[str], Any] | None = None,
                note: Callable[[str], Any] | None = None) -> Round:
    """One message, answered as plain text: only the answer goes to `write` (with --compare, each answer under a
    `## N · model` heading, then one `reward N SCORE` line per answer); a single model's score goes to `note`.
    Terminal control sequences in an answer are removed (`safe_text`), even where one is split across pieces."""
    many = len(session.models) > 1
    write = write or (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    note = note or (lambda line: print(line, file=sys.stderr))
    clean = SafeStream()

    def start(i: int) -> None:
        rest = clean.flush()
        if rest:
            write(rest)
        if many:
            write(("\n\n" if i else "") + safe_text(f"## {i + 1} · {session.names[i]}") + "\n\n")

    def add(i: int, piece: str) -> None:
        shown = clean.feed(piece)
        if shown:
            write(shown)

    rnd = session.ask(text, add, start)
    write(clean.flush() + "\n")
    for i, t in enumerate(rnd.turns):
        if t.score is not None:
            (write if many else note)(f"reward{f' {i + 1}' if many else ''} {t.score:.3f}" + ("\n" if many else ""))
    return rnd
