"""The real `rlhf` CLI driven with CliRunner on the tiny model: files produced, manifests, exit codes, messages.

Training runs use 2-3 optimiser steps, so these tests check plumbing, not learning (see test_learning.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import EXAMPLES, invoke, ok, one_error, write_jsonl

from rlhf_cli.core.config import resolve
from rlhf_cli.core.errors import DataError
from rlhf_cli.core.manifest import MANIFEST, read_manifest, write_manifest
from rlhf_cli.core.stages import command_for
from rlhf_cli.data import load_prefs, load_sft
from rlhf_cli.stages.sft.args import SFTArgs

# one torch thread: on a small shared machine two threads that fight other processes are several times slower
FAST = ["--max-steps", "2", "--batch-size", "2", "--threads", "1"]
SHARED_FLAGS = ["--model", "--data", "--eval-data", "--out", "--run", "--config", "--max-steps", "--epochs", "--lr",
                "--batch-size", "--grad-accum", "--max-length", "--seed", "--lora", "--max-samples"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def rows_in(path: Path) -> int:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return len(list(csv.reader(f))) - 1
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.name == MANIFEST else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module", autouse=True)
def wide_stdout():
    """Rich wraps stdout at 80 columns when it is not a terminal; a wide console keeps each result on one line."""
    from rlhf_cli.cli import display

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(display.out, "width", 400)
        yield


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """One finished sft -> reward hand-off through --run, shared by the tests that only read it."""
    r = tmp_path_factory.mktemp("cli") / "demo"
    sft = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--run", r, "--max-length", 96,
                 *FAST)
    reward = invoke("reward", "--run", r, "--data", EXAMPLES / "prefs_ranked.jsonl", *FAST)
    return SimpleNamespace(dir=r, sft=sft, reward=reward)


# ---------------------------------------------------------------------------------------------------------
# sft on every example format


@pytest.mark.parametrize("name,fmt", [
    ("sft_messages.jsonl", "messages"), ("sft_alpaca.jsonl", "alpaca"),
    ("sft_prompt_completion.jsonl", "prompt-completion"), ("sft_prompt_response.csv", "prompt-response"),
    ("sft_transcript.jsonl", "transcript"),
])
def test_sft_on_each_example_file(tiny, tmp_path, name, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    result = ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / name, "--out", out, "--max-length", 128, *FAST))
    assert f"{EXAMPLES / name}: {fmt} format, {rows_in(EXAMPLES / name)} rows read" in result.stderr
    assert f"next: rlhf reward --model {out} --data PREFS.jsonl" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no .partial left behind

    m = manifest(out)
    assert m["stage"] == "sft" and m["parents"] == [str(tiny)]
    train = m["data"]["train"]
    assert (train["format"], train["rows_read"]) == (fmt, rows_in(EXAMPLES / name))
    assert train["kept"] == load_sft(str(EXAMPLES / name)).kept
    assert train["fingerprint"] == load_sft(str(EXAMPLES / name)).fingerprint()
    assert m["data"]["eval"] is None
    assert m["metrics"]["steps"] == 2 and math.isfinite(m["metrics"]["train_loss"])
    assert m["args"]["max_length"] == 128 and m["args"]["data"] == str(EXAMPLES / name)
    assert {"transformers", "trl", "torch"} <= set(m["versions"])

    # a plain Hugging Face folder: loads with transformers alone, chat template included
    assert (out / "chat_template.jinja").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(tiny)
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(convo, tokenize=False) == original.apply_chat_template(convo, tokenize=False)
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.config.num_hidden_layers == 2


def test_sft_alpaca_sample_with_eval_split(tiny, tmp_path):
    out = tmp_path / "sft"
    data = EXAMPLES / "alpaca_sft_train.jsonl"
    ok(invoke("sft", "--model", tiny, "--data", data, "--max-samples", 8,
              "--eval-split", 0.25, "--out", out, "--max-length", 128, *FAST))
    m = manifest(out)
    assert m["data"]["train"]["rows_read"] == rows_in(data) == 300
    assert (m["data"]["train"]["kept"], m["data"]["eval"]["kept"]) == (6, 2)
    assert math.isfinite(m["metrics"]["eval_loss_before"]) and math.isfinite(m["metrics"]["eval_loss"])


# ---------------------------------------------------------------------------------------------------------
# --run hand-off: sft -> reward -> eval reward


def test_run_hand_off_sft_to_reward(run, tiny):
    ok(run.sft)
    ok(run.reward)
    sft_dir, rm_dir = run.dir / "sft", run.dir / "reward"
    assert f"next: rlhf reward --run {run.dir} --data PREFS.jsonl" in run.sft.stdout
    assert f"next: rlhf eval reward --model {rm_dir} --data PREFS.jsonl" in run.reward.stdout
    assert sorted(p.name for p in run.dir.iterdir()) == ["reward", "sft"]

    assert f"inherited max_length=96 from {sft_dir}" in run.reward.stderr
    s, r = manifest(sft_dir), manifest(rm_dir)
    assert s["stage"] == "sft" and r["stage"] == "reward"
    assert r["parents"] == [str(sft_dir)] and r["args"]["model"] == str(sft_dir)
    assert r["args"]["max_length"] == s["args"]["max_length"] == 96
    prefs = load_prefs(str(EXAMPLES / "prefs_ranked.jsonl"))
    assert r["data"]["train"]["kept"] == r["metrics"]["pairs"] == prefs.kept
    assert r["data"]["train"]["prompts"] == r["metrics"]["prompts"] == prefs.prompts
    assert r["data"]["train"]["dropped"] == dict(prefs.dropped)
    assert r["metrics"]["steps"] == 2
    assert (rm_dir / "rlhf_config.yaml").read_text().startswith("# rlhf reward --config rlhf_config.yaml\n")

    cfg = json.loads((rm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert len(cfg["id2label"]) == 1  # num_labels == 1


def test_stage_folders_load_without_rlhf_cli(run):
    """A fresh interpreter loads both folders with transformers alone and uses them."""
    ok(run.reward)
    script = textwrap.dedent("""
        import json, sys
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        sft, rm = sys.argv[1:3]
        tok = AutoTokenizer.from_pretrained(sft)
        lm = AutoModelForCausalLM.from_pretrained(sft)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
        gen = lm.generate(**tok(text, return_tensors="pt"), max_new_tokens=3, do_sample=False)
        rtok = AutoTokenizer.from_pretrained(rm)
        rmodel = AutoModelForSequenceClassification.from_pretrained(rm)
        with torch.no_grad():
            score = rmodel(**rtok(["hello", "a longer text"], return_tensors="pt", padding=True)).logits
        print(json.dumps({"rlhf_cli": any(k.startswith("rlhf_cli") for k in sys.modules),
                          "generated": gen.shape[1] > 0, "score_shape": list(score.shape),
                          "num_labels": rmodel.config.num_labels, "rm_pad": rmodel.config.pad_token_id,
                          "tok_pad": rtok.pad_token_id, "eos": rtok.eos_token_id}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", script, str(run.dir / "sft"), str(run.dir / "reward")],
                          capture_output=True, text=True, env=env, cwd=run.dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rlhf_cli"] is False and res["generated"] is True
    assert res["score_shape"] == [2, 1] and res["num_labels"] == 1
    assert res["rm_pad"] == res["tok_pad"] != res["eos"]


def test_eval_reward_run_json(run):
    ok(run.reward)
    data = EXAMPLES / "prefs_explicit.jsonl"
    result = ok(invoke("eval", "reward", "--run", run.dir, "--data", data, "--json", "--threads", 1))
    res = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert {"accuracy", "mean_margin", "pairs", "prompts", "model", "data"} <= set(res)
    assert res["pairs"] == load_prefs(str(data)).kept == rows_in(data)
    assert res["model"] == str(run.dir / "reward") and res["data"] == str(data)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["mean_margin"] == pytest.approx(res["mean_chosen_score"] - res["mean_rejected_score"], abs=1e-5)
    assert f"{data}: explicit format" in result.stderr


def test_eval_reward_table_and_max_samples(run):
    ok(run.reward)
    hh_test = EXAMPLES / "hh_prefs_test.jsonl"
    result = ok(invoke("eval", "reward", "--model", run.dir / "reward", "--data", hh_test,
                       "--max-samples", 5, "--threads", 1))
    assert "accuracy" in result.stdout and "mean_margin" in result.stdout
    res = json.loads(ok(invoke("eval", "reward", "--model", run.dir / "reward", "--data",
                               hh_test, "--max-samples", 5, "--json", "--threads", 1)).stdout)
    assert (res["pairs"], res["prompts"]) == (5, 5)


def test_reward_on_hh_sample_with_eval_split(tiny, tmp_path):
    out = tmp_path / "rm"
    result = ok(invoke("reward", "--model", tiny, "--data", EXAMPLES / "hh_prefs_train.jsonl", "--max-samples", 8,
                       "--eval-split", 0.25, "--out", out, "--max-length", 128, *FAST))
    assert "held out 2 pairs (2 prompts) for eval" in result.stderr
    m = manifest(out)
    assert m["parents"] == [str(tiny)]
    assert (m["metrics"]["pairs"], m["metrics"]["prompts"], m["metrics"]["eval_pairs"]) == (6, 6, 2)
    assert 0 <= m["metrics"]["eval_accuracy_before"] <= 1 and 0 <= m["metrics"]["eval_accuracy"] <= 1
    assert "inherited" not in result.stderr  # a plain model folder has nothing to inherit


def test_reward_margin_ungrouped_with_eval_data(tiny, tmp_path):
    out = tmp_path / "rm"
    ok(invoke("reward", "--model", tiny, "--data", EXAMPLES / "prefs_ranked.jsonl", "--eval-data",
              EXAMPLES / "prefs_explicit.jsonl", "--margin", "--no-group-by-prompt", "--out", out,
              "--max-length", 128, *FAST))
    m = manifest(out)
    assert m["args"]["margin"] is True and m["args"]["group_by_prompt"] is False
    assert m["metrics"]["eval_pairs"] == rows_in(EXAMPLES / "prefs_explicit.jsonl")
    assert m["data"]["eval"]["source"] == str(EXAMPLES / "prefs_explicit.jsonl")
    assert math.isfinite(m["metrics"]["train_loss"])


# ---------------------------------------------------------------------------------------------------------
# LoRA


def test_sft_lora_merged_keeps_adapter(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    result = ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", out, "--lora",
                       "--lr", "1e-2", "--max-length", 128, *FAST))
    assert "LoRA r=16" in result.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not any("lora" in k for k in merged.state_dict())
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_merged, base.model.layers[0].self_attn.q_proj.weight)  # adapters were merged in
    m = manifest(out)
    assert m["args"]["lora"] is True and m["args"]["lora_merge"] is True and m["args"]["lr"] == 1e-2


def test_sft_lora_no_merge_keeps_only_the_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", out, "--lora",
              "--no-lora-merge", "--max-length", 128, *FAST))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert manifest(out)["args"]["lora_merge"] is False
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["task_type"] == "CAUSAL_LM"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out / "adapter")
    assert any("lora_A" in k for k in model.state_dict())


def test_lora_with_frozen_layers_adapts_only_the_layers_above(tiny, tmp_path):
    """--lora --freeze-layers N: adapters on the layers above N only (so no backward pass runs below them)."""
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", out, "--lora",
              "--no-lora-merge", "--freeze-layers", 1, "--max-length", 128, *FAST))
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    layers = {k.split(".layers.")[1].split(".")[0] for k in keys if "lora_" in k}
    assert layers == {"1"}, sorted(keys)  # the tiny model has layers 0 and 1
    assert {k.split(".")[-3] for k in keys if "lora_A" in k} >= {"q_proj", "down_proj"}  # all-linear, spelled out


def test_reward_lora_merged_from_sft_stage(run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    ok(run.sft)
    out = tmp_path / "rm"
    result = ok(invoke("reward", "--model", run.dir / "sft", "--data", EXAMPLES / "prefs_explicit.jsonl", "--out",
                       out, "--lora", "--max-length", 80, *FAST))
    assert "--max-length 80 overrides the parent's 96" in result.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    assert not any("lora" in k for k in model.state_dict())
    m = manifest(out)
    assert m["stage"] == "reward" and m["args"]["lora"] is True and m["args"]["max_length"] == 80
    res = json.loads(ok(invoke("eval", "reward", "--model", out, "--data", EXAMPLES / "prefs_explicit.jsonl",
                               "--json", "--threads", 1)).stdout)
    assert res["pairs"] == rows_in(EXAMPLES / "prefs_explicit.jsonl")


# ---------------------------------------------------------------------------------------------------------
# --config YAML and flags


def test_config_yaml_with_flag_override_and_overwrite(tiny, tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "old_weights.bin").write_text("old")
    write_manifest(out, stage="sft", parents=[], args={}, data={}, metrics={}, started=time.time())
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"# rlhf sft --config {cfg.name}\nmodel: {tiny}\ndata: {EXAMPLES / 'sft_alpaca.jsonl'}\n"
                   "max_steps: 3\nbatch-size: 2\nlr: 1.0e-4\nseed: 7\nmax_length: 96\nlr_scheduler: constant\n"
                   "threads: 1\n",
                   encoding="utf-8")
    ok(invoke("sft", "--config", cfg, "--out", out, "--max-steps", 2, "--overwrite"))
    assert not (out / "old_weights.bin").exists()  # replaced by the new stage
    m = manifest(out)
    args = m["args"]
    assert args["max_steps"] == 2  # flag beats YAML
    assert (args["seed"], args["batch_size"], args["lr"], args["lr_scheduler"], args["max_length"]) == \
        (7, 2, 1e-4, "constant", 96)  # YAML beats defaults
    assert args["grad_accum"] == 1 and args["overwrite"] is True
    assert m["metrics"]["steps"] == 2
    saved = out / "rlhf_config.yaml"
    assert saved.read_text().startswith("# rlhf sft --config rlhf_config.yaml\n")
    assert yaml.safe_load(saved.read_text()) == {k: v for k, v in args.items() if k != "resolved_model"}
    assert resolve(SFTArgs, saved).max_steps == 2


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-4\n")
    one_error(invoke("sft", "--config", cfg, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", tmp_path / "o"), 2,
              f"{cfg}: unknown key 'learning_rate'; expected one of:")
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path):
    one_error(invoke("reward", "--config", tmp_path / "nope.yaml"), 2, "no such file")


# ---------------------------------------------------------------------------------------------------------
# Chinese end to end


def test_chinese_data_end_to_end(tiny, tmp_path):
    r = tmp_path / "中文运行"
    ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "zh_sft.jsonl", "--run", r, "--max-length", 128, *FAST))
    ok(invoke("reward", "--run", r, "--data", EXAMPLES / "zh_prefs.jsonl", *FAST))
    assert manifest(r / "sft")["data"]["train"]["rows_read"] == rows_in(EXAMPLES / "zh_sft.jsonl")
    assert manifest(r / "reward")["metrics"]["pairs"] == load_prefs(str(EXAMPLES / "zh_prefs.jsonl")).kept
    res = json.loads(ok(invoke("eval", "reward", "--run", r, "--data", EXAMPLES / "zh_prefs.jsonl",
                               "--json", "--threads", 1)).stdout)
    assert res["pairs"] == rows_in(EXAMPLES / "zh_prefs.jsonl")
    assert res["model"] == str(r / "reward")


def test_chinese_oasst_samples_train_and_print(tiny, tmp_path):
    """The shipped samples of the real Chinese oasst1 data: sft and reward run, and Chinese text prints unescaped."""
    r = tmp_path / "run"
    sft = ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "oasst_zh_sft.jsonl", "--eval-split", 0.25,
                    "--max-samples", 8, "--run", r, "--max-length", 128, *FAST))
    assert "held out 2 rows for eval" in sft.stderr
    ok(invoke("reward", "--run", r, "--data", EXAMPLES / "oasst_zh_prefs.jsonl", "--max-samples", 6, *FAST))
    zh_file = tmp_path / "偏好.jsonl"  # a pair the reward model was not trained on, in a file with a Chinese name
    last = (EXAMPLES / "oasst_zh_prefs.jsonl").read_text(encoding="utf-8").splitlines()[-1]
    zh_file.write_text(last + "\n", encoding="utf-8")
    res = ok(invoke("eval", "reward", "--run", r, "--data", zh_file, "--json", "--threads", 1))
    assert "偏好.jsonl" in res.stdout and json.loads(res.stdout)["pairs"] == 1


# ---------------------------------------------------------------------------------------------------------
# Error paths: one `error:` line, non-zero exit, no traceback, nothing damaged


def test_bad_data_line(tmp_path):
    out = tmp_path / "o"
    one_error(invoke("sft", "--data", EXAMPLES / "bad_sft.jsonl", "--out", out), 1, "bad_sft.jsonl:2", "not valid JSON")
    assert not out.exists() and not (tmp_path / "o.partial").exists()
    one_error(invoke("reward", "--data", EXAMPLES / "bad_prefs.jsonl", "--out", out), 1, "bad_prefs.jsonl:2",
              "'rejected'")


def test_bad_eval_data_named_with_its_flag(tiny, tmp_path):
    one_error(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--eval-data",
                     EXAMPLES / "bad_sft.jsonl", "--out", tmp_path / "o"), 1, "bad_sft.jsonl:2")
    one_error(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--eval-data",
                     tmp_path / "missing.jsonl", "--out", tmp_path / "o"), 1, "--eval-data ", "no such file")


def test_missing_data(tmp_path):
    one_error(invoke("sft", "--out", tmp_path / "o"), 2, "--data: missing")
    one_error(invoke("reward", "--out", tmp_path / "o"), 2, "--data: missing")
    one_error(invoke("eval", "reward", "--model", tmp_path), 2, "--data: missing")
    one_error(invoke("sft", "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o"), 1, "no such file")


def test_missing_out_and_run():
    one_error(invoke("sft", "--data", EXAMPLES / "sft_alpaca.jsonl"), 2,
              "--out: missing; pass --out DIR or --run DIR (writes DIR/sft)")
    one_error(invoke("reward", "--data", EXAMPLES / "prefs_explicit.jsonl"), 2,
              "--out: missing; pass --out DIR or --run DIR (writes DIR/reward)")
    one_error(invoke("eval", "reward", "--data", EXAMPLES / "prefs_explicit.jsonl"), 2, "--model: missing")


def test_sft_refuses_a_reward_stage(run, tmp_path):
    ok(run.reward)
    one_error(invoke("sft", "--model", run.dir / "reward", "--data", EXAMPLES / "sft_alpaca.jsonl", "--out",
                     tmp_path / "o"), 1, f"--model {run.dir / 'reward'}: is a reward stage", command_for("sft"))
    assert not (tmp_path / "o").exists()


def test_reward_goes_on_training_a_reward_stage(run, tmp_path):
    """A reward stage as --model is a start for the next round's RM (the pipeline's reward_init: previous)."""
    ok(run.reward)
    res = invoke("reward", "--model", run.dir / "reward", "--data", EXAMPLES / "prefs_explicit.jsonl", "--out",
                 tmp_path / "o", "--max-steps", "1")
    assert res.exit_code == 0, res.output
    assert "a reward stage; training goes on from its weights and score head" in res.output
    assert read_manifest(tmp_path / "o").data["parents"] == [str(run.dir / "reward")]


def test_eval_reward_refuses_an_sft_stage(run):
    ok(run.sft)
    one_error(invoke("eval", "reward", "--model", run.dir / "sft", "--data", EXAMPLES / "prefs_explicit.jsonl"), 1,
              f"--model {run.dir / 'sft'}: is an sft stage, expected a reward stage", command_for("reward"))


def test_eval_reward_refuses_a_plain_causal_lm(tiny):
    one_error(invoke("eval", "reward", "--model", tiny, "--data", EXAMPLES / "prefs_explicit.jsonl"), 1,
              "not a reward model", "LlamaForCausalLM")


def test_run_folder_without_finished_parent(tmp_path):
    r = tmp_path / "r"
    one_error(invoke("reward", "--run", r, "--data", EXAMPLES / "prefs_explicit.jsonl"), 1,
              f"--run {r / 'sft'}: no such folder; expected a finished sft stage")
    (r / "sft").mkdir(parents=True)
    (r / "sft" / "config.json").write_text("{}")  # an interrupted stage: files but no manifest
    one_error(invoke("reward", "--run", r, "--data", EXAMPLES / "prefs_explicit.jsonl"), 1,
              f"--run {r / 'sft'}: no {MANIFEST}, so not a finished stage", command_for("sft"))
    assert not (r / "reward").exists()
    one_error(invoke("eval", "reward", "--run", r, "--data", EXAMPLES / "prefs_explicit.jsonl"), 1,
              f"--run {r / 'reward'}: no such folder; expected a finished reward stage")


def test_out_exists_without_overwrite_leaves_it_untouched(run, tiny):
    ok(run.sft)
    before = snapshot(run.dir / "sft")
    one_error(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--run", run.dir, *FAST), 2,
              f"--out {run.dir / 'sft'}: already holds a finished sft stage; pass --overwrite")
    assert snapshot(run.dir / "sft") == before
    assert not (run.dir / "sft.partial").exists()


def test_failure_mid_stage_keeps_the_finished_stage(run, tiny, tmp_path, monkeypatch):
    """A stage that fails after it started writing leaves the finished folder as it was, and OUT.partial."""
    ok(run.sft)
    import shutil

    import rlhf_cli.core.training

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(rlhf_cli.core.training, "save_model", disk_full)
    r = tmp_path / "r"
    shutil.copytree(run.dir / "sft", r / "sft")
    before = snapshot(r / "sft")
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--run", r, "--overwrite",
                    *FAST)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.output
    assert "No space left on device" in result.stderr
    assert snapshot(r / "sft") == before
    assert (r / "sft.partial").is_dir()


def test_bad_lora_targets_name_the_flag_and_the_choices(tiny, tmp_path):
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", tmp_path / "o",
                    "--lora", "--lora-targets", "no_such_proj", *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --lora-targets no_such_proj: no module named no_such_proj in this model; expected all-linear " \
           "or a comma list of: " in result.stderr
    assert "q_proj" in result.stderr


@pytest.mark.parametrize("flags,code,fragment", [
    (["--batch-size", "0"], 2, "--batch-size 0: expected a whole number >= 1"),
    (["--grad-accum", "0"], 2, "--grad-accum 0: expected a whole number >= 1"),
    (["--max-steps", "0"], 2, "--max-steps 0: expected a whole number >= 1"),
    (["--epochs", "0"], 2, "--epochs 0.0: expected a positive number"),
    (["--lr", "5"], 2, "--lr 5.0: expected a small positive number"),
    (["--max-length", "8"], 2, "--max-length 8: expected at least 16 tokens"),
    (["--lr-scheduler", "wobbly"], 2, "--lr-scheduler: 'wobbly' is not one of: linear, cosine"),
    (["--format", "ranked"], 2, "--format: 'ranked' is not one of: auto, messages"),
    (["--eval-split", "2"], 2, "--eval-split 2.0: expected a fraction between 0 and 1"),
])
def test_bad_flag_values(tmp_path, flags, code, fragment):
    one_error(invoke("sft", "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", tmp_path / "o", *flags), code,
              fragment)
    assert not (tmp_path / "o").exists()


def test_unparseable_flag_value_is_a_usage_error(tmp_path):
    result = invoke("sft", "--data", EXAMPLES / "sft_alpaca.jsonl", "--out", tmp_path / "o", "--batch-size", "abc")
    assert result.exit_code == 2
    assert "Invalid value for '--batch-size'" in result.stderr and "Traceback" not in result.output


def test_debug_reraises_the_library_error(tmp_path):
    result = invoke("sft", "--data", EXAMPLES / "bad_sft.jsonl", "--out", tmp_path / "o", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, DataError) and "bad_sft.jsonl:2" in str(result.exception)


def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "rlhf_cli", "sft", "--data", str(EXAMPLES / "bad_sft.jsonl"), "--out",
           str(tmp_path / "o")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1 and "bad_sft.jsonl:2" in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=dict(env, COLUMNS="300"),
                           timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "_read_file" in debug.stderr  # the frames down to where the library raised
    assert "DataError: " in debug.stderr and "bad_sft.jsonl:2: not valid JSON" in debug.stderr


def test_unknown_ranked_row_is_an_error_not_a_crash(tmp_path):
    data = write_jsonl(tmp_path / "rk.jsonl", [{"prompt": "q", "responses": ["a", "b"]},
                                               {"prompt": "q2", "chosen": "x", "rejected": "y"}])
    one_error(invoke("reward", "--data", data, "--out", tmp_path / "o"), 1, "rk.jsonl:2: field 'responses'")


# ---------------------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("command", [["sft"], ["reward"]])
def test_training_help_lists_the_shared_flags(command):
    result = ok(invoke(*command, "--help"))
    for flag in SHARED_FLAGS + ["--eval-split", "--overwrite", "--format", "--debug"]:
        assert f"  {flag} " in result.stdout, flag
    assert "  --lora / --no-lora " in result.stdout and "  --lora-merge / --no-lora-merge " in result.stdout
    assert "--assistant-only-loss" in result.stdout if command == ["sft"] else "--margin" in result.stdout


def test_top_level_and_other_help():
    top = ok(invoke("--help")).stdout
    for cmd in ("sft", "reward", "eval", "models"):
        assert f"  {cmd} " in top
    ev = ok(invoke("eval", "reward", "--help")).stdout
    for flag in ("--model", "--data", "--run", "--json", "--max-samples", "--max-length", "--batch-size", "--config"):
        assert f"  {flag} " in ev, flag
    assert "  --prepare " in ok(invoke("models", "--help")).stdout
    assert "  reward " in ok(invoke("eval", "--help")).stdout


def test_stages_write_metrics_jsonl_per_step(run):
    ok(run.sft)
    ok(run.reward)
    sft = [json.loads(x) for x in (run.dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    rm = [json.loads(x) for x in (run.dir / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2] and all(r["loss"] > 0 and "learning_rate" in r for r in sft)
    assert [r["step"] for r in rm] == [1, 2] and all(0 <= r["accuracy"] <= 1 and "margin" in r for r in rm)


def test_python_dash_m_and_console_script_answer_help():
    for cmd in ([sys.executable, "-m", "rlhf_cli", "--help"], [str(Path(sys.executable).parent / "rlhf"), "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and "sft" in r.stdout and "reward" in r.stdout and "ppo" in r.stdout


def test_progress_lines_when_stderr_is_a_log_file(tiny, tmp_path):
    """A live display shows nothing in a log file until the end; there the reporter writes plain lines."""
    log = tmp_path / "stderr.log"
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "rlhf_cli", "sft", "--model", str(tiny), "--data",
                            str(EXAMPLES / "sft_messages.jsonl"), "--max-steps", "3", "--batch-size", "2",
                            "--threads", "1", "--out", str(tmp_path / "o")], stdout=subprocess.DEVNULL, stderr=f,
                           timeout=300)
    text = log.read_text(encoding="utf-8")
    assert r.returncode == 0, text
    lines = [x for x in text.splitlines() if x.startswith("sft ")]
    assert lines[0].startswith("sft 1/3") and lines[-1].startswith("sft 3/3") and "loss" in lines[-1], text
    assert all("elapsed" in x and "eta" in x for x in lines) and "\x1b" not in text
