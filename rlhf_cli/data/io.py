"""Reading, checking and normalising data for every stage.

Everything is validated before any model loads. Each format is turned into one internal shape:

- SFT demonstrations -> `{"messages": [{"role", "content"}, ...]}` ending with an assistant turn.
- Preferences -> `{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg], "group": id,
  "margin": float}`; a ranked list of K answers becomes its K-choose-2 pairs, all with the prompt's group id.
- Prompts -> `{"prompt": [msgs]}` ending with a user turn.

Sources: local .jsonl/.json/.csv/.parquet files, folders of them, and hub dataset names (`name`,
`name:split`, `name:config:split`). An error names the file and line (or row), the field, what was found and
what was expected.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from rlhf_cli.core.errors import DataError

SFT_FORMATS = ("auto", "messages", "prompt-completion", "alpaca", "prompt-response", "transcript")
PREF_FORMATS = ("auto", "explicit", "implicit", "ranked")
PROMPT_FORMATS = ("auto", "prompt", "messages", "text", "instruction")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    row: dict[str, Any]
    where: str  # "file.jsonl:12" or "dataset[3]"


@dataclass
class DataSet:
    """Normalised rows plus the summary a user sees: rows read, kept, dropped (with reasons)."""

    rows: list[dict[str, Any]]
    source: str
    format: str
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    prompts: int = 0  # preference data: distinct prompts the pairs came from
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.rows:
            h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        out = {"source": self.source, "format": self.format, "rows_read": self.read, "kept": self.kept,
               "dropped": dict(self.dropped), "fingerprint": self.fingerprint()}
        if self.prompts:
            out["prompts"] = self.prompts
        return out

    def describe(self) -> str:
        unit = "pairs" if self.prompts else "rows"
        s = f"{self.source}: {self.format} format, {self.read} rows read, {self.kept} {unit} kept"
        if self.prompts:
            s += f" (from {self.prompts} prompts)"
        if self.dropped:
            s += ", dropped: " + ", ".join(f"{n} {why}" for why, n in self.dropped.most_common())
        return s


# ---------------------------------------------------------------------------------------------------------
# Reading


def _is_hub_name(spec: str) -> bool:
    return not Path(spec.split(":")[0]).exists() and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+){0,2}", spec))


def read_records(spec: str, flag: str = "--data") -> list[Record]:
    """All rows of a file, a folder of files, or a hub dataset, each with its location."""
    p = Path(spec).expanduser()
    if p.is_file():
        return _read_file(p, flag)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in FILE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{flag} {spec}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        return [r for f in files for r in _read_file(f, flag)]
    if p.suffix in FILE_SUFFIXES or "/" in spec and spec.startswith((".", "/", "~")):
        raise DataError(f"{flag} {spec}: no such file; expected a .jsonl, .json, .csv or .parquet file, "
                        f"a folder of them, or a hub dataset name")
    if _is_hub_name(spec):
        return _read_hub(spec, flag)
    raise DataError(f"{flag} {spec}: not a file, folder or hub dataset name (name, name:split, name:config:split)")


def _read_file(p: Path, flag: str) -> list[Record]:
    if p.suffix == ".jsonl":
        out = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON "
                                    f"object per line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{i}: expected a JSON object, found {type(row).__name__}")
                out.append(Record(row, f"{p}:{i}"))
        return out
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); expected a list of objects, or a .jsonl "
                            f"file with one object per line") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: a single list value
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{p}: expected a JSON list of objects, found an object")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects, found {type(data).__name__}")
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{p}: item {i}: expected a JSON object, found {type(row).__name__}")
            out.append(Record(row, f"{p} item {i}"))
        return out
    from datasets import load_dataset

    kind = {".csv": "csv", ".parquet": "parquet"}[p.suffix]
    try:
        ds = load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:
        raise DataError(f"{p}: cannot read as {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    # csv: row i is on line i+2 (header first) unless fields hold newlines
    where = (lambda i: f"{p}:{i + 2}") if kind == "csv" else (lambda i: f"{p} row {i}")
    return [Record(_decode_json_cells(dict(r)), where(i)) for i, r in enumerate(ds)]


def _decode_json_cells(row: dict) -> dict:
    """CSV cells holding JSON lists (messages, responses) are decoded; plain text stays text."""
    for k, v in row.items():
        if isinstance(v, str) and v[:1] in "[{" and v[-1:] in "]}":
            try:
                row[k] = json.loads(v)
            except json.JSONDecodeError:
                pass
    return row


def _read_hub(spec: str, flag: str) -> list[Record]:
    from datasets import load_dataset

    parts = spec.split(":")
    name, config, split = parts[0], None, "train"
    if len(parts) == 2:
        split = parts[1]
    elif len(parts) == 3:
        config, split = parts[1], parts[2]
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"{flag} {spec}: cannot load hub dataset {name!r} (config {config}, split {split}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return [Record(dict(r), f"{spec}[{i}]") for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------------------------------------
# Shared checks


def _fail(rec: Record, field_: str, found: Any, expected: str) -> DataError:
    shown = json.dumps(found, ensure_ascii=False)[:80] if not isinstance(found, str) else repr(found[:80])
    return DataError(f"{rec.where}: field {field_!r}: found {shown}; expected {expected}")


def _messages(rec: Record, field_: str, value: Any) -> list[dict[str, str]]:
    """A list of {"role", "content"} with known roles and string content."""
    if not isinstance(value, list) or not value:
        raise _fail(rec, field_, value, "a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _fail(rec, f"{field_}[{j}]", m, "a {\"role\", \"content\"} object")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if role not in ROLES:
            raise _fail(rec, f"{field_}[{j}].role", role, "one of system, user, assistant")
        if not isinstance(content, str):
            raise _fail(rec, f"{field_}[{j}].content", content, "a string")
        out.append({"role": role, "content": content})
    return out


def _text(rec: Record, field_: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(rec, field_, value, "a string")
    return value


_TURN = re.compile(r"\n\n(Human|Assistant|H|A):[ \t]?")


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into messages; None if the text is not such a transcript."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    msgs = []
    for who, content in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if who in ("Human", "H") else "assistant"
        msgs.append({"role": role, "content": content.strip()})
    return msgs


def _is_transcript(v: Any) -> bool:
    return isinstance(v, str) and bool(re.search(r"(^|\n\n)Human:", v)) and "Assistant:" in v


def _empty(msgs: list[dict[str, str]]) -> bool:
    return any(not m["content"].strip() for m in msgs)


# ---------------------------------------------------------------------------------------------------------
# SFT


def detect_sft_format(row: dict) -> str | None:
    if "messages" in row or "conversations" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "response" in row:
        return "prompt-response"
    if any(_is_transcript(row.get(k)) for k in ("text", "transcript", "chosen")):
        return "transcript"
    return None


_SFT_EXPECTED = ("expected one of: messages; prompt+completion; instruction(+input)+output (Alpaca); "
                 "prompt+response; text holding a \\n\\nHuman: ... \\n\\nAssistant: ... transcript")


def _sft_row(rec: Record, fmt: str) -> list[dict[str, str]]:
    r = rec.row
    if fmt == "messages":
        key = "messages" if "messages" in r else "conversations"
        if key not in r:
            raise _fail(rec, "messages", None, "a list of messages (format messages)")
        return _messages(rec, key, r[key])
    if fmt in ("prompt-completion", "prompt-response"):
        pk, ck = "prompt", "completion" if fmt == "prompt-completion" else "response"
        for k in (pk, ck):
            if k not in r:
                raise _fail(rec, k, None, f"a string or message list (format {fmt})")
        prompt = r[pk] if isinstance(r[pk], list) else [{"role": "user", "content": _text(rec, pk, r[pk])}]
        answer = r[ck] if isinstance(r[ck], list) else [{"role": "assistant", "content": _text(rec, ck, r[ck])}]
        return _messages(rec, pk, prompt) + _messages(rec, ck, answer)
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if k not in r:
                raise _fail(rec, k, None, "a string (Alpaca format: instruction, optional input, output)")
        instr = _text(rec, "instruction", r["instruction"])
        inp = r.get("input") or ""
        inp = _text(rec, "input", inp)
        user = instr + ("\n\n" + inp if inp.strip() else "")
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(rec, "output", r["output"])}]
    if fmt == "transcript":
        key = next((k for k in ("text", "transcript", "chosen") if k in r), "text")
        msgs = parse_transcript(_text(rec, key, r.get(key)))
        if msgs is None:
            raise _fail(rec, key, r.get(key), "a transcript of \\n\\nHuman: ... \\n\\nAssistant: ... turns")
        return msgs
    raise DataError(f"--format {fmt}: unknown SFT format; expected one of {', '.join(SFT_FORMATS)}")


def load_sft(spec: str, fmt: str = "auto", max_samples: int | None = None, flag: str = "--data") -> DataSet:
    records = read_records(spec, flag)
    if not records:
        raise DataError(f"{flag} {spec}: no rows")
    fmt = _pick_format(records[0], fmt, detect_sft_format, _SFT_EXPECTED, flag, spec)
    ds = DataSet([], spec, fmt, read=len(records))
    for rec in records:
        msgs = _sft_row(rec, fmt)
        if not any(m["role"] == "assistant" for m in msgs):
            ds.dropped["without an assistant turn"] += 1
            continue
        if any(not m["content"].strip() for m in msgs if m["role"] == "assistant"):
            ds.dropped["with an empty answer"] += 1
            continue
        while msgs[-1]["role"] != "assistant":  # trailing user turns teach nothing
            msgs = msgs[:-1]
        ds.rows.append({"messages": msgs})
        if max_samples and len(ds.rows) >= max_samples:
            break
    _require_rows(ds, flag)
    return ds


def _pick_format(first: Record, fmt: str, detect, expected: str, flag: str, spec: str) -> str:
    if fmt != "auto":
        return fmt
    found = detect(first.row)
    if found is None:
        raise DataError(f"{first.where}: cannot tell the data format from fields {sorted(first.row)}; "
                        f"{expected}; or force one with --format")
    return found


def _require_rows(ds: DataSet, flag: str) -> None:
    if not ds.rows:
        raise DataError(f"{flag} {ds.source}: no usable rows left ({ds.describe()}); check the file's contents")


# ---------------------------------------------------------------------------------------------------------
# Preferences


def detect_pref_format(row: dict) -> str | None:
    if "responses" in row or "completions" in row:
        return "ranked"
    if "chosen" in row and "rejected" in row:
        return "explicit" if "prompt" in row else "implicit"
    return None


_PREF_EXPECTED = ("expected one of: prompt+chosen+rejected; chosen+rejected as whole dialogues or transcripts; "
                  "prompt+responses (best first, or with ranking or scores)")


def _as_prompt(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if _is_transcript(value):
            msgs = parse_transcript(value)
            if msgs:
                if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
                    msgs = msgs[:-1]  # "...\n\nAssistant:" ends an HH prompt
                return msgs
        return [{"role": "user", "content": value}]
    msgs = _messages(rec, key, value)
    return msgs


def _as_answer(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    msgs = _messages(rec, key, value)
    if msgs[-1]["role"] != "assistant":
        raise _fail(rec, key, value, "an answer: a string or assistant message(s)")
    return msgs


def _split_dialogues(rec: Record, chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """Implicit prompt: the shared beginning of two whole dialogues is the prompt."""
    def conv(key, v):
        if isinstance(v, str):
            msgs = parse_transcript(v) if _is_transcript(v) else None
            if msgs is None:
                raise _fail(rec, key, v, "a whole dialogue: a message list or a \\n\\nHuman: ... transcript")
            return msgs
        return _messages(rec, key, v)

    c, r = conv("chosen", chosen), conv("rejected", rejected)
    n = 0
    while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
        n += 1
    prompt, ca, ra = c[:n], c[n:], r[n:]
    if not prompt or prompt[-1]["role"] == "assistant" or not ca or not ra:
        raise _fail(rec, "chosen", chosen, "two dialogues that share their opening turns and differ in the "
                                           "assistant's last answer")
    return prompt, ca, ra


def _ranking_order(rec: Record, row: dict, n: int) -> list[list[int]]:
    """Tiers of response indices, best first; answers in one tier are tied."""
    if "scores" in row:
        scores = row["scores"]
        if not isinstance(scores, list) or len(scores) != n or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise _fail(rec, "scores", scores, f"a list of {n} numbers, one per response (higher is better)")
        tiers: dict[float, list[int]] = {}
        for i, s in enumerate(scores):
            tiers.setdefault(float(s), []).append(i)
        return [tiers[s] for s in sorted(tiers, reverse=True)]
    if "ranking" in row:
        ranking = row["ranking"]
        tiers_ = [t if isinstance(t, list) else [t] for t in ranking] if isinstance(ranking, list) else None
        flat = [i for t in tiers_ or [] for i in t]
        if tiers_ is None or sorted(flat) != list(range(n)) or not all(isinstance(i, int) for i in flat):
            raise _fail(rec, "ranking", ranking,
                        f"the indices 0..{n - 1} of responses, best first, each once ([2, 0, 1]; "
                        f"ties as an inner list: [2, [0, 1]])")
        return tiers_
    return [[i] for i in range(n)]


def _ranked_pairs(rec: Record, margin_from_scores: bool) -> tuple[list[dict], int]:
    r = rec.row
    key = "completions" if "completions" in r and "responses" not in r else "responses"
    if "prompt" not in r:
        raise _fail(rec, "prompt", None, "the prompt (string or message list) the responses answer")
    prompt = _as_prompt(rec, "prompt", r["prompt"])
    responses = r.get(key)  # a later row of a ranked file may lack it: an error naming the field, not a KeyError
    if not isinstance(responses, list) or len(responses) < 2:
        raise _fail(rec, key, responses, "a list of at least 2 responses, best first")
    answers = [_as_answer(rec, f"{key}[{i}]", v) for i, v in enumerate(responses)]
    tiers = _ranking_order(rec, r, len(answers))
    rank = {i: t for t, tier in enumerate(tiers) for i in tier}
    scores = r.get("scores")
    pairs, ties = [], 0
    for i, j in combinations(range(len(answers)), 2):
        if rank[i] == rank[j]:
            ties += 1
            continue
        a, b = (i, j) if rank[i] < rank[j] else (j, i)
        m = float(scores[a]) - float(scores[b]) if (margin_from_scores and scores) else 0.0
        pairs.append({"prompt": prompt, "chosen": answers[a], "rejected": answers[b], "margin": m})
    return pairs, ties


def load_prefs(spec: str, fmt: str = "auto", max_samples: int | None = None, flag: str = "--data",
               use_margin: bool = False) -> DataSet:
    """Pairs from any preference format; `max_samples` counts source rows (prompts), not pairs."""
    records = read_records(spec, flag)
    if not records:
        raise DataError(f"{flag} {spec}: no rows")
    fmt = _pick_format(records[0], fmt, detect_pref_format, _PREF_EXPECTED, flag, spec)
    if fmt not in PREF_FORMATS[1:]:  # else an unknown name would silently be read as implicit dialogues
        raise DataError(f"--format {fmt}: unknown preference format; expected one of {', '.join(PREF_FORMATS)}")
    ds = DataSet([], spec, fmt, read=len(records))
    groups: dict[str, int] = {}
    used = 0
    for rec in records:
        r = rec.row
        if fmt == "ranked":
            pairs, ties = _ranked_pairs(rec, use_margin)
            if ties:
                ds.dropped["tied pairs skipped"] += ties
        else:
            for k in ("chosen", "rejected"):
                if k not in r:
                    raise _fail(rec, k, None, "an answer (string or messages)" if fmt == "explicit"
                                else "a whole dialogue (messages or transcript)")
            if fmt == "explicit":
                if "prompt" not in r:
                    raise _fail(rec, "prompt", None, "the prompt (string or message list)")
                prompt = _as_prompt(rec, "prompt", r["prompt"])
                c, rj = _as_answer(rec, "chosen", r["chosen"]), _as_answer(rec, "rejected", r["rejected"])
            else:
                prompt, c, rj = _split_dialogues(rec, r["chosen"], r["rejected"])
            m = r.get("margin", 0.0)
            if not isinstance(m, (int, float)) or isinstance(m, bool):
                raise _fail(rec, "margin", m, "a number")
            pairs = [{"prompt": prompt, "chosen": c, "rejected": rj, "margin": float(m) if use_margin else 0.0}]
        kept = []
        for p in pairs:
            if _empty(p["chosen"]) or _empty(p["rejected"]):
                ds.dropped["pairs with an empty answer"] += 1
            elif p["chosen"] == p["rejected"]:
                ds.dropped["pairs with identical answers"] += 1
            elif not p["prompt"] or p["prompt"][-1]["role"] == "assistant":
                raise _fail(rec, "prompt", p["prompt"], "a prompt that ends with a user (or system) turn")
            else:
                kept.append(p)
        if kept:
            key = json.dumps(kept[0]["prompt"], ensure_ascii=False)
            gid = groups.setdefault(key, len(groups))
            for p in kept:
                p["group"] = gid
            ds.rows.extend(kept)
            used += 1
        if max_samples and used >= max_samples:
            break
    ds.prompts = len(groups)
    _require_rows(ds, flag)
    return ds


# ---------------------------------------------------------------------------------------------------------
# Prompts (for sampling stages)


def load_prompts(spec: str, max_samples: int | None = None, flag: str = "--prompts") -> DataSet:
    """Prompts from prompt files, conversations (up to their last user turn) or any preference file."""
    records = read_records(spec, flag)
    if not records:
        raise DataError(f"{flag} {spec}: no rows")
    ds = DataSet([], spec, "prompts", read=len(records))
    seen = set()
    for rec in records:
        r = rec.row
        if "prompt" in r:
            msgs = _as_prompt(rec, "prompt", r["prompt"])
        elif "messages" in r:
            msgs = _messages(rec, "messages", r["messages"])
        elif "instruction" in r:
            inp = r.get("input") or ""
            msgs = [{"role": "user", "content": _text(rec, "instruction", r["instruction"])
                     + ("\n\n" + inp if isinstance(inp, str) and inp.strip() else "")}]
        elif "text" in r or "chosen" in r:
            key = "text" if "text" in r else "chosen"
            msgs = _as_prompt(rec, key, r[key])
        else:
            raise DataError(f"{rec.where}: no prompt in fields {sorted(r)}; expected prompt (string or messages), "
                            f"messages, instruction, or text")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or not msgs[-1]["content"].strip():
            ds.dropped["empty prompts"] += 1
            continue
        key = json.dumps(msgs, ensure_ascii=False)
        if key in seen:
            ds.dropped["duplicate prompts"] += 1
            continue
        seen.add(key)
        ds.rows.append({"prompt": msgs})
        if max_samples and len(ds.rows) >= max_samples:
            break
    _require_rows(ds, flag)
    return ds


# ---------------------------------------------------------------------------------------------------------
# Train / eval split


def split_eval(ds: DataSet, fraction: float, seed: int) -> tuple[DataSet, DataSet]:
    """Hold out a fraction; preference pairs are split by prompt so no eval prompt is trained on."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split {fraction}: expected a fraction between 0 and 1 (for example 0.1)")
    keys = sorted({r.get("group", i) for i, r in enumerate(ds.rows)})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * fraction))
    if n_eval >= len(keys):
        raise DataError(f"--eval-split {fraction}: {ds.source} has only {len(keys)} "
                        f"{'prompts' if ds.prompts else 'rows'}; too few to hold any out")
    held = set(keys[:n_eval])
    train_rows = [r for i, r in enumerate(ds.rows) if r.get("group", i) not in held]
    eval_rows = [r for i, r in enumerate(ds.rows) if r.get("group", i) in held]
    train = DataSet(train_rows, ds.source, ds.format, ds.read, ds.dropped, len(keys) - n_eval if ds.prompts else 0)
    ev = DataSet(eval_rows, f"{ds.source} (held out {fraction:g})", ds.format, 0, Counter(),
                 n_eval if ds.prompts else 0)
    return train, ev
