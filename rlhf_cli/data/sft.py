"""SFT demonstrations: every accepted format -> `{"messages": [{"role", "content"}, ...]}` ending with an
assistant turn."""

from __future__ import annotations

from rlhf_cli.core.errors import DataError
from rlhf_cli.data.io import (
    DataSet,
    Record,
    as_messages,
    as_text,
    field_error,
    is_transcript,
    missing_field,
    parse_transcript,
    pick_format,
    read_records,
    require_records,
    require_rows,
)

SFT_FORMATS = ("auto", "messages", "prompt-completion", "alpaca", "prompt-response", "transcript")


def detect_sft_format(row: dict) -> str | None:
    if "messages" in row or "conversations" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "response" in row:
        return "prompt-response"
    if any(is_transcript(row.get(k)) for k in ("text", "transcript", "chosen")):
        return "transcript"
    return None


_SFT_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "response",
               "text", "transcript")
_SFT_EXPECTED = ("expected one of: messages; prompt+completion; instruction(+input)+output (Alpaca); "
                 "prompt+response; text holding a \\n\\nHuman: ... \\n\\nAssistant: ... transcript")


def _sft_row(rec: Record, fmt: str) -> list[dict[str, str]]:
    r = rec.row
    if fmt == "messages":
        key = "messages" if "messages" in r else "conversations"
        if key not in r:
            raise missing_field(rec, "messages", "a list of messages (format messages)")
        return as_messages(rec, key, r[key])
    if fmt in ("prompt-completion", "prompt-response"):
        pk, ck = "prompt", "completion" if fmt == "prompt-completion" else "response"
        for k in (pk, ck):
            if k not in r:
                raise missing_field(rec, k, f"a string or message list (format {fmt})")
        prompt = r[pk] if isinstance(r[pk], list) else [{"role": "user", "content": as_text(rec, pk, r[pk])}]
        answer = r[ck] if isinstance(r[ck], list) else [{"role": "assistant", "content": as_text(rec, ck, r[ck])}]
        return as_messages(rec, pk, prompt) + as_messages(rec, ck, answer)
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if k not in r:
                raise missing_field(rec, k, "a string (Alpaca format: instruction, optional input, output)")
        instr = as_text(rec, "instruction", r["instruction"])
        inp = r.get("input") or ""
        inp = as_text(rec, "input", inp)
        user = instr + ("\n\n" + inp if inp.strip() else "")
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": as_text(rec, "output", r["output"])}]
    if fmt == "transcript":
        key = next((k for k in ("text", "transcript", "chosen") if k in r), "text")
        msgs = parse_transcript(as_text(rec, key, r.get(key)))
        if msgs is None:
            raise field_error(rec, key, r.get(key), "a transcript of \\n\\nHuman: ... \\n\\nAssistant: ... turns")
        return msgs
    raise DataError(f"--format {fmt}: unknown SFT format; expected one of {', '.join(SFT_FORMATS)}")


def load_sft(spec: str, fmt: str = "auto", max_samples: int | None = None, flag: str = "--data") -> DataSet:
    records = read_records(spec, flag)
    require_records(records, spec, flag)
    fmt = pick_format(records[0], fmt, detect_sft_format, _SFT_EXPECTED, flag, spec, _SFT_FIELDS)
    ds = DataSet([], spec, fmt, read=len(records))
    trimmed, first_trimmed = 0, ""
    for rec in records:
        msgs = _sft_row(rec, fmt)
        if not any(m["role"] == "assistant" for m in msgs):
            ds.drop("without an assistant turn", rec.where)
            continue
        if any(not m["content"].strip() for m in msgs if m["role"] == "assistant"):
            ds.drop("with an empty answer", rec.where)
            continue
        if msgs[-1]["role"] != "assistant":  # trailing user turns teach nothing: cut, and say so
            trimmed, first_trimmed = trimmed + 1, first_trimmed or rec.where
            while msgs[-1]["role"] != "assistant":
                msgs = msgs[:-1]
        ds.rows.append({"messages": msgs})
        if max_samples and len(ds.rows) >= max_samples:
            break
    if trimmed:
        ds.notes.append(f"{trimmed} ending with a user turn cut after their last answer (first at {first_trimmed})")
    require_rows(ds, flag)
    return ds
