"""Unpaired feedback for KTO: one answer per row, marked good (thumbs up) or bad (thumbs down).

Every row becomes `{"prompt": [msgs], "completion": [assistant msg], "label": bool, "group": id}`. Two sources:

- unpaired rows: `{"prompt": "Hi", "completion": "Hello!", "label": true}` (`label` true/false, or 1/0);
- any preference format `rlhf reward` reads (explicit, implicit, ranked): per prompt, an answer that is chosen in
  some pair and rejected in none is desirable, one rejected and never chosen is undesirable. A plain pair gives
  one of each; a ranked list gives its best answers as desirable and its worst as undesirable, and drops the
  answers in between (each is better than one answer and worse than another, so a thumbs up or down would be
  wrong half the time).
"""

from __future__ import annotations

import json
from typing import Any

from rlhf_cli.core.errors import DataError
from rlhf_cli.data.io import (
    DataSet,
    Record,
    as_prompt,
    field_error,
    has_empty,
    missing_field,
    pick_format,
    read_records,
    require_records,
    require_rows,
)
from rlhf_cli.data.prefs import PREF_FORMATS, _as_answer, detect_pref_format, load_prefs

FEEDBACK_FORMATS = (*PREF_FORMATS, "unpaired")
_FIELDS = ("prompt", "completion", "label", "chosen", "rejected", "responses", "completions", "ranking", "scores")
_EXPECTED = ("expected one of: prompt+completion+label (true = a good answer, false = a bad one); "
             "prompt+chosen+rejected; chosen+rejected as whole dialogues or transcripts; prompt+responses (best "
             "first, or with ranking or scores)")


def detect_feedback_format(row: dict) -> str | None:
    if "label" in row and "completion" in row:
        return "unpaired"
    return detect_pref_format(row)


def _label(rec: Record) -> bool:
    if "label" not in rec.row:
        raise missing_field(rec, "label", "true (a good answer, thumbs up) or false (a bad one, thumbs down)")
    v = rec.row["label"]
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise field_error(rec, "label", v, "true (a good answer, thumbs up) or false (a bad one, thumbs down)")


def _unpaired(records: list[Record], spec: str, max_samples: int | None) -> DataSet:
    ds = DataSet([], spec, "unpaired", read=len(records))
    groups: dict[str, int] = {}
    for rec in records:
        if "prompt" not in rec.row:
            raise missing_field(rec, "prompt", "the prompt (string or message list) the completion answers")
        if "completion" not in rec.row:
            raise missing_field(rec, "completion", "the answer (string or assistant message(s))")
        prompt = as_prompt(rec, "prompt", rec.row["prompt"])
        completion = _as_answer(rec, "completion", rec.row["completion"])
        label = _label(rec)
        if has_empty(completion):
            ds.drop("rows with an empty completion", rec.where)
            continue
        if not prompt or prompt[-1]["role"] == "assistant":
            raise field_error(rec, "prompt", prompt, "a prompt that ends with a user (or system) turn")
        gid = groups.setdefault(json.dumps(prompt, ensure_ascii=False), len(groups))
        ds.rows.append({"prompt": prompt, "completion": completion, "label": label, "group": gid})
        if max_samples and len(ds.rows) >= max_samples:
            break
    return ds


def unpair(pairs: DataSet) -> DataSet:
    """Pairs -> desirable and undesirable answers, by the rule of the module docstring."""
    ds = DataSet([], pairs.source, f"{pairs.format} pairs as unpaired", read=pairs.read, dropped=pairs.dropped.copy(),
                 first_dropped=dict(pairs.first_dropped))
    by_group: dict[int, dict[str, Any]] = {}
    for p in pairs.rows:
        g = by_group.setdefault(p["group"], {"prompt": p["prompt"], "answers": {}, "up": set(), "down": set()})
        for key, side in (("chosen", "up"), ("rejected", "down")):
            k = json.dumps(p[key], ensure_ascii=False)
            g["answers"].setdefault(k, p[key])
            g[side].add(k)
    middle = 0
    for gid, g in by_group.items():
        for k, answer in g["answers"].items():
            up, down = k in g["up"], k in g["down"]
            if up and down:
                middle += 1
                continue
            ds.rows.append({"prompt": g["prompt"], "completion": answer, "label": up, "group": gid})
    if middle:
        ds.dropped["answers ranked both above and below others (the middle of a ranking)"] += middle
    return ds


def load_feedback(spec: str, fmt: str = "auto", max_samples: int | None = None, flag: str = "--data") -> DataSet:
    """KTO rows from unpaired feedback or from any preference format; `max_samples` counts source rows."""
    records = read_records(spec, flag)
    require_records(records, spec, flag)
    fmt = pick_format(records[0], fmt, detect_feedback_format, _EXPECTED, flag, spec, _FIELDS)
    if fmt == "unpaired":
        ds = _unpaired(records, spec, max_samples)
    else:
        ds = unpair(load_prefs(spec, fmt, max_samples, flag))
    require_rows(ds, flag)
    up = sum(r["label"] for r in ds.rows)
    ds.notes.append(f"{up} desirable and {ds.kept - up} undesirable answers to {len({r['group'] for r in ds.rows})} "
                    f"prompts")
    return ds


def load_pairs(spec: str, fmt: str = "auto", max_samples: int | None = None, flag: str = "--data",
               method: str = "dpo") -> DataSet:
    """`load_prefs`, for the methods that train on pairs; unpaired feedback is refused with a way out."""
    if fmt == "unpaired":
        raise _unpaired_error("--format unpaired", method)
    try:
        return load_prefs(spec, fmt, max_samples, flag)
    except DataError:
        records = read_records(spec, flag)
        if records and fmt == "auto" and detect_feedback_format(records[0].row) == "unpaired":
            raise _unpaired_error(records[0].where, method) from None
        raise


def _unpaired_error(where: str, method: str) -> DataError:
    return DataError(f"{where}: unpaired feedback (prompt, completion, label) trains only --method kto; "
                     f"--method {method} expected preference pairs (prompt+chosen+rejected, whole chosen/rejected "
                     f"dialogues, or prompt+responses ranked best first): pass --method kto, or pair the answers")
