"""Prompts for the sampling stages: prompt files, conversations (up to their last user turn) or the prompts of
any SFT or preference file -> `{"prompt": [msgs]}` ending with a user turn."""

from __future__ import annotations

import json

from rlhf_cli.core.errors import DataError
from rlhf_cli.data.io import (
    DataSet,
    as_messages,
    as_prompt,
    as_text,
    near,
    read_records,
    require_records,
    require_rows,
)

PROMPT_FORMATS = ("auto", "prompt", "messages", "text", "instruction")
_PROMPT_FIELDS = ("prompt", "messages", "instruction", "input", "text", "chosen")


def load_prompts(spec: str, max_samples: int | None = None, flag: str = "--prompts") -> DataSet:
    """Prompts from prompt files, conversations (up to their last user turn) or any preference file."""
    records = read_records(spec, flag)
    require_records(records, spec, flag)
    ds = DataSet([], spec, "prompts", read=len(records))
    seen = set()
    for rec in records:
        r = rec.row
        if "prompt" in r:
            msgs = as_prompt(rec, "prompt", r["prompt"])
        elif "messages" in r:
            msgs = as_messages(rec, "messages", r["messages"])
        elif "instruction" in r:
            inp = r.get("input") or ""
            msgs = [{"role": "user", "content": as_text(rec, "instruction", r["instruction"])
                     + ("\n\n" + inp if isinstance(inp, str) and inp.strip() else "")}]
        elif "text" in r or "chosen" in r:
            key = "text" if "text" in r else "chosen"
            msgs = as_prompt(rec, key, r[key])
        else:
            typos = "".join(f" ({k!r}: did you mean {g!r}?)" for k in sorted(r) if (g := near(k, _PROMPT_FIELDS)))
            raise DataError(f"{rec.where}: no prompt in fields {sorted(r)}{typos}; expected prompt (string or "
                            f"messages), messages, instruction, or text")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or not msgs[-1]["content"].strip():
            ds.drop("empty prompts", rec.where)
            continue
        key = json.dumps(msgs, ensure_ascii=False)
        if key in seen:
            ds.drop("duplicate prompts", rec.where)
            continue
        seen.add(key)
        ds.rows.append({"prompt": msgs})
        if max_samples and len(ds.rows) >= max_samples:
            break
    require_rows(ds, flag)
    return ds
