"""`rlhf dpo`: the policy learns a known preference, every method runs, ranked lists, LoRA, resume, bad input.

The learnable preference: to every prompt the chosen answer is "Yes" and the rejected one "No". After a few DPO
steps the implicit reward margin on held-out pairs rises, and the policy's most likely first answer token is
"Yes". The reward model that judges `rlhf eval policy` is built by hand so its preference is known exactly (as in
tests/test_eval_policy.py): a Llama sequence classifier with no layers and a chat template that writes nothing
after the answer, whose score is `w . RMSNorm(embedding(last token))` with `w` the unit embedding of the last
token of an answer "Yes": a "Yes" scores the most any answer can. Both models decode greedily
(`--temperature 0`) one token (`--max-new-tokens 1`): a tiny random model's next-token distribution is nearly
flat, so sampled answers would mostly be noise, while its most likely token is exactly what DPO moved; and the RM
reads the last token, so the answer is that one token.

`--threads 1` throughout: on a small shared machine, two torch threads fighting other processes are slower.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import EXAMPLES, invoke, ok, one_error, token_rm, write_jsonl

from rlhf_cli.core.errors import ConfigError, DataError
from rlhf_cli.core.interrupt import Interrupted
from rlhf_cli.core.manifest import MANIFEST, write_manifest
from rlhf_cli.core.progress import Reporter
from rlhf_cli.data.feedback import load_feedback
from rlhf_cli.stages.dpo.args import LOSSES, DPOArgs

TOPICS = ["the weather", "my homework", "a recipe", "the bus", "a book", "my garden", "the news", "a song"]
FAST = ["--threads", 1, "--max-length", 64]


def yes_no(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}: is {TOPICS[i % len(TOPICS)]} fun?", "chosen": "Yes", "rejected": "No"}
            for i in range(start, start + n)]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def yes_token(tok) -> int:
    text = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Yes"}],
                                   tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"][-1]


def build_yes_rm(dest: Path, policy: Path) -> Path:
    """The hand-set reward model of the module docstring (it prefers the answer "Yes"), as a reward stage."""
    return token_rm(dest, policy, yes_token, max_length=64)


@pytest.fixture(scope="module")
def w(tiny, tmp_path_factory):
    """One DPO run on the yes/no preference (32 pairs, 8 held out), and the files around it."""
    root = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(root / "yn.jsonl", yes_no(40))
    out = root / "dpo"
    result = ok(invoke("dpo", "--model", tiny, "--data", data, "--eval-split", 0.2, "--out", out, "--max-steps", 6,
                       "--batch-size", 4, "--lr", "1e-2", *FAST))
    return SimpleNamespace(root=root, data=data, out=out, result=result, tiny=tiny)


def test_dpo_raises_the_implicit_reward_margin_on_held_out_pairs(w):
    m = manifest(w.out)
    assert m["stage"] == "dpo" and m["parents"] == [str(w.tiny)]
    assert (m["args"]["method"], m["args"]["loss"], m["args"]["beta"]) == ("dpo", "sigmoid", 0.1)
    assert m["args"]["trainer"] == "trl.DPOTrainer"
    assert m["args"]["reference"] == "reference: the start model, its log-probabilities computed once before training"
    got = m["metrics"]
    assert (got["pairs"], got["eval_pairs"], got["steps"]) == (32, 8, 6)
    # before training the policy is its reference: every implicit reward is 0
    assert got["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert got["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)
    assert got["eval_reward_margin"] > 0.2
    assert got["eval_reward_accuracy"] == 1.0 > got["eval_reward_accuracy_before"]
    assert got["eval_loss"] < got["eval_loss_before"]
    # the margin is beta times the change of log p(Yes) - log p(No): chosen up relative to rejected
    gap_before = got["eval_logps_chosen_before"] - got["eval_logps_rejected_before"]
    gap_after = got["eval_logps_chosen"] - got["eval_logps_rejected"]
    assert gap_after - gap_before == pytest.approx(got["eval_reward_margin"] / 0.1, rel=0.05)
    assert "eval implicit reward margin 0.000 -> " in w.result.stderr
    assert got["memory"]["parts_gb"]["weights"] > 0
    lines = [json.loads(x) for x in (w.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))
    assert all("rewards/margins" in r for r in lines if "loss" in r)
    assert (w.out / "rlhf_config.yaml").read_text().startswith("# rlhf dpo --config rlhf_config.yaml")
    assert not (w.out / "trainer").exists() and not (w.out / "resume.json").exists()
    assert f"rlhf eval policy --model {w.out} --baseline {w.tiny}" in " ".join(w.result.stdout.split())


def test_dpo_policy_beats_its_start_model_judged_by_a_reward_model(w):
    rm = build_yes_rm(w.root / "rm", w.tiny)
    prompts = write_jsonl(w.root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in yes_no(8, start=100)])
    res = json.loads(ok(invoke("eval", "policy", "--model", w.out, "--baseline", w.tiny, "--reward", rm,
                               "--prompts", prompts, "--temperature", 0, "--max-new-tokens", 1, "--json",
                               "--threads", 1)).stdout)
    assert res["prompts"] == 8
    assert res["win_rate"] >= 0.75 and res["win_rate_ci"][0] > 0.5, res


def test_reference_computed_once_trains_as_the_reference_every_step(w, monkeypatch):
    """--precompute-ref (the default): the reference's log-probabilities come from one pass before training (TRL's
    compute_ref_log_probs, once per micro-batch of one epoch) and the policy takes the same steps as with the
    reference run beside it in every step."""
    import trl

    from rlhf_cli.stages.dpo.train import run_dpo

    calls = []
    real = trl.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(trl.DPOTrainer, "compute_ref_log_probs",
                        lambda self, model, inputs: calls.append(len(inputs["input_ids"])) or real(self, model, inputs))
    losses, seen, weights = {}, {}, {}
    for once in (True, False):
        out = w.root / f"once-{once}"
        calls.clear()
        run_dpo(DPOArgs(model=str(w.tiny), data=str(w.data), max_samples=8, out=str(out), epochs=3, batch_size=4,
                        micro_batch_size=2, lr=1e-2, threads=1, max_length=64, precompute_ref=once), Reporter())
        losses[once] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(x)]
        seen[once] = list(calls)
        weights[once] = manifest(out)["metrics"]["memory"]["parts_gb"]["weights"]
        assert manifest(out)["args"]["reference"] == "reference: the start model" + (
            ", its log-probabilities computed once before training" if once else "")
    # 8 pairs in micro-batches of 2 pairs (4 sequences each): 4 reference passes for all 3 epochs, none per step
    assert seen == {True: [4, 4, 4, 4], False: []}
    assert len(losses[True]) == 6 and losses[True][0] == pytest.approx(0.6931, abs=1e-3)
    assert losses[True] == pytest.approx(losses[False], abs=2e-3)
    # the memory estimate holds a second copy of the weights only for the reference run beside the policy
    assert weights[False] > weights[True] > 0


def test_dpo_folder_is_a_normal_causal_lm_that_chat_answers_with(w):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(w.out)
    result = ok(invoke("chat", w.out, "--prompt", "hello", "--max-new-tokens", 3, "--threads", 1))
    assert result.stdout.strip()


@pytest.mark.parametrize("method,loss,trainer", [("kto", "kto", "trl.KTOTrainer"),
                                                 ("orpo", "orpo", "trl.experimental.orpo.ORPOTrainer"),
                                                 ("cpo", "hinge", "trl.experimental.cpo.CPOTrainer"),
                                                 ("simpo", "simpo", "trl.experimental.cpo.CPOTrainer")])
def test_every_method_trains_end_to_end(w, method, loss, trainer):
    ev = write_jsonl(w.root / f"ev_{method}.jsonl", yes_no(2, start=200))
    where = ["--model", w.tiny, "--out", w.root / method]
    if method == "simpo":  # --run: starts from RUN/sft, writes RUN/dpo
        run = w.root / "run"
        shutil.copytree(w.tiny, run / "sft")
        write_manifest(run / "sft", stage="sft", parents=["x"], args={}, data={}, metrics={}, started=time.time())
        where = ["--run", run]
    if method == "cpo":  # --config: settings from YAML (a flag would override them)
        cfg = w.root / "cpo.yaml"
        cfg.write_text("method: cpo\nloss: hinge\nbeta: 0.2\n", encoding="utf-8")
        where += ["--config", cfg]
    else:
        where += ["--method", method]
    ok(invoke("dpo", *where, "--data", w.data, "--max-samples", 4, "--eval-data", ev, "--max-steps", 1,
              "--batch-size", 2, "--lr", "1e-3", *FAST))
    out = w.root / "run" / "dpo" if method == "simpo" else w.root / method
    m = manifest(out)
    assert m["stage"] == "dpo"
    assert (m["args"]["method"], m["args"]["loss"], m["args"]["trainer"]) == (method, loss, trainer)
    assert m["args"]["beta"] == {"simpo": 2.0, "cpo": 0.2}.get(method, 0.1)
    assert m["metrics"]["steps"] == 1 and "eval_loss" in m["metrics"] and "eval_reward_margin" in m["metrics"]
    if method == "kto":  # 4 pairs -> 4 desirable and 4 undesirable answers
        assert m["metrics"]["rows"] == 8 and m["metrics"]["eval_rows"] == 4
    else:
        assert m["metrics"]["pairs"] == 4 and "eval_reward_accuracy" in m["metrics"]
    if method == "simpo":
        assert m["parents"] == [str(w.root / "run" / "sft")]
    assert (out / "model.safetensors").is_file()


def test_ranked_lists_with_lora_merge_into_a_full_model(w):
    out = w.root / "lora"
    ok(invoke("dpo", "--model", w.tiny, "--data", EXAMPLES / "prefs_ranked.jsonl", "--max-samples", 3,
              "--eval-split", 0.3, "--out", out, "--lora", "--lora-r", 4, "--max-steps", 1, "--batch-size", 2,
              "--lr", "1e-2", "--warmup-ratio", 0, "--threads", 1, "--max-length", 128))
    m = manifest(out)
    # three ranked lists of 4 answers: 6 pairs each, one list held out by prompt
    assert (m["metrics"]["pairs"], m["metrics"]["prompts"], m["metrics"]["eval_pairs"]) == (12, 2, 6)
    assert m["args"]["reference"] == ("reference: the start model (LoRA adapters off), its log-probabilities "
                                      "computed once before training")
    # fresh adapters add nothing, so before training the policy is exactly its reference: every margin is 0
    assert m["metrics"]["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert m["metrics"]["eval_reward_margin"] != 0.0
    # one copy of the weights in memory, as for the full fine-tune whose reference is computed once
    full = manifest(w.out)["metrics"]["memory"]["parts_gb"]["weights"]
    assert m["metrics"]["memory"]["parts_gb"]["weights"] == pytest.approx(full, abs=0.001)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


class StopAt(Reporter):
    """Sends this process SIGTERM after optimiser step `at`, as a user's kill would."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def update(self, step, total, figures, elapsed):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_continues_from_the_checkpoint(w):
    from rlhf_cli.stages.dpo.train import run_dpo

    out = w.root / "cut"
    flags = ["--model", w.tiny, "--data", w.data, "--max-samples", 8, "--out", out, "--max-steps", 4,
             "--batch-size", 2, "--method", "orpo", *FAST]
    args = DPOArgs(model=str(w.tiny), data=str(w.data), max_samples=8, out=str(out), max_steps=4, batch_size=2,
                   method="orpo", threads=1, max_length=64)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 2 of 4"):
        run_dpo(args, StopAt(2))
    assert not out.exists() and (out.with_name("cut.partial") / "trainer" / "checkpoint-2").is_dir()
    other = [f if f != "orpo" else "cpo" for f in flags]
    one_error(invoke("dpo", *other, "--resume"), ConfigError.exit_code,
              "--method cpo: the run being resumed used orpo; resume with the same settings")
    result = ok(invoke("dpo", *flags, "--resume"))
    assert "resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert manifest(out)["metrics"]["steps"] == 4
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]  # the first two steps come from the interrupted run's checkpoint


# ---------------------------------------------------------------------------------------------------------
# Bad input: one error line, nothing written


def refused(result, code: int, out: Path, *fragments: str) -> str:
    line = one_error(result, code, *fragments)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return line


def test_refuses_a_reward_stage_as_the_start_model(w, tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    write_manifest(rm, stage="reward", parents=["x"], args={}, data={}, metrics={}, started=time.time())
    out = tmp_path / "out"
    refused(invoke("dpo", "--model", rm, "--data", w.data, "--out", out, *FAST), 1,
            out, f"--model {rm}: is a reward stage, expected an sft stage", "`rlhf sft --model MODEL")


def test_refuses_data_without_preference_fields(w, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "out"
    refused(invoke("dpo", "--model", w.tiny, "--data", data, "--out", out), DataError.exit_code, out,
            f"{data}:1: cannot tell the data format", "prompt+chosen+rejected")


def test_unknown_loss_lists_the_choices(w, tmp_path):
    out = tmp_path / "out"
    line = refused(invoke("dpo", "--model", w.tiny, "--data", w.data, "--out", out, "--loss", "nope"),
                   ConfigError.exit_code, out, "--loss: 'nope' is not one of: sigmoid, hinge, ipo")
    assert "apo_zero_unpaired" in line and "simpo" in line
    refused(invoke("dpo", "--model", w.tiny, "--data", w.data, "--out", out, "--loss", "kto"),
            ConfigError.exit_code, out, "--loss kto: not a loss of --method dpo; expected one of: sigmoid, hinge")


def test_kto_refuses_data_with_neither_labels_nor_pairs(w, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "hello"}])
    out = tmp_path / "out"
    refused(invoke("dpo", "--model", w.tiny, "--data", data, "--out", out, "--method", "kto"), DataError.exit_code,
            out, f"{data}:1: cannot tell the data format from fields ['completion', 'prompt']",
            "prompt+completion+label")
    labelled = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "hi", "completion": "hello", "label": True},
                                                       {"prompt": "hi", "completion": "go", "label": "meh"}])
    refused(invoke("dpo", "--model", w.tiny, "--data", labelled, "--out", out, "--method", "kto"),
            DataError.exit_code, out, f"{labelled}:2: field 'label': found 'meh'; expected true")
    refused(invoke("dpo", "--model", w.tiny, "--data", labelled, "--out", out), DataError.exit_code, out,
            f"{labelled}:1: unpaired feedback (prompt, completion, label) trains only --method kto")


# ---------------------------------------------------------------------------------------------------------
# Data and TRL facts, no training


def test_ranked_lists_become_kto_rows_without_the_middle_answers(tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["best", "mid", "worst"]},
                                              {"prompt": "q", "responses": ["good", "bad"]}])
    ds = load_feedback(str(data))
    got = sorted((r["prompt"][-1]["content"], r["completion"][0]["content"], r["label"]) for r in ds.rows)
    assert got == [("p", "best", True), ("p", "worst", False), ("q", "bad", False), ("q", "good", True)]
    assert sum(ds.dropped.values()) == 1 and "2 desirable and 2 undesirable answers to 2 prompts" in ds.describe()
    thumbs = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "r", "completion": "x", "label": 1},
                                                {"prompt": "r", "completion": "y", "label": False}])
    ds = load_feedback(str(thumbs))
    assert [(r["completion"][0]["content"], r["label"]) for r in ds.rows] == [("x", True), ("y", False)]
    assert ds.format == "unpaired" and len({r["group"] for r in ds.rows}) == 1


def test_loss_lists_match_the_installed_trl():
    import re
    from dataclasses import fields

    from trl import DPOConfig, KTOConfig

    from rlhf_cli.stages.dpo.train import trl_classes

    dpo_help = next(f for f in fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    assert set(LOSSES["dpo"]) == set(re.findall(r"`'(\w+)'`", dpo_help))
    kto = next(f for f in fields(KTOConfig) if f.name == "loss_type").metadata["choices"]
    assert set(LOSSES["kto"]) == set(kto)
    cpo = next(f for f in fields(trl_classes("cpo")[1]) if f.name == "loss_type").metadata["choices"]
    assert set(LOSSES["cpo"]) <= set(cpo) and "simpo" in cpo
