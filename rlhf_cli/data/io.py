"""Reading data for every stage, and the checks all formats share.

Everything is validated before any model loads, and each format is normalised into one internal shape (see
`rlhf_cli.data.sft`, `rlhf_cli.data.prefs`, `rlhf_cli.data.prompts`). Sources: local .jsonl/.json/.csv/.parquet
files, folders of them, and hub dataset names (`name`, `name:split`, `name:config:split`). An error names the
file and line (or row), the field, what was found and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.core.errors import DataError

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


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a line that is not JSON gives its JSONDecodeError as
    the value, so each reader words the error for its own file."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, e


def _read_file(p: Path, flag: str) -> list[Record]:
    if p.suffix == ".jsonl":
        out = []
        with p.open(encoding="utf-8") as f:
            for i, row in json_lines(f):
                if isinstance(row, json.JSONDecodeError):
                    e = row
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


def field_error(rec: Record, field_: str, found: Any, expected: str) -> DataError:
    shown = json.dumps(found, ensure_ascii=False)[:80] if not isinstance(found, str) else repr(found[:80])
    return DataError(f"{rec.where}: field {field_!r}: found {shown}; expected {expected}")


def as_messages(rec: Record, field_: str, value: Any) -> list[dict[str, str]]:
    """A list of {"role", "content"} with known roles and string content."""
    if not isinstance(value, list) or not value:
        raise field_error(rec, field_, value, "a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise field_error(rec, f"{field_}[{j}]", m, "a {\"role\", \"content\"} object")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if role not in ROLES:
            raise field_error(rec, f"{field_}[{j}].role", role, "one of system, user, assistant")
        if not isinstance(content, str):
            raise field_error(rec, f"{field_}[{j}].content", content, "a string")
        out.append({"role": role, "content": content})
    return out


def as_text(rec: Record, field_: str, value: Any) -> str:
    if not isinstance(value, str):
        raise field_error(rec, field_, value, "a string")
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


def is_transcript(v: Any) -> bool:
    return isinstance(v, str) and bool(re.search(r"(^|\n\n)Human:", v)) and "Assistant:" in v


def has_empty(msgs: list[dict[str, str]]) -> bool:
    return any(not m["content"].strip() for m in msgs)


def pick_format(first: Record, fmt: str, detect, expected: str, flag: str, spec: str) -> str:
    if fmt != "auto":
        return fmt
    found = detect(first.row)
    if found is None:
        raise DataError(f"{first.where}: cannot tell the data format from fields {sorted(first.row)}; "
                        f"{expected}; or force one with --format")
    return found


def require_rows(ds: DataSet, flag: str) -> None:
    if not ds.rows:
        raise DataError(f"{flag} {ds.source}: no usable rows left ({ds.describe()}); check the file's contents")


def as_prompt(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if is_transcript(value):
            msgs = parse_transcript(value)
            if msgs:
                if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
                    msgs = msgs[:-1]  # "...\n\nAssistant:" ends an HH prompt
                return msgs
        return [{"role": "user", "content": value}]
    msgs = as_messages(rec, key, value)
    return msgs


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
