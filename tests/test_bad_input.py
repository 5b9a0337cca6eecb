"""Bad input as people really type it, through the real `rlhf` CLI.

Every refused case must end with exactly one `error:` line on stderr that says what was wrong and where (the file
and line, the flag or the field), a non-zero exit code of the error's kind (1 for data and checkpoints, 2 for
flags and settings), no traceback, and nothing written: no --out folder, no OUT.partial, and a finished stage
already in --out left byte for byte as it was.

The data, YAML and flag cases fail before any model loads (the tiny model's path is passed but never read); the
checkpoint cases use one tiny sft -> reward run made once for this module, all with `--threads 1`. A few inputs
that look wrong but are fine (a UTF-8 byte-order mark, a prompt longer than the context for `rlhf generate`, a
conversation that ends with the user) are accepted with a clear note; they are at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import EXAMPLES, A, U, invoke, ok, one_error

from rlhf_cli.core.errors import ConfigError, DataError
from rlhf_cli.core.manifest import MANIFEST
from rlhf_cli.data import load_prefs, load_sft

THREADS = ["--threads", "1"]
SFT_ROW = {"messages": [U("hi"), A("hello")]}
PAIR = {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."}
DATA_ERROR, CONFIG_ERROR = DataError.exit_code, ConfigError.exit_code


def lines(*rows: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def refused(result, code: int, out: Path | None, *where: str) -> str:
    """One error line holding every fragment of `where`, and nothing written at `out` (nor at OUT.partial)."""
    line = one_error(result, code, *where)
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not out.with_name(out.name + ".partial").exists(), f"{out}.partial was left behind"
    return line


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: its content hash (files) or a mark (folders)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def stages(tiny, tmp_path_factory):
    """A finished tiny sft stage and a reward stage trained from it (one optimiser step each)."""
    run = tmp_path_factory.mktemp("bad_input") / "run"
    step = ["--max-steps", "1", "--batch-size", "2", *THREADS]
    ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--max-samples", 4, "--run", run,
              "--max-length", 128, *step))
    ok(invoke("reward", "--run", run, "--data", EXAMPLES / "prefs_explicit.jsonl", "--max-samples", 4, *step))
    return SimpleNamespace(run=run, sft=run / "sft", reward=run / "reward")


# ---------------------------------------------------------------------------------------------------------
# Data files: (id, command, file name, content, exit code, fragments of the error; {f} is the file's path)

DATA_FILES = [
    # reading the file
    ("malformed-json-line", "sft", "d.jsonl", lines(SFT_ROW) + '{"messages": [}\n' + lines(SFT_ROW),
     DATA_ERROR, ["{f}:2", "not valid JSON"]),
    ("truncated-last-line", "sft", "d.jsonl", lines(SFT_ROW, SFT_ROW) + '{"messages": [{"role": "user", "con',
     DATA_ERROR, ["{f}:3", "not valid JSON", "cut off"]),
    ("not-utf8", "sft", "d.jsonl", lines(SFT_ROW).encode() + '{"prompt": "café", "completion": "oui"}\n'.encode(
        "latin-1"), DATA_ERROR, ["{f}:2", "not UTF-8", "0xe9", "re-save"]),
    ("empty-file", "sft", "d.jsonl", "", DATA_ERROR, ["--data {f}: no rows"]),
    ("blank-lines-only", "reward", "d.jsonl", "\n  \n\n", DATA_ERROR, ["--data {f}: no rows"]),
    ("corrupt-parquet", "sft", "d.parquet", b"PAR1 this is not a parquet file", DATA_ERROR,
     ["{f}: cannot read as parquet", "expected a parquet file"]),
    ("csv-wrong-columns", "sft", "d.csv", "question,answer\nhi,hello\n", DATA_ERROR,
     ["{f}:2", "cannot tell the data format", "['answer', 'question']", "--format"]),
    ("csv-not-utf8", "sft", "d.csv", b"prompt,response\nhi,caf\xe9\n", DATA_ERROR, ["{f}:2", "not UTF-8"]),
    ("csv-empty-cell", "sft", "d.csv", "prompt,response\nhi,hello\n,orphan answer\n", DATA_ERROR,
     ["{f}:3", "'prompt'"]),
    ("json-array-non-object", "sft", "d.json", json.dumps([SFT_ROW, "hello"]), DATA_ERROR,
     ["{f}: item 1", "expected a JSON object, found str"]),
    ("json-invalid", "sft", "d.json", '[{"prompt": "a", "completion": "b"},\n {"prompt": ]', DATA_ERROR,
     ["{f}:2", "not valid JSON"]),
    ("json-document-saved-as-jsonl", "sft", "d.jsonl", json.dumps([SFT_ROW], indent=2), DATA_ERROR,
     ["{f}:1", "name the file .json"]),
    ("jsonl-line-is-a-list", "sft", "d.jsonl", lines(SFT_ROW) + "[1, 2]\n", DATA_ERROR,
     ["{f}:2", "expected a JSON object, found list"]),
    ("unsupported-suffix", "sft", "d.txt", "hi\nhello\n", DATA_ERROR, ["--data {f}", "unsupported file type '.txt'"]),
    # SFT rows
    ("sft-missing-field", "sft", "d.jsonl", lines({"instruction": "a", "output": "b"}, {"instruction": "c"}),
     DATA_ERROR, ["{f}:2", "'output' is missing"]),
    ("sft-misspelt-field", "sft", "d.jsonl", lines({"mesages": [U("hi"), A("hello")]}), DATA_ERROR,
     ["{f}:1", "'mesages': did you mean 'messages'?"]),
    ("sft-misspelt-field-later-row", "sft", "d.jsonl", lines({"prompt": "a", "completion": "b"},
                                                             {"prompt": "c", "completoin": "d"}),
     DATA_ERROR, ["{f}:2", "'completion' is missing", "rename it to 'completion'"]),
    ("sft-number-for-text", "sft", "d.jsonl", lines({"prompt": "2+2?", "completion": 4}), DATA_ERROR,
     ["{f}:1", "field 'completion': found 4; expected a string"]),
    ("sft-messages-not-a-list", "sft", "d.jsonl", lines({"messages": "hi there"}), DATA_ERROR,
     ["{f}:1", "field 'messages'", "expected a non-empty list"]),
    ("sft-wrong-role", "sft", "d.jsonl", lines({"messages": [U("hi"), {"role": "robot", "content": "beep"}]}),
     DATA_ERROR, ["{f}:1", "'messages[1].role'", "'robot'", "one of system, user, assistant"]),
    ("sft-message-without-content", "sft", "d.jsonl", lines({"messages": [{"role": "user", "text": "hi"}, A("yo")]}),
     DATA_ERROR, ["{f}:1", "'messages[0].content' is missing"]),
    ("sft-empty-answer", "sft", "d.jsonl", lines({"prompt": "hi", "completion": ""},
                                                 {"prompt": "yo", "completion": "  "}),
     DATA_ERROR, ["--data {f}: no usable rows left", "2 with an empty answer", "see {f}:1"]),
    ("sft-ends-with-the-user", "sft", "d.jsonl", lines({"messages": [U("hello?")]}), DATA_ERROR,
     ["--data {f}: no usable rows left", "without an assistant turn", "see {f}:1"]),
    # preference rows
    ("prefs-missing-field", "reward", "p.jsonl", lines(PAIR, {"prompt": "q", "chosen": "a"}), DATA_ERROR,
     ["{f}:2", "'rejected' is missing"]),
    ("prefs-misspelt-field", "reward", "p.jsonl", lines({"prompt": "q", "chosen": "a", "rejcted": "b"}),
     DATA_ERROR, ["{f}:1", "'rejcted': did you mean 'rejected'?"]),
    ("prefs-misspelt-field-later-row", "reward", "p.jsonl", lines(PAIR, {"prompt": "q", "chosen": "a",
                                                                         "rejcted": "b"}),
     DATA_ERROR, ["{f}:2", "'rejected' is missing", "rename it to 'rejected'"]),
    ("prefs-number-for-answer", "reward", "p.jsonl", lines({"prompt": "q", "chosen": 3, "rejected": "b"}),
     DATA_ERROR, ["{f}:1", "field 'chosen': found 3", "a string or assistant message"]),
    ("prefs-number-for-prompt", "reward", "p.jsonl", lines({"prompt": 7, "chosen": "a", "rejected": "b"}),
     DATA_ERROR, ["{f}:1", "field 'prompt': found 7", "a string or a list"]),
    ("prefs-wrong-role", "reward", "p.jsonl", lines({"prompt": [{"role": "customer", "content": "q"}],
                                                     "chosen": "a", "rejected": "b"}),
     DATA_ERROR, ["{f}:1", "'prompt[0].role'", "'customer'"]),
    ("prefs-chosen-equals-rejected", "reward", "p.jsonl", lines({"prompt": "q", "chosen": "same", "rejected": "same"}),
     DATA_ERROR, ["--data {f}: no usable rows left", "identical answers", "see {f}:1"]),
    ("prefs-empty-answer", "reward", "p.jsonl", lines({"prompt": "q", "chosen": "", "rejected": "b"}), DATA_ERROR,
     ["--data {f}: no usable rows left", "pairs with an empty answer", "see {f}:1"]),
    ("prefs-prompt-ends-with-assistant", "reward", "p.jsonl", lines({"prompt": [U("q"), A("a")], "chosen": "b",
                                                                     "rejected": "c"}),
     DATA_ERROR, ["{f}:1", "field 'prompt'", "ends with a user"]),
    ("prefs-dialogues-share-no-prompt", "reward", "p.jsonl", lines({"chosen": [U("a"), A("b")],
                                                                    "rejected": [U("c"), A("d")]}),
     DATA_ERROR, ["{f}:1", "field 'chosen'", "share their opening turns"]),
    ("prefs-margin-not-a-number", "reward", "p.jsonl", lines(PAIR | {"margin": "big"}), DATA_ERROR,
     ["{f}:1", "field 'margin'", "a number"]),
    # ranked lists
    ("ranking-duplicate-index", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["a", "b", "c"],
                                                            "ranking": [0, 0, 1]}),
     DATA_ERROR, ["{f}:1", "field 'ranking': found [0, 0, 1]", "each once"]),
    ("ranking-out-of-range", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}),
     DATA_ERROR, ["{f}:1", "field 'ranking': found [0, 2]", "indices 0..1"]),
    ("ranking-index-as-text", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["a", "b"],
                                                          "ranking": ["1", 0]}),
     DATA_ERROR, ["{f}:1", "field 'ranking'"]),
    ("one-response-only", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["the only answer"]}), DATA_ERROR,
     ["{f}:1", "field 'responses'", "at least 2 responses"]),
    ("scores-wrong-length", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["a", "b", "c"],
                                                        "scores": [3, 1]}),
     DATA_ERROR, ["{f}:1", "field 'scores': found [3, 1]", "a list of 3 numbers"]),
    ("scores-wrong-type", "reward", "r.jsonl", lines({"prompt": "q", "responses": ["a", "b"],
                                                      "scores": ["high", "low"]}),
     DATA_ERROR, ["{f}:1", "field 'scores'", "numbers"]),
    ("scores-not-a-number", "reward", "r.jsonl", '{"prompt": "q", "responses": ["a", "b"], "scores": [NaN, 1]}\n',
     DATA_ERROR, ["{f}:1", "field 'scores'", "numbers"]),
    # prompt files (rlhf ppo reads them after finding both stages, before any weights load)
    ("empty-prompt", "prompts", "q.jsonl", lines({"prompt": ""}, {"prompt": [U("   ")]}), DATA_ERROR,
     ["--prompts {f}: no usable rows left", "2 empty prompts", "see {f}:1"]),
    ("misspelt-prompt-field", "prompts", "q.jsonl", lines({"prompt": "ok"}, {"promt": "typo"}), DATA_ERROR,
     ["{f}:2", "no prompt in fields ['promt']", "did you mean 'prompt'?"]),
    ("number-for-prompt", "prompts", "q.jsonl", lines({"prompt": 12}), DATA_ERROR, ["{f}:1", "field 'prompt'"]),
]


@pytest.mark.parametrize("kind,name,content,code,where", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_bad_data_file(request, tiny, tmp_path, kind, name, content, code, where):
    data = tmp_path / name
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    if kind == "prompts":
        stages = request.getfixturevalue("stages")
        args = ["ppo", "--policy", stages.sft, "--reward", stages.reward, "--prompts", data]
    else:
        args = [kind, "--model", tiny, "--data", data]
    refused(invoke(*args, "--out", out, *THREADS), code, out, *(w.format(f=data) for w in where))


def test_bad_data_cases_cover_the_common_mistakes():
    assert len(DATA_FILES) >= 40 and len({c[0] for c in DATA_FILES}) == len(DATA_FILES)


# ---------------------------------------------------------------------------------------------------------
# Data paths: missing, empty, a model folder, a hub dataset that cannot be reached


def test_missing_data_file_suggests_the_near_name(tiny, tmp_path):
    typo = EXAMPLES / "sft_mesages.jsonl"
    out = tmp_path / "out"
    refused(invoke("sft", "--model", tiny, "--data", typo, "--out", out), DATA_ERROR, out,
            f"--data {typo}: no such file", f"did you mean {EXAMPLES / 'sft_messages.jsonl'}?")


def test_empty_data_folder(tiny, tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    refused(invoke("reward", "--model", tiny, "--data", tmp_path / "data", "--out", out), DATA_ERROR, out,
            f"--data {tmp_path / 'data'}: folder holds no .jsonl, .json, .csv, .parquet files")


def test_model_folder_given_as_data(tiny, tmp_path):
    """--model and --data swapped: the model's config.json must not be read as rows."""
    out = tmp_path / "out"
    refused(invoke("sft", "--model", EXAMPLES / "sft_messages.jsonl", "--data", tiny, "--out", out), DATA_ERROR, out,
            f"--data {tiny}: is a model folder", "pass it as the model")


def test_hub_dataset_offline(tiny, tmp_path):
    out = tmp_path / "out"
    refused(invoke("sft", "--model", tiny, "--data", "nobody-here/no-such-dataset:train", "--out", out), DATA_ERROR,
            out, "--data nobody-here/no-such-dataset:train: cannot load hub dataset", "HF_HUB_OFFLINE",
            "pass a local file")


def test_hub_model_offline(tmp_path):
    out = tmp_path / "out"
    refused(invoke("sft", "--model", "nobody-here/no-such-model", "--data", EXAMPLES / "sft_alpaca.jsonl",
                   "--out", out), DATA_ERROR, out,
            "--model nobody-here/no-such-model: not a local folder, not in the Hugging Face cache",
            "HF_HUB_OFFLINE is set")


# ---------------------------------------------------------------------------------------------------------
# --config YAML files: (id, file text, fragments; {f} is the file's path)

CONFIGS = [
    ("misspelt-key", "batch_sise: 4\n", ["{f}: unknown key 'batch_sise'", "did you mean 'batch_size'?"]),
    ("transformers-key", "learning_rate: 1e-5\n", ["{f}: unknown key 'learning_rate'", "did you mean 'lr'?"]),
    ("a-list", "- lr: 1e-5\n- batch_size: 4\n", ["{f}: expected a mapping of setting: value, found list",
                                                 "without a leading `- `"]),
    ("unclosed-bracket", "lr: 1e-5\nlora_targets: [q_proj,\nbatch_size: 4\n",
     ["{f}:4: not valid YAML", "starts on line 2"]),
    ("tab-indent", "lr: 1e-5\n\tbatch_size: 4\n", ["{f}:2: not valid YAML"]),
    ("wrong-value-type", "batch_size: four\n", ["{f}: key 'batch_size': expected an integer, found 'four'"]),
    ("value-out-of-bounds", "batch_size: 0\n", ["--batch-size 0: expected a whole number >= 1"]),
]


@pytest.mark.parametrize("text,where", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_bad_config_file(tiny, tmp_path, text, where):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    refused(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--config", cfg, "--out", out),
            CONFIG_ERROR, out, *(w.format(f=cfg) for w in where))


def test_config_file_missing(tiny, tmp_path):
    out = tmp_path / "out"
    refused(invoke("reward", "--model", tiny, "--data", EXAMPLES / "prefs_explicit.jsonl", "--config",
                   tmp_path / "nope.yaml", "--out", out), CONFIG_ERROR, out, f"--config {tmp_path / 'nope.yaml'}: "
            "no such file")


# ---------------------------------------------------------------------------------------------------------
# Flag values: (command, flag, value, exit code, fragment)

FLAGS = [
    ("sft", "--max-steps", "0", CONFIG_ERROR, "--max-steps 0: expected a whole number >= 1"),
    ("sft", "--max-steps", "-5", CONFIG_ERROR, "--max-steps -5: expected a whole number >= 1"),
    ("sft", "--batch-size", "0", CONFIG_ERROR, "--batch-size 0: expected a whole number >= 1"),
    ("reward", "--batch-size", "-2", CONFIG_ERROR, "--batch-size -2: expected a whole number >= 1"),
    ("sft", "--lr", "0", CONFIG_ERROR, "--lr 0.0: expected"),
    ("reward", "--lr", "-1e-5", CONFIG_ERROR, "--lr -1e-05: expected"),
    ("sft", "--epochs", "0", CONFIG_ERROR, "--epochs 0.0: expected a positive number"),
    ("sft", "--grad-accum", "0", CONFIG_ERROR, "--grad-accum 0: expected a whole number >= 1"),
    ("sft", "--max-samples", "0", CONFIG_ERROR, "--max-samples 0: expected a whole number >= 1"),
    ("sft", "--eval-split", "1.5", CONFIG_ERROR, "--eval-split 1.5: expected a fraction between 0 and 1"),
    ("reward", "--eval-split", "-0.1", CONFIG_ERROR, "--eval-split -0.1: expected a fraction between 0 and 1"),
    ("sft", "--eval-split", "1", CONFIG_ERROR, "--eval-split 1.0: expected a fraction between 0 and 1"),
    ("ppo", "--batch-size", "0", CONFIG_ERROR, "--batch-size 0: expected a whole number >= 1"),
    ("ppo", "--max-steps", "0", CONFIG_ERROR, "--max-steps 0: expected"),
]


@pytest.mark.parametrize("command,flag,value,code,where", FLAGS, ids=[f"{c[0]}{c[1]}={c[2]}" for c in FLAGS])
def test_bad_flag_value(tiny, tmp_path, command, flag, value, code, where):
    out = tmp_path / "out"
    if command == "ppo":
        args = ["ppo", "--policy", tiny, "--reward", tiny, "--prompts", EXAMPLES / "prompts.jsonl"]
    else:
        data = EXAMPLES / ("sft_alpaca.jsonl" if command == "sft" else "prefs_explicit.jsonl")
        args = [command, "--model", tiny, "--data", data]
    refused(invoke(*args, flag, value, "--out", out, *THREADS), code, out, where)


# ---------------------------------------------------------------------------------------------------------
# Folders that are not models, and stages of the wrong kind


def _not_a_model(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "random-files":
        (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
        (folder / "notes.txt").write_text("my notes", encoding="utf-8")
    elif kind == "config-not-a-model":
        (folder / "config.json").write_text('{"foo": 1}', encoding="utf-8")
    elif kind == "config-not-json":
        (folder / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
    return folder


NOT_MODELS = {"empty": "no config.json in this folder", "random-files": "no config.json in this folder",
              "config-not-a-model": 'has no "model_type"', "config-not-json": "is not valid JSON"}


@pytest.mark.parametrize("kind", NOT_MODELS)
@pytest.mark.parametrize("command", ["sft", "ppo-policy", "ppo-reward", "chat", "eval-reward"])
def test_folder_that_is_not_a_model(stages, tmp_path, kind, command):
    folder = _not_a_model(tmp_path, kind)
    out = tmp_path / "out"
    prompts = ["--prompts", EXAMPLES / "prompts.jsonl", "--out", out, *THREADS]
    args, flag = {
        "sft": (["sft", "--model", folder, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", out, *THREADS], "--model"),
        "ppo-policy": (["ppo", "--policy", folder, "--reward", stages.reward, *prompts], "--policy"),
        "ppo-reward": (["ppo", "--policy", stages.sft, "--reward", folder, *prompts], "--reward"),
        "chat": (["chat", folder, "--prompt", "hi", *THREADS], "MODEL"),
        "eval-reward": (["eval", "reward", "--model", folder, "--data", EXAMPLES / "prefs_explicit.jsonl", *THREADS],
                        "--model"),
    }[command]
    refused(invoke(*args), DATA_ERROR, out, f"{flag} {folder}: ", NOT_MODELS[kind])


WRONG_STAGES = [  # (id, arguments, fragments): R the reward stage, S the sft stage, P prompts, O the --out folder
    ("ppo-policy-is-reward", ["ppo", "--policy", "R", "--reward", "R", "--prompts", "P", "--out", "O"],
     ["--policy {R}: is a reward stage, expected an sft stage", "rlhf sft"]),
    ("sft-model-is-reward", ["sft", "--model", "R", "--data", "D", "--out", "O"],
     ["--model {R}: is a reward stage", "rlhf sft"]),
    ("chat-with-reward", ["chat", "R", "--prompt", "hi"], ["MODEL {R}: is a reward stage", "cannot write them"]),
    ("generate-with-reward", ["generate", "R", "--prompts", "P", "--out", "O"], ["MODEL {R}: is a reward stage"]),
    ("ppo-reward-is-sft", ["ppo", "--policy", "S", "--reward", "S", "--prompts", "P", "--out", "O"],
     ["--reward {S}: is an sft stage, expected a reward stage", "rlhf reward"]),
    ("ppo-reward-is-a-plain-lm", ["ppo", "--policy", "S", "--reward", "TINY", "--prompts", "P", "--out", "O"],
     ["--reward {TINY}: not a reward model", "LlamaForCausalLM"]),
    ("chat-reward-is-sft", ["chat", "S", "--reward", "S", "--prompt", "hi"], ["--reward {S}: is an sft stage"]),
    ("eval-reward-on-sft", ["eval", "reward", "--model", "S", "--data", "PREFS"],
     ["--model {S}: is an sft stage, expected a reward stage"]),
    ("ppo-run-without-reward", ["ppo", "--run", "SFT_ONLY", "--prompts", "P", "--out", "O"],
     ["--run {SFT_ONLY}/reward: no such folder", "rlhf reward"]),
]


@pytest.mark.parametrize("args,where", [c[1:] for c in WRONG_STAGES], ids=[c[0] for c in WRONG_STAGES])
def test_stage_of_the_wrong_kind(stages, tiny, tmp_path, args, where):
    sft_only = tmp_path / "sft_only"  # a run folder whose reward stage was never made
    sft_only.mkdir()
    shutil.copytree(stages.sft, sft_only / "sft")
    names = {"R": stages.reward, "S": stages.sft, "TINY": tiny, "P": EXAMPLES / "prompts.jsonl",
             "D": EXAMPLES / "sft_alpaca.jsonl", "PREFS": EXAMPLES / "prefs_explicit.jsonl", "O": tmp_path / "out",
             "SFT_ONLY": sft_only}
    before = tree_hash(stages.run)
    refused(invoke(*[names.get(a, a) for a in args], *THREADS), DATA_ERROR, tmp_path / "out",
            *(w.format(**names) for w in where))
    assert tree_hash(stages.run) == before


# ---------------------------------------------------------------------------------------------------------
# PPO's preflight: tokenizers that do not match, prompts that do not fit


@pytest.fixture(scope="module")
def other_vocab_rm(stages, tmp_path_factory):
    """The reward stage with two extra tokens: a vocabulary the policy's ids cannot index; and a copy whose
    tokenizer has no chat template either, so conversations cannot be re-encoded for it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("other_rm")
    tok = AutoTokenizer.from_pretrained(stages.reward)
    tok.add_tokens(["<extra_token_1>", "<extra_token_2>"])
    model = AutoModelForSequenceClassification.from_pretrained(stages.reward, num_labels=1)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(root / "vocab")
    tok.save_pretrained(root / "vocab")
    shutil.copytree(root / "vocab", root / "no_template")
    for f in (root / "no_template").glob("chat_template*"):
        f.unlink()
    cfg_path = root / "no_template" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    assert AutoTokenizer.from_pretrained(root / "no_template").chat_template is None
    return SimpleNamespace(vocab=root / "vocab", no_template=root / "no_template")


@pytest.mark.parametrize("which,extra,code,where", [
    ("vocab", ["--value-init", "reward"], CONFIG_ERROR,
     ["--value-init reward: the reward model's vocabulary differs from the policy's", "--value-init policy"]),
    ("no_template", ["--value-init", "policy"], DATA_ERROR,
     ["--reward {rm}: its tokenizer differs from the policy's (the vocabularies differ)", "no chat template"]),
], ids=["value-model-from-other-vocab", "reward-tokenizer-cannot-re-encode"])
def test_ppo_tokenizers_that_do_not_match(stages, other_vocab_rm, tmp_path, which, extra, code, where):
    rm = getattr(other_vocab_rm, which)
    out = tmp_path / "out"
    refused(invoke("ppo", "--policy", stages.sft, "--reward", rm, "--prompts", EXAMPLES / "prompts.jsonl",
                   "--max-new-tokens", 16, *extra, "--out", out, *THREADS), code, out,
            *(w.format(rm=rm) for w in where))


def test_ppo_every_prompt_longer_than_the_limit(stages, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(lines({"prompt": "tell me more " * 100}, {"prompt": "and more " * 120}), encoding="utf-8")
    out = tmp_path / "out"
    refused(invoke("ppo", "--policy", stages.sft, "--reward", stages.reward, "--prompts", prompts,
                   "--max-length", 64, "--max-new-tokens", 16, "--out", out, *THREADS), DATA_ERROR, out,
            f"--prompts {prompts}: every prompt is longer than 48 tokens", "raise --max-length")


def test_ppo_response_longer_than_max_length(stages, tmp_path):
    out = tmp_path / "out"
    refused(invoke("ppo", "--policy", stages.sft, "--reward", stages.reward, "--prompts", EXAMPLES / "prompts.jsonl",
                   "--max-length", 32, "--max-new-tokens", 32, "--out", out, *THREADS), CONFIG_ERROR, out,
            "--max-new-tokens 32: must be below --max-length 32")


# ---------------------------------------------------------------------------------------------------------
# The output folder already holds something: refused without --overwrite, left exactly as it was


@pytest.mark.parametrize("case", ["sft-out", "sft-run", "reward-out", "ppo-out", "own-files"])
def test_output_folder_already_holds_a_finished_stage(stages, tiny, tmp_path, case):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("not yours to delete", encoding="utf-8")
    sft = ["sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl"]
    args, target, what = {
        "sft-out": ([*sft, "--out", stages.sft], stages.sft, "a finished sft stage"),
        "sft-run": ([*sft, "--run", stages.run], stages.sft, "a finished sft stage"),
        "reward-out": (["reward", "--model", stages.sft, "--data", EXAMPLES / "prefs_explicit.jsonl", "--out",
                        stages.reward], stages.reward, "a finished reward stage"),
        "ppo-out": (["ppo", "--policy", stages.sft, "--reward", stages.reward, "--prompts",
                     EXAMPLES / "prompts.jsonl", "--out", stages.reward], stages.reward, "a finished reward stage"),
        "own-files": ([*sft, "--out", own], own, "files (not a finished stage)"),
    }[case]
    assert target == own or (target / MANIFEST).is_file()
    before, around = tree_hash(target), sorted(p.name for p in target.parent.iterdir())
    refused(invoke(*args, *THREADS), CONFIG_ERROR, None, f"--out {target}: already holds {what}", "--overwrite")
    assert tree_hash(target) == before  # byte for byte
    assert sorted(p.name for p in target.parent.iterdir()) == around  # no OUT.partial, no OUT.old


# ---------------------------------------------------------------------------------------------------------
# Looks wrong, is fine: accepted, with a note where something was changed


def test_utf8_byte_order_mark_is_accepted(stages, tmp_path):
    """Some Windows editors start UTF-8 files with a byte-order mark; it is not data, so it is skipped."""
    bom = "\ufeff"
    prefs = tmp_path / "bom.jsonl"
    prefs.write_text(bom + lines(PAIR), encoding="utf-8")
    result = ok(invoke("eval", "reward", "--model", stages.reward, "--data", prefs, "--json", *THREADS))
    assert f"{prefs}: explicit format, 1 rows read, 1 pairs kept" in result.stderr
    assert json.loads(result.stdout)["pairs"] == 1
    assert load_prefs(str(prefs)).rows[0]["prompt"] == [U(PAIR["prompt"])]  # no mark left in the first field
    (tmp_path / "bom.json").write_text(bom + json.dumps([PAIR]), encoding="utf-8")
    (tmp_path / "bom.csv").write_text(bom + "prompt,response\nhi,hello\n", encoding="utf-8")
    assert load_prefs(str(tmp_path / "bom.json")).kept == 1
    assert load_sft(str(tmp_path / "bom.csv")).rows == [{"messages": [U("hi"), A("hello")]}]


def test_prompt_longer_than_the_context_is_cut_with_a_note(tiny, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(lines({"prompt": "word " * 1500}), encoding="utf-8")
    out = tmp_path / "g.jsonl"
    result = ok(invoke("generate", tiny, "--prompts", prompts, "--out", out, "-k", 1, "--max-new-tokens", 2,
                       *THREADS))
    assert "1 prompts longer than 1022 tokens kept their last 1022 tokens" in result.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


def test_conversation_ending_with_the_user_is_cut_with_a_note(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(SFT_ROW, {"messages": [U("q"), A("a"), U("one more thing")]}), encoding="utf-8")
    ds = load_sft(str(data))
    assert ds.rows[1] == {"messages": [U("q"), A("a")]}
    assert f"1 ending with a user turn cut after their last answer (first at {data}:2)" in ds.describe()


# ---------------------------------------------------------------------------------------------------------
# The parser's own errors, through the real entry point (a process, as a user runs it)


@pytest.mark.parametrize("argv,where", [
    (["sft", "--batch-sise", "2"], "No such option: --batch-sise (Possible options: --batch-size"),
    (["sft", "--lr", "abc"], "Invalid value for '--lr'"),
    (["eval", "reward", "--json", "--bogus"], "No such option: --bogus"),
])
def test_parser_errors_are_one_line_naming_the_help(argv, where):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rlhf_cli", *argv], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="300"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and where in lines[0], lines[0]
    assert lines[0].endswith(f"see `rlhf {' '.join(a for a in argv[:2] if not a.startswith('-'))} --help`")
