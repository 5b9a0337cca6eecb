"""Plain test helpers, imported by the test modules as `helpers` (fixtures live in conftest.py): paths, chat
message builders, a tiny offline model, jsonl files, a learnable preference set, and driving the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"


def U(text: str) -> dict:
    """A user message (A: assistant, S: system)."""
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict:
    return {"role": "system", "content": text}


def build_tiny(dest: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random Llama with the default model's real tokenizer and chat template (fast, offline)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_cli.core.models import DEFAULT_MODEL, load_tokenizer, prepare_embedded

    tok = load_tokenizer(prepare_embedded(DEFAULT_MODEL))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def learnable_prefs(n: int, seed: int = 0) -> list[dict]:
    """A preference set a tiny RM can learn: the chosen answer is polite and says 'thanks', the rejected rude."""
    rng = random.Random(seed)
    topics = ["the weather", "my homework", "a recipe", "the bus", "a book", "my garden", "the news", "a song",
              "my bike", "the museum", "a movie", "my cat"]
    rows = []
    for i in range(n):
        t = rng.choice(topics)
        rows.append({"prompt": f"Question {i}: tell me about {t}.",
                     "chosen": f"thanks for asking, happy to help with {t} !",
                     "rejected": f"no . go away , {t} is boring"})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Driving the CLI


def invoke(*args, input: str | None = None, check: bool = False):
    """Run `rlhf ARGS...` in-process, each argument through str(); `input` is its stdin; `check` asserts exit 0."""
    from rlhf_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if check:
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def ok(result):
    assert result.exit_code == 0, (f"exit {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n"
                                   f"{result.stderr}\n--- exception\n{result.exception!r}")
    assert "Traceback" not in result.output
    return result


def one_error(result, code: int, *fragments: str) -> str:
    """Exit `code`, nothing on stdout, exactly one `error:` line on stderr (the last), no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    assert "unexpected" not in errors[0], errors[0]  # a library error, not a crash caught at the top
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


class FakeStream:
    """Stands in for `LM.stream` (monkeypatched): a fixed answer, in the given pieces."""

    def __init__(self, pieces: list[str]):
        from rlhf_cli.core.generation import Answer

        self.pieces, self.stopped, self.dropped = pieces, False, 0
        self.answer = Answer("".join(pieces).strip(), True, len(pieces))

    def __iter__(self):
        return iter(self.pieces)

    def stop(self) -> None:
        self.stopped = True

    def finish(self) -> str:
        return ""


# A chat template with plain "role: text" lines: a reward model built below reads the last token of the answer
# as the last token of the sequence (no end-of-turn marker after it).
PLAIN_TEMPLATE = ("{% for m in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
                  "{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\nassistant: ' }}{% endif %}")


def stage(folder: Path, name: str, **args) -> Path:
    """Make `folder` a finished stage `name` (a manifest with `args`, parent "test")."""
    import time

    from rlhf_cli.core.manifest import write_manifest

    write_manifest(folder, stage=name, parents=["test"], args=args, data={}, metrics={}, started=time.time())
    return folder


def token_rm(dest: Path, policy: Path, token_of, max_length: int = 256, sign: float = 1.0) -> Path:
    """A reward stage with a known preference: no transformer layers, so the score of a sequence is its last
    token's embedding projected on one token's embedding direction; the answers that end with that token score
    highest (lowest with `sign=-1`). `token_of(tok)` names the token id (with the plain template set on `tok`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = PLAIN_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=0,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        e = rm.model.embed_tokens.weight[token_of(tok)]
        rm.score.weight.copy_((sign * e / e.norm()).unsqueeze(0))
    rm.save_pretrained(dest)
    tok.save_pretrained(dest)
    return stage(dest, "reward", max_length=max_length)
