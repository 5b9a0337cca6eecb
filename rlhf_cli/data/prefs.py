"""Preferences: every accepted format -> `{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant
msg], "group": id, "margin": float}`; a ranked list of K answers becomes its K-choose-2 pairs, all with the
prompt's group id.

Ranking files that people write with `rlhf label` are append-only logs: undoing a ranking appends a retraction row
`{"retract": ITEM, "annotator": NAME}`, which cancels the latest earlier ranking row of that `item` by that
`annotator` (`live_records`). Appending keeps every write a single fsynced line, safe against crashes and against
several annotators appending to one file at once; a rewrite would race with them."""

from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any

from rlhf_cli.core.errors import DataError
from rlhf_cli.data.io import (
    DataSet,
    Record,
    as_messages,
    as_prompt,
    field_error,
    has_empty,
    is_transcript,
    missing_field,
    parse_transcript,
    pick_format,
    read_records,
    require_records,
    require_rows,
)

PREF_FORMATS = ("auto", "explicit", "implicit", "ranked")
RETRACT = "retract"  # the field of a retraction row (undo in `rlhf label`)


def live_records(records: list[Record]) -> tuple[list[Record], int]:
    """The rows left once retraction rows have cancelled the rankings they undo, and how many were cancelled.

    A retraction `{"retract": ITEM, "annotator": NAME}` cancels the latest earlier, not yet cancelled row whose
    `item` is ITEM and whose `annotator` is NAME (a missing annotator matches a missing one); one that finds none
    (its ranking was deleted by hand) cancels nothing."""
    if not any(RETRACT in r.row for r in records):
        return records, 0
    live: list[Record | None] = []
    open_rows: dict[tuple[Any, Any], list[int]] = {}  # (item, annotator) -> indices in `live`, oldest first
    cancelled = 0
    for rec in records:
        row = rec.row
        if RETRACT in row:
            stack = open_rows.get((_hashable(row[RETRACT]), _hashable(row.get("annotator"))))
            if stack:
                live[stack.pop()] = None
                cancelled += 1
            continue
        if "item" in row:
            open_rows.setdefault((_hashable(row["item"]), _hashable(row.get("annotator"))), []).append(len(live))
        live.append(rec)
    return [r for r in live if r is not None], cancelled


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def detect_pref_format(row: dict) -> str | None:
    if "responses" in row or "completions" in row:
        return "ranked"
    if "chosen" in row and "rejected" in row:
        return "explicit" if "prompt" in row else "implicit"
    return None


_PREF_FIELDS = ("prompt", "chosen", "rejected", "responses", "completions", "ranking", "scores", "margin")
_PREF_EXPECTED = ("expected one of: prompt+chosen+rejected; chosen+rejected as whole dialogues or transcripts; "
                  "prompt+responses (best first, or with ranking or scores)")


def _as_answer(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise field_error(rec, key, value, "an answer: a string or assistant message(s)")
    msgs = as_messages(rec, key, value)
    if msgs[-1]["role"] != "assistant":
        raise field_error(rec, key, value, "an answer: a string or assistant message(s)")
    return msgs


def _split_dialogues(rec: Record, chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """Implicit prompt: the shared beginning of two whole dialogues is the prompt."""
    def conv(key, v):
        if isinstance(v, str):
            msgs = parse_transcript(v) if is_transcript(v) else None
            if msgs is None:
                raise field_error(rec, key, v, "a whole dialogue: a message list or a \\n\\nHuman: ... transcript")
            return msgs
        return as_messages(rec, key, v)

    c, r = conv("chosen", chosen), conv("rejected", rejected)
    n = 0
    while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
        n += 1
    prompt, ca, ra = c[:n], c[n:], r[n:]
    if not prompt or prompt[-1]["role"] == "assistant" or not ca or not ra:
        raise field_error(rec, "chosen", chosen, "two dialogues that share their opening turns and differ in the "
                                           "assistant's last answer")
    return prompt, ca, ra


def _ranking_order(rec: Record, row: dict, n: int) -> list[list[int]]:
    """Tiers of response indices, best first; answers in one tier are tied."""
    if "scores" in row:
        scores = row["scores"]
        if not isinstance(scores, list) or len(scores) != n or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise field_error(rec, "scores", scores, f"a list of {n} numbers, one per response (higher is better)")
        tiers: dict[float, list[int]] = {}
        for i, s in enumerate(scores):
            tiers.setdefault(float(s), []).append(i)
        return [tiers[s] for s in sorted(tiers, reverse=True)]
    if "ranking" in row:
        ranking = row["ranking"]
        tiers_ = [t if isinstance(t, list) else [t] for t in ranking] if isinstance(ranking, list) else None
        flat = [i for t in tiers_ or [] for i in t]
        ints = all(isinstance(i, int) and not isinstance(i, bool) for i in flat)
        if tiers_ is None or not ints or sorted(flat) != list(range(n)):
            raise field_error(rec, "ranking", ranking,
                        f"the indices 0..{n - 1} of responses, best first, each once ([2, 0, 1]; "
                        f"ties as an inner list: [2, [0, 1]])")
        return tiers_
    return [[i] for i in range(n)]


def _ranked_pairs(rec: Record, margin_from_scores: bool) -> tuple[list[dict], int]:
    r = rec.row
    key = "completions" if "completions" in r and "responses" not in r else "responses"
    if "prompt" not in r:
        raise missing_field(rec, "prompt", "the prompt (string or message list) the responses answer")
    prompt = as_prompt(rec, "prompt", r["prompt"])
    responses = r.get(key)  # a later row of a ranked file may lack it: an error naming the field, not a KeyError
    if not isinstance(responses, list) or len(responses) < 2:
        raise field_error(rec, key, responses, "a list of at least 2 responses, best first")
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
    read = len(records)
    records, retracted = live_records(records)
    if retracted and not records:
        raise DataError(f"{flag} {spec}: every ranking in it was undone (retracted); rank some answers with "
                        f"`rlhf label`, or pass other data")
    require_records(records, spec, flag)
    fmt = pick_format(records[0], fmt, detect_pref_format, _PREF_EXPECTED, flag, spec, _PREF_FIELDS)
    if fmt not in PREF_FORMATS[1:]:  # else an unknown name would silently be read as implicit dialogues
        raise DataError(f"--format {fmt}: unknown preference format; expected one of {', '.join(PREF_FORMATS)}")
    ds = DataSet([], spec, fmt, read=read)
    if retracted:
        ds.drop("rankings undone", spec, retracted)
    groups: dict[str, int] = {}
    used = 0
    for rec in records:
        r = rec.row
        if fmt == "ranked":
            pairs, ties = _ranked_pairs(rec, use_margin)
            if ties:
                ds.drop("tied pairs skipped", rec.where, ties)
        else:
            for k in ("chosen", "rejected"):
                if k not in r:
                    raise missing_field(rec, k, "an answer (string or messages)" if fmt == "explicit"
                                        else "a whole dialogue (messages or transcript)")
            if fmt == "explicit":
                if "prompt" not in r:
                    raise missing_field(rec, "prompt", "the prompt (string or message list)")
                prompt = as_prompt(rec, "prompt", r["prompt"])
                c, rj = _as_answer(rec, "chosen", r["chosen"]), _as_answer(rec, "rejected", r["rejected"])
                # some sets (HuggingFaceH4/ultrafeedback_binarized) repeat the prompt inside each whole dialogue
                c, rj = (x[len(prompt):] if x[:len(prompt)] == prompt and len(x) > len(prompt) else x
                         for x in (c, rj))
            else:
                prompt, c, rj = _split_dialogues(rec, r["chosen"], r["rejected"])
            m = r.get("margin", 0.0)
            if not isinstance(m, (int, float)) or isinstance(m, bool):
                raise field_error(rec, "margin", m, "a number")
            pairs = [{"prompt": prompt, "chosen": c, "rejected": rj, "margin": float(m) if use_margin else 0.0}]
        kept = []
        for p in pairs:
            if has_empty(p["chosen"]) or has_empty(p["rejected"]):
                ds.drop("pairs with an empty answer", rec.where)
            elif p["chosen"] == p["rejected"]:
                ds.drop("pairs with identical answers", rec.where)
            elif not p["prompt"] or p["prompt"][-1]["role"] == "assistant":
                raise field_error(rec, "prompt", p["prompt"], "a prompt that ends with a user (or system) turn")
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
    require_rows(ds, flag)
    return ds
