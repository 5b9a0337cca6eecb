"""`rlhf label`: people rank the K answers `rlhf generate` wrote per prompt, best first, into a rankings file.

InstructGPT's reward model learnt from labellers ranking K = 4..9 sampled answers per prompt; every ranking gives
K-choose-2 comparisons. This is that labelling step: a terminal UI (default) or a local web page (`--web`,
`rlhf_cli.interact.label_web`) over one `LabelSession`, which knows nothing of either.

The rankings file is an append-only log, one JSON line per event, each fsynced the moment it is made, so a crash,
a closed terminal or a killed server loses nothing, and several annotators can rank into one file:

- a ranking: `{"prompt", "responses", "ranking", "item", "annotator", "time", "source", "model"}`. `responses`
  stay in the samples file's order; `ranking` holds their indices best first, tied answers as an inner list
  (`[2, [0, 1], 3]`): the ranked format `rlhf reward` reads (`rlhf_cli.data.prefs`), ties giving no pair.
  `item` is a hash of the prompt and responses, so resume and agreement match items whatever the line order.
- an undo: `{"retract": ITEM, "annotator", "time"}`, which cancels that annotator's latest ranking of ITEM.
  Undo appends rather than rewrites, because a rewrite would race with another annotator appending
  (`rlhf_cli.data.prefs.live_records` is the one reader of this rule).

Skipping is not recorded: a skipped item comes back in the next session. A restart resumes at the first item in
`--order` that this annotator has not ranked. `--order uncertain --reward RM` scores every answer once with the
RM and shows first the items whose two closest answers score closest (the smallest gap between adjacent answers
in the RM's order): the comparison the RM is least sure of is the one a person's ranking teaches it most.

`rlhf label stats RANKINGS` counts rankings per annotator and the pairwise agreement of every two annotators:
over the items both ranked, the share of answer pairs that both ordered (neither tied) which they ordered the same
way, the measure InstructGPT reports for its labellers (pairs either one tied are counted apart).

    rlhf generate runs/demo/sft --prompts examples/data/prompts.jsonl --out runs/demo/samples.jsonl -k 4
    rlhf label runs/demo/samples.jsonl --out runs/demo/rankings.jsonl
    rlhf label runs/demo/samples.jsonl --out runs/demo/rankings.jsonl --web --annotator ana
    rlhf label stats runs/demo/rankings.jsonl
    rlhf reward --run runs/demo --data runs/demo/rankings.jsonl
"""

from __future__ import annotations

import getpass
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import ConfigError, DataError
from rlhf_cli.core.files import append_jsonl, repair_jsonl_tail
from rlhf_cli.core.text import safe_text
from rlhf_cli.data.io import Record, as_prompt, field_error, json_lines, read_records, require_records
from rlhf_cli.data.prefs import RETRACT, _ranking_order, live_records
from rlhf_cli.interact.args import LabelArgs

Tiers = list[list[int]]  # answer indices best first; the answers in one tier are tied


# ------------------------------------------------------------------------------------------------- items


@dataclass
class Item:
    """One prompt and its K answers to rank."""

    id: str
    prompt: list[dict[str, str]]
    responses: list[str]
    where: str  # samples.jsonl:12
    model: str | None = None
    finished: list[bool] | None = None  # reached EOS, per answer (from `rlhf generate`)

    def shown(self) -> dict[str, Any]:
        """The item for a page to show: its text without terminal control sequences (`safe_text`)."""
        return {"id": self.id, "prompt": [{"role": m["role"], "content": safe_text(m["content"])} for m in self.prompt],
                "responses": [safe_text(r) for r in self.responses], "where": safe_text(self.where),
                "model": self.model, "finished": self.finished}


def item_id(prompt: list[dict[str, str]], responses: list[str]) -> str:
    """Stable over line order and files: the same prompt with the same answers in the same order is one item."""
    key = json.dumps([prompt, responses], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def load_items(spec: str, flag: str = "SAMPLES") -> tuple[list[Item], int]:
    """The items of a samples file in file order, and how many duplicate lines were left out."""
    records = read_records(spec, flag)
    require_records(records, spec, flag)
    items: list[Item] = []
    seen: set[str] = set()
    duplicates = 0
    for rec in records:
        r = rec.row
        if "prompt" not in r or "responses" not in r:
            raise DataError(f"{rec.where}: expected a row written by `rlhf generate` (prompt, responses), found "
                            f"fields {sorted(r)}; make one with `rlhf generate MODEL --prompts P --out FILE -k 4`")
        prompt = as_prompt(rec, "prompt", r["prompt"])
        responses = r["responses"]
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(x, str) for x in responses):
            raise field_error(rec, "responses", responses, "a list of at least 2 answer strings")
        finished = r.get("finished")
        finished = finished if isinstance(finished, list) and len(finished) == len(responses) else None
        i = item_id(prompt, responses)
        if i in seen:
            duplicates += 1
            continue
        seen.add(i)
        model = r.get("model")
        items.append(Item(i, prompt, responses, rec.where, model if isinstance(model, str) else None, finished))
    return items, duplicates


def order_items(items: list[Item], order: str, seed: int = 0,
                gaps: dict[str, float] | None = None) -> list[Item]:
    if order == "random":
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    if order == "uncertain":
        if gaps is None:
            raise ConfigError("--order uncertain: needs --reward RM, the reward model whose scores order the items")
        return sorted(items, key=lambda it: gaps[it.id])  # stable: equal gaps keep file order
    return list(items)


def score_gap(scores: list[float]) -> float:
    """How well the RM separates one item's answers: the smallest gap between two answers adjacent in its order."""
    s = sorted(scores, reverse=True)
    return min(a - b for a, b in zip(s, s[1:], strict=False))


def uncertainty_gaps(items: list[Item], args: LabelArgs, say: Callable[[str], None]) -> dict[str, float]:
    """Every answer scored by --reward, loaded once and run in batches; item id -> `score_gap`."""
    from rlhf_cli.core import runtime
    from rlhf_cli.core.models import LoadOptions
    from rlhf_cli.core.reward_model import RewardModel

    runtime.quiet_libraries()
    runtime.configure_threads(args.threads)
    spec = RewardModel.locate(args.reward, None, "--reward", say, LoadOptions.of(args))
    rm = RewardModel.load(spec, args.precision)
    prompts = [it.prompt for it in items for _ in it.responses]
    answers = [a for it in items for a in it.responses]
    say(f"scoring {len(answers)} answers with {args.reward} to order the items (--order uncertain)")
    scores = rm.score_answers(prompts, answers, args.batch_size)
    gaps, at = {}, 0
    for it in items:
        gaps[it.id] = score_gap(scores[at:at + len(it.responses)])
        at += len(it.responses)
    return gaps


# ------------------------------------------------------------------------------------------------- orders typed


ORDER_HINT = "type the answer numbers best first, such as `3 1 2 4`; tie with `=`, such as `3 1=2 4`"


def parse_ranking(text: str, k: int) -> Tiers:
    """`3 1=2 4` -> [[2], [0, 1], [3]]; numbers from 1, separated by spaces or commas; `=` ties. With K <= 9 the
    numbers may also run together (`3124`). A ValueError says what is wrong in one line."""
    text = re.sub(r"\s*=\s*", "=", text.strip())
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    if len(tokens) == 1 and k <= 9 and re.fullmatch(r"[1-9]{2,}", tokens[0]):
        tokens = list(tokens[0])
    tiers: Tiers = []
    for tok in tokens:
        parts = tok.split("=")
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"{tok!r} is not an answer number; {ORDER_HINT}")
        tiers.append([int(p) - 1 for p in parts])
    check_tiers(tiers, k)
    return tiers


def check_tiers(tiers: Tiers, k: int) -> None:
    """Every answer index 0..k-1 exactly once, in at least two tiers; a ValueError names what is wrong, numbered
    from 1 as the annotator sees the answers."""
    flat = [i for t in tiers for i in t]
    bad = sorted({i + 1 for i in flat if not 0 <= i < k})
    if bad:
        raise ValueError(f"no answer {', '.join(map(str, bad))}: the answers are numbered 1 to {k}")
    twice = sorted({i + 1 for i in flat if flat.count(i) > 1})
    if twice:
        raise ValueError(f"answer {', '.join(map(str, twice))} given twice; each of 1 to {k} once")
    missing = [i + 1 for i in range(k) if i not in flat]
    if missing:
        raise ValueError(f"answer {', '.join(map(str, missing))} missing; rank all {k}: {ORDER_HINT}")
    if len(tiers) == 1:
        raise ValueError("all answers tied: that says nothing; rank them, or `s` to skip")


def ranking_field(tiers: Tiers) -> list[Any]:
    """Tiers as the `ranking` field of the ranked preference format: a tie is an inner list."""
    return [t[0] if len(t) == 1 else sorted(t) for t in tiers]


def describe(tiers: Tiers) -> str:
    return " ".join("=".join(str(i + 1) for i in sorted(t)) for t in tiers)


# ------------------------------------------------------------------------------------------------- rankings file


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_annotator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment (a bare container)
        return "annotator"


def read_rankings(path: Path) -> tuple[list[Record], list[Record], bool]:
    """(every row, the live rows once retractions are applied, whether a last line cut short was left out)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); expected a rankings file written by "
                        f"`rlhf label`") from None
    cut = bool(raw) and not raw.endswith(b"\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a rankings file written "
                        f"by `rlhf label`") from None
    lines = text.splitlines()
    rows = []
    for i, row in json_lines(lines):
        if isinstance(row, json.JSONDecodeError):
            if cut and i == len(lines):  # a write cut short by a crash: no ranking was completed there
                break
            raise DataError(f"{path}:{i}: not valid JSON ({row.msg}); expected one ranking per line as "
                            f"`rlhf label` writes it: fix or delete the line")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, found {type(row).__name__}")
        rows.append(Record(row, f"{path}:{i}"))
    else:
        cut = False
    live, _ = live_records(rows)
    return rows, live, cut


def row_item(rec: Record) -> str:
    """The item a ranking row is about: its `item`, else (a row from `rlhf chat --save-preferences`, or written by
    hand) the hash of its prompt and responses."""
    r = rec.row
    if isinstance(r.get("item"), str):
        return r["item"]
    if "prompt" not in r or not isinstance(r.get("responses"), list):
        raise DataError(f"{rec.where}: expected a ranking (prompt, responses, ranking), found fields {sorted(r)}")
    return item_id(as_prompt(rec, "prompt", r["prompt"]), r["responses"])


@dataclass
class Progress:
    done: int
    total: int
    skipped: int = 0

    def to_json(self) -> dict[str, int]:
        return {"done": self.done, "total": self.total, "skipped": self.skipped}


@dataclass
class LabelSession:
    """One annotator ranking the items of a samples file into a rankings file, free of any UI.

    `current()` is the item to show; `rank`, `skip` and `undo` change the file and the state together."""

    items: list[Item]  # in the order they are shown
    out: Path
    annotator: str
    ranked: list[str] = field(default_factory=list)  # this annotator's live rankings, oldest first (undo pops)
    skipped: set[str] = field(default_factory=set)  # this session only
    first: str | None = None  # an undone item: shown next
    repaired: bool = False  # a last line cut short by a crash was removed from `out`

    @classmethod
    def open(cls, items: list[Item], out: str | Path, annotator: str) -> LabelSession:
        out = Path(out)
        session = cls(items, out, annotator)
        if out.exists():
            session.repaired = repair_jsonl_tail(out)
            _, live, _ = read_rankings(out)
            for rec in live:
                if not any(k in rec.row for k in ("ranking", "scores", "chosen")):
                    # a samples file (or a list of answers without an order) would read as ranked best first
                    raise ConfigError(f"--out {out}: line {rec.where.rsplit(':', 1)[1]} is not a ranking (no "
                                      f"\"ranking\" field; a file from `rlhf generate`?); choose another --out "
                                      f"for the rankings")
                if rec.row.get("annotator") == annotator and RETRACT not in rec.row:
                    i = row_item(rec)
                    if i in session.ranked:  # ranked twice (two sessions at once): the later one counts
                        session.ranked.remove(i)
                    session.ranked.append(i)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
        return session

    def __post_init__(self) -> None:
        self.by_id = {it.id: it for it in self.items}

    def progress(self) -> Progress:
        done = set(self.ranked)
        return Progress(sum(it.id in done for it in self.items), len(self.items),
                        sum(it.id in self.skipped for it in self.items))

    def current(self) -> Item | None:
        done = set(self.ranked)
        if self.first is not None and self.first not in done:
            return self.by_id[self.first]
        return next((it for it in self.items if it.id not in done and it.id not in self.skipped), None)

    def rank(self, item: Item, tiers: Tiers) -> dict[str, Any]:
        """Append the ranking; on disk when this returns."""
        if item.id in self.ranked:
            raise ValueError(f"{item.where} is already ranked by {self.annotator}; undo it first")
        row: dict[str, Any] = {"prompt": item.prompt, "responses": item.responses, "ranking": ranking_field(tiers),
                               "item": item.id, "annotator": self.annotator, "time": now(), "source": item.where}
        if item.model is not None:
            row["model"] = item.model
        append_jsonl(self.out, row)
        self.ranked.append(item.id)
        self.skipped.discard(item.id)
        if self.first == item.id:
            self.first = None
        return row

    def skip(self, item: Item) -> None:
        self.skipped.add(item.id)
        if self.first == item.id:
            self.first = None

    def undo(self) -> Item | None:
        """Retract this annotator's last ranking (appended, fsynced); that item is shown next. None: nothing to
        undo."""
        if not self.ranked:
            return None
        last = self.ranked.pop()
        append_jsonl(self.out, {RETRACT: last, "annotator": self.annotator, "time": now()})
        self.skipped.discard(last)
        if last not in self.by_id:  # ranked from another samples file: retracted, but not shown here
            return None
        self.first = last
        return self.by_id[last]


def check_args(args: LabelArgs) -> None:
    validate(args)
    if args.samples is None:
        raise ConfigError("SAMPLES: missing; expected the file `rlhf generate ... --out FILE -k 4` wrote")
    if args.out is None:
        raise ConfigError("--out: missing; expected the rankings .jsonl file to write (an existing one is resumed)")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; expected a .jsonl file path")
    if Path(args.out).resolve() == Path(args.samples).resolve():
        raise ConfigError(f"--out {args.out}: is the samples file itself; expected another file for the rankings")
    if args.annotator is not None and (not args.annotator.strip() or safe_text(args.annotator) != args.annotator):
        raise ConfigError(f"--annotator {args.annotator!r}: expected a name without control characters")
    if args.order == "uncertain" and not args.reward:
        raise ConfigError("--order uncertain: needs --reward RM, the reward model whose scores order the items")
    if args.reward and args.order != "uncertain":
        raise ConfigError(f"--reward: only used with --order uncertain (--order is {args.order})")
    if args.reward:
        from rlhf_cli.core.reward_model import resolve_reward_spec

        resolve_reward_spec(args.reward, None, "--reward")


def open_session(args: LabelArgs, say: Callable[[str], None] = lambda s: None) -> LabelSession:
    """Everything both UIs need: checked flags, the items in --order, the rankings file resumed."""
    check_args(args)
    items, duplicates = load_items(args.samples)
    say(f"{args.samples}: {len(items)} items of {', '.join(sorted({str(len(i.responses)) for i in items}))} "
        f"answers" + (f" ({duplicates} duplicate lines left out)" if duplicates else ""))
    gaps = uncertainty_gaps(items, args, say) if args.order == "uncertain" else None
    session = LabelSession.open(order_items(items, args.order, args.seed, gaps), args.out,
                                args.annotator or default_annotator())
    if session.repaired:
        say(f"{args.out}: the last line was cut off (interrupted while writing) and was removed; no ranking was "
            f"complete there")
    p = session.progress()
    if p.done:
        say(f"{args.out}: {p.done} of {p.total} items already ranked by {session.annotator}; resuming")
    return session


# ------------------------------------------------------------------------------------------------- terminal


TERMINAL_HELP = f"{ORDER_HINT}; s skip, u undo the last ranking, q quit"


def show_item(console: Console, item: Item, progress: Progress, annotator: str) -> None:
    """The prompt and the numbered answers, rendered as Markdown; their text is never read as Rich markup."""
    console.rule(Text(f"{progress.done}/{progress.total} ranked by {annotator} · {item.where}"), style="dim")
    for m in item.prompt:
        console.print(Panel(Markdown(safe_text(m["content"]), hyperlinks=False), title=Text(m["role"]),
                            title_align="left", border_style="cyan" if m["role"] == "user" else "dim"))
    for n, text in enumerate(item.responses, 1):
        cut = item.finished is not None and not item.finished[n - 1]
        title = Text(f"answer {n}" + (" (cut off at the token limit)" if cut else ""), style="bold")
        body: Any = Markdown(safe_text(text), hyperlinks=False) if text.strip() else Text("(empty)", style="dim")
        console.print(Panel(Group(body), title=title, title_align="left", border_style="green"))


def label_terminal(session: LabelSession, read: Callable[[str], str], console: Console) -> Progress:
    """Show each item and read a ranking for it until every item is ranked or skipped, `q`, or end of input."""
    item = session.current()
    shown: str | None = None
    while item is not None:
        if item.id != shown:
            show_item(console, item, session.progress(), session.annotator)
            shown = item.id
        try:
            line = read(f"rank 1-{len(item.responses)} best first (s skip, u undo, q quit, ? help)> ").strip()
        except EOFError:
            break
        cmd = line.lower()
        if cmd in ("q", "quit"):
            break
        if cmd in ("?", "h", "help"):
            console.print(Text(TERMINAL_HELP))
            continue
        if cmd in ("s", "skip"):
            session.skip(item)
        elif cmd in ("u", "undo"):
            if not session.ranked:
                console.print(Text("nothing to undo", style="yellow"))
                continue
            back = session.undo()
            console.print(Text(f"undone: {back.where if back else 'a ranking of another samples file'}; rank it "
                               f"again", style="yellow"))
            shown = None
        else:
            try:
                tiers = parse_ranking(line, len(item.responses))
            except ValueError as e:
                console.print(Text(f"{e}; s skip, u undo, q quit", style="red"))
                continue
            session.rank(item, tiers)
            console.print(Text(f"saved: {describe(tiers)}", style="green"))
        item = session.current()
    return session.progress()


# ------------------------------------------------------------------------------------------------- stats


def _relation(rank: dict[int, int], i: int, j: int) -> int:
    return (rank[i] < rank[j]) - (rank[i] > rank[j])  # 1: i before j, -1: j before i, 0: tied


def label_stats(path: str | Path) -> dict[str, Any]:
    """Rankings and undos per annotator, and the agreement of every two annotators on the items both ranked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"RANKINGS {path}: no such file; expected a rankings file written by "
                        f"`rlhf label SAMPLES --out {path}`")
    rows, live, cut = read_rankings(path)
    per: dict[str, dict[str, Any]] = {}
    latest: dict[str, dict[str, tuple[Tiers, int]]] = {}  # annotator -> item -> (tiers, K)
    for rec in rows:
        if RETRACT in rec.row:
            name = str(rec.row.get("annotator") or "(unnamed)")
            per.setdefault(name, {"rankings": 0, "undos": 0, "ties": 0})["undos"] += 1
    for rec in live:
        if RETRACT in rec.row:
            continue
        name = str(rec.row.get("annotator") or "(unnamed)")
        item = row_item(rec)
        k = len(rec.row["responses"])
        tiers = _ranking_order(rec, rec.row, k)
        latest.setdefault(name, {})[item] = (tiers, k)
        stat = per.setdefault(name, {"rankings": 0, "undos": 0, "ties": 0})
        stat["rankings"] += 1
        stat["ties"] += any(len(t) > 1 for t in tiers)
    for name, stat in per.items():
        stat["items"] = len(latest.get(name, {}))
    pairs = []
    total = {"items": 0, "pairs": 0, "agree": 0, "tied_pairs": 0}
    for a, b in combinations(sorted(latest), 2):
        shared = sorted(set(latest[a]) & set(latest[b]))
        res = {"a": a, "b": b, "items": len(shared), "pairs": 0, "agree": 0, "tied_pairs": 0}
        for item in shared:
            (ta, k), (tb, _) = latest[a][item], latest[b][item]
            ra = {i: n for n, t in enumerate(ta) for i in t}
            rb = {i: n for n, t in enumerate(tb) for i in t}
            for i, j in combinations(range(k), 2):
                x, y = _relation(ra, i, j), _relation(rb, i, j)
                if x == 0 or y == 0:
                    res["tied_pairs"] += 1
                else:
                    res["pairs"] += 1
                    res["agree"] += x == y
        res["agreement"] = res["agree"] / res["pairs"] if res["pairs"] else None
        for key in total:
            total[key] += res[key]
        pairs.append(res)
    return {"file": str(path), "rows": len(rows), "cut_off_last_line": cut,
            "annotators": dict(sorted(per.items())), "agreement": pairs,
            "overall_agreement": total["agree"] / total["pairs"] if total["pairs"] else None,
            "compared_pairs": total["pairs"]}
