"""End-to-end runs on the real default model, SmolLM2-135M-Instruct from its embedded GGUF (minutes, `slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import EXAMPLES, invoke, learnable_prefs, write_jsonl

from rlhf_cli.core.manifest import MANIFEST
from rlhf_cli.core.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def test_embedded_default_model_converts_into_a_plain_hf_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    r = invoke("models", "--prepare", check=True)
    folder = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert "ready" in r.stdout and (folder / "model.safetensors").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    # loads and generates with transformers alone, greedy, through the model's own chat template
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r})
m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
assert tok.pad_token_id != tok.eos_token_id
x = tok.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
y = m.generate(**x, max_new_tokens=12, do_sample=False)
print(tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Paris" in out


def test_sft_then_reward_then_eval_on_the_default_model(tmp_path):
    run = tmp_path / "run"
    invoke("sft", "--model", DEFAULT_MODEL, "--data", EXAMPLES / "sft_messages.jsonl", "--run", run,
           "--max-steps", 2, "--batch-size", 2, "--max-length", 256, "--eval-data", EXAMPLES / "sft_alpaca.jsonl",
           check=True)
    sft = json.loads((run / "sft" / MANIFEST).read_text())
    assert sft["stage"] == "sft" and sft["metrics"]["steps"] == 2 and sft["metrics"]["eval_loss"] > 0
    r = invoke("reward", "--run", run, "--data", EXAMPLES / "prefs_ranked.jsonl", "--max-samples", 4,
               "--max-steps", 2, "--batch-size", 4, check=True)
    assert "inherited max_length=256" in r.stderr
    rm = json.loads((run / "reward" / MANIFEST).read_text())
    assert rm["stage"] == "reward" and rm["parents"] == [str(run / "sft")]
    res = json.loads(invoke("eval", "reward", "--run", run, "--data", EXAMPLES / "prefs_explicit.jsonl",
                            "--max-samples", 6, "--json", check=True).stdout)
    assert res["pairs"] == 6 and 0.0 <= res["accuracy"] <= 1.0


def test_reward_model_learns_a_clear_preference_on_the_default_model(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", learnable_prefs(48, seed=3))
    out = tmp_path / "rm"
    invoke("reward", "--model", DEFAULT_MODEL, "--data", data, "--out", out, "--eval-split", 0.25,
           "--freeze-layers", 26, "--lr", 1e-4, "--batch-size", 8, "--epochs", 2, "--max-length", 128, check=True)
    m = json.loads((out / MANIFEST).read_text())["metrics"]
    assert m["eval_pairs"] == 12
    assert m["eval_accuracy_before"] <= 0.75  # a fresh random head: about chance (or worse)
    assert m["eval_accuracy"] >= 0.9


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_default_sampling_answers_a_plain_question_on_the_default_model(seed):
    """The chat's default sampling settings (SmolLM2's recommended temperature 0.2, top-p 0.9) keep the small
    default model on the question, whatever the seed."""
    r = invoke("chat", "--prompt", "What is the capital of France? Answer in one word.", "--seed", seed,
               "--max-new-tokens", 32, check=True)
    assert "Paris" in r.stdout
    assert "sampling: temperature 0.2, top_p 0.9, top_k 0, repetition_penalty 1 (from the defaults" in r.stderr
