"""Reading data for every stage, and the checks all formats share.

Everything is validated before any model loads, and each format is normalised into one internal shape (see
`rlhf_cli.data.sft`, `rlhf_cli.data.prefs`, `rlhf_cli.data.prompts`). Sources: local .jsonl/.json/.csv/.parquet
files, folders of them, and hub dataset names (`name`, `name:split`, `name:config:split`). An error names the
file and line (or row), the field, what was found and what was expected.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import hashlib
import json
import os
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
    notes: list[str] = field(default_factory=list)  # changes made to kept rows, shown after the counts
    first_dropped: dict[str, str] = field(default_factory=dict)  # reason -> where the first such row is

    @property
    def kept(self) -> int:
        return len(self.rows)

    def drop(self, reason: str, where: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.first_dropped.setdefault(reason, where)

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
        if self.notes:
            s += "; " + "; ".join(self.notes)
        return s


def _is_hub_name(spec: str) -> bool:
    return not Path(spec.split(":")[0]).exists() and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+){0,2}", spec))


def near(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate `name` is most likely a misspelling of, if any is close enough."""
    found = difflib.get_close_matches(name, [c for c in candidates if c != name], n=1, cutoff=0.75)
    return found[0] if found else None


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("rlhf_manifest.json", "model.safetensors", "tokenizer_config.json",
                                    "pytorch_model.bin", "model.safetensors.index.json"))


def read_records(spec: str, flag: str = "--data") -> list[Record]:
    """All rows of a file, a folder of files, or a hub dataset, each with its location."""
    p = Path(spec).expanduser()
    if p.is_file():
        return _read_file(p, flag)
    if p.is_dir():
        if _is_model_folder(p):  # --data and --model swapped: its config.json would be read as data
            raise DataError(f"{flag} {spec}: is a model folder (it holds config.json and weights or a tokenizer), "
                            f"not data; pass it as the model, and a data file or folder as {flag}")
        files = sorted(f for f in p.rglob("*") if f.suffix in FILE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{flag} {spec}: folder holds no {', '.join(FILE_SUFFIXES)} files; expected a folder "
                            f"of data files, or pass one file")
        return [r for f in files for r in _read_file(f, flag)]
    if p.suffix in FILE_SUFFIXES or "/" in spec and spec.startswith((".", "/", "~")):
        parent = p.parent if p.parent.is_dir() else None
        guess = near(p.name, (f.name for f in parent.iterdir() if f.suffix in FILE_SUFFIXES)) if parent else None
        hint = f"; did you mean {parent / guess}?" if guess else ""
        raise DataError(f"{flag} {spec}: no such file; expected a .jsonl, .json, .csv or .parquet file, "
                        f"a folder of them, or a hub dataset name{hint}")
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


def _not_utf8(p: Path, line: int, byte: int, column: int) -> DataError:
    return DataError(f"{p}:{line}: not UTF-8 text (byte 0x{byte:02x} at column {column}); expected UTF-8: "
                     f"re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8 IN > OUT`)")


def _utf8(p: Path) -> str:
    """The whole file as text, without a leading byte-order mark; bytes that are not UTF-8 are an error that
    names their line."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise _not_utf8(p, raw.count(b"\n", 0, line_start) + 1, raw[e.start], e.start - line_start + 1) from None


def _jsonl(p: Path) -> list[Record]:
    out = []
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if i == 1 and raw.startswith(codecs.BOM_UTF8):  # written by some Windows editors: harmless
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(p, i, raw[e.start], e.start + 1) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n") and i > 1:
                    hint = "; it is the last line and has no line end: cut off by an interrupted write? " \
                           "Complete or delete it"
                elif i == 1 and line.strip() in ("[", "{"):
                    hint = "; this looks like one JSON document over many lines: name the file .json"
                else:
                    hint = "; expected one JSON object per line"
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{i}: expected a JSON object, found {type(row).__name__}; write each row as "
                                f"one {{\"field\": value, ...}} object on its own line")
            out.append(Record(row, f"{p}:{i}"))
    return out


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` prints progress bars and logs its own copy of a read error; the error we raise says it once."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _read_file(p: Path, flag: str) -> list[Record]:
    if p.suffix not in FILE_SUFFIXES:
        raise DataError(f"{flag} {p}: unsupported file type {p.suffix or '(no suffix)'!r}; expected a .jsonl, "
                        f".json, .csv or .parquet file (rename it if it holds one of these)")
    if p.suffix == ".jsonl":
        return _jsonl(p)
    if p.suffix == ".json":
        try:
            data = json.loads(_utf8(p))
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
                raise DataError(f"{p}: item {i} (counting from 0): expected a JSON object, found "
                                f"{type(row).__name__}; the list must hold one {{\"field\": value}} object per row")
            out.append(Record(row, f"{p} item {i}"))
        return out
    from datasets import load_dataset

    kind = {".csv": "csv", ".parquet": "parquet"}[p.suffix]
    if kind == "csv":
        _utf8(p)  # the reader's own decode error names no line
    try:
        with _quiet_datasets():
            ds = load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e).strip() else ""
        expected = ("a CSV file with a header row naming the fields" if kind == "csv" else
                    "a parquet file (re-export it, for example with pandas' to_parquet)")
        raise DataError(f"{p}: cannot read as {kind} ({type(e).__name__}: {first}); expected {expected}") from None
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


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


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
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e).strip() else type(e).__name__
        fix = ("HF_HUB_OFFLINE is set and it is not in the local cache: unset HF_HUB_OFFLINE to download it once, "
               "or pass a local file" if _offline() else
               "check the name, config and split on the hub, or pass a local file")
        raise DataError(f"{flag} {spec}: cannot load hub dataset {name!r} (config {config}, split {split}; "
                        f"{why}); {fix}") from None
    return [Record(dict(r), f"{spec}[{i}]") for i, r in enumerate(ds)]


def field_error(rec: Record, field_: str, found: Any, expected: str) -> DataError:
    shown = json.dumps(found, ensure_ascii=False)[:80] if not isinstance(found, str) else repr(found[:80])
    return DataError(f"{rec.where}: field {field_!r}: found {shown}; expected {expected}")


def missing_field(rec: Record, field_: str, expected: str, present: Iterable[str] | None = None) -> DataError:
    """A field the row lacks; a present field whose name is close to it is named as the likely misspelling."""
    present = sorted(rec.row if present is None else present)
    guess = near(field_, present)
    seen = f"the row has {guess!r}: rename it to {field_!r}" if guess else f"the row has {present}"
    return DataError(f"{rec.where}: field {field_!r} is missing ({seen}); expected {expected}")


def as_messages(rec: Record, field_: str, value: Any) -> list[dict[str, str]]:
    """A list of {"role", "content"} with known roles and string content."""
    if not isinstance(value, list) or not value:
        raise field_error(rec, field_, value, "a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise field_error(rec, f"{field_}[{j}]", m, "a {\"role\", \"content\"} object")
        for key, alias in (("role", "from"), ("content", "value")):
            if key not in m and alias not in m:
                raise missing_field(rec, f"{field_}[{j}].{key}", "messages of the form {\"role\": ..., "
                                    "\"content\": ...}", present=m)
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


def pick_format(first: Record, fmt: str, detect, expected: str, flag: str, spec: str,
                fields: tuple[str, ...] = ()) -> str:
    """`fmt`, or the format `detect` finds in the first row; `fields` (the names the formats use) let the error
    point at a misspelt field name."""
    if fmt != "auto":
        return fmt
    found = detect(first.row)
    if found is None:
        guesses = [(k, near(k, fields)) for k in sorted(first.row) if k not in fields]
        typos = "".join(f" ({k!r}: did you mean {g!r}?)" for k, g in guesses if g)
        raise DataError(f"{first.where}: cannot tell the data format from fields {sorted(first.row)}{typos}; "
                        f"{expected}; rename the fields to match, or force a format with --format")
    return found


def require_records(records: list[Record], spec: str, flag: str) -> None:
    if not records:
        raise DataError(f"{flag} {spec}: no rows (the file or folder holds no data); expected at least one row")


def require_rows(ds: DataSet, flag: str) -> None:
    if not ds.rows:
        many = len(ds.first_dropped) > 1
        see = ", ".join(f"{where}" + (f" ({why})" if many else "") for why, where in ds.first_dropped.items())
        raise DataError(f"{flag} {ds.source}: no usable rows left ({ds.describe()}{'; see ' + see if see else ''}); "
                        f"fix those rows, or pass other data")


def as_prompt(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, (str, list)):
        raise field_error(rec, key, value, "a prompt: a string or a list of {\"role\", \"content\"} messages")
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
