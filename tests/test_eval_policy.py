"""`rlhf eval reward` by prompt length and `rlhf eval policy`, on cases whose answers are known.

The reward model is built by hand, so what it prefers is known exactly: a Llama sequence classifier with no
transformer layers whose tokenizer's chat template writes nothing after the answer, so its score reads only the
answer's last token, `score = w . RMSNorm(embedding(last token))`, with `w` the unit embedding of the token " !".
An answer ending in " !" scores sqrt(hidden) (the most any token can), every other one less: it prefers the
chosen answers of `helpers.learnable_prefs` every time, and their rejected answers never.

Policies are tiny random Llamas with the real tokenizer: a model compared with itself (the same folder, or a copy
of it loaded separately) samples identical answers with the same seed, so every prompt is a tie (tie_rate 1,
win_rate 0.5 as ties count half) and the KL is 0; a differently initialised model has KL > 0.

`--threads 1` throughout: on a small shared machine, two torch threads fighting other processes are several
times slower than one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import A, U, build_tiny, invoke, learnable_prefs, ok, one_error, read_jsonl, stage, token_rm, write_jsonl

from rlhf_cli.core.generation import cut_at_eos
from rlhf_cli.core.manifest import MANIFEST, write_manifest
from rlhf_cli.core.progress import fmt
from rlhf_cli.core.stages import EVAL_REWARD_FILE, command_for
from rlhf_cli.evaluation.eval_policy import EVAL_FILE, answer_logprob, distinct_n, outcomes, wilson_interval
from rlhf_cli.evaluation.eval_reward import accuracy_by_length, length_bucket

SAMPLE = ["--threads", "1", "--max-new-tokens", "6", "--batch-size", "4"]
KEYS = {"win_rate", "tie_rate", "loss_rate", "kl", "mean_score", "baseline_mean_score", "mean_length", "prompts",
        "win_rate_ci", "baseline_mean_length", "distinct_1", "distinct_2", "baseline_distinct_1",
        "baseline_distinct_2", "wins", "ties", "losses", "model", "baseline", "reward"}


def bang(tok) -> int:
    """The token " !" (the reward model of the module docstring prefers answers that end with it)."""
    token = tok("help with a book !", add_special_tokens=False)["input_ids"][-1]
    assert tok.decode([token]) == " !"
    return token


def build_rm(dest: Path, policy: Path) -> Path:
    return token_rm(dest, policy, bang)


@pytest.fixture(scope="module")
def w(tiny, tmp_path_factory):
    """A run folder (sft = the tiny policy, reward = the hand-set RM, ppo = another tiny policy), prompts, and
    preference files whose answers the RM gets right (and wrong, swapped) at known prompt lengths."""
    root = tmp_path_factory.mktemp("evalpolicy")
    run = root / "run"
    sft = stage(Path(shutil.copytree(tiny, run / "sft")), "sft", max_length=128)
    other = build_tiny(root / "other", seed=1)
    ppo = stage(Path(shutil.copytree(other, run / "ppo")), "ppo", temperature=0.9, top_p=1.0, top_k=None,
                max_new_tokens=5)
    rm = build_rm(run / "reward", tiny)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(10)])
    prefs = learnable_prefs(12)
    swapped = [r | {"chosen": r["rejected"], "rejected": r["chosen"]} for r in prefs]
    # 8 short prompts answered right, 4 long ones (over 64 tokens) swapped: 1.0 and 0.0 by prompt length
    long = [r | {"prompt": r["prompt"] + " Please" * 70} for r in swapped[:4]]
    return SimpleNamespace(root=root, run=run, sft=sft, other=other, ppo=ppo, rm=rm, prompts=prompts,
                           prefs=write_jsonl(root / "prefs.jsonl", prefs),
                           swapped=write_jsonl(root / "swapped.jsonl", swapped),
                           mixed=write_jsonl(root / "mixed.jsonl", prefs[:8] + long))


# ---------------------------------------------------------------------------------------------------------
# eval reward: accuracy, and accuracy by prompt length


def test_eval_reward_known_accuracy_and_length_buckets(w):
    right = json.loads(ok(invoke("eval", "reward", "--model", w.rm, "--data", w.prefs, "--json", "--threads", 1))
                       .stdout)
    assert right["accuracy"] == 1.0 and right["pairs"] == 12
    assert right["by_prompt_length"] == [{"bucket": "0-63", "pairs": 12, "accuracy": 1.0}]
    assert right["mean_chosen_score"] == pytest.approx(math.sqrt(32), rel=1e-2)  # the largest score (RMSNorm eps aside)
    wrong = json.loads(ok(invoke("eval", "reward", "--model", w.rm, "--data", w.swapped, "--json", "--threads", 1))
                       .stdout)
    assert wrong["accuracy"] == 0.0 and wrong["mean_margin"] == pytest.approx(-right["mean_margin"])
    mixed = json.loads(ok(invoke("eval", "reward", "--run", w.run, "--data", w.mixed, "--json", "--threads", 1))
                       .stdout)
    assert mixed["accuracy"] == pytest.approx(8 / 12)
    assert mixed["by_prompt_length"] == [{"bucket": "0-63", "pairs": 8, "accuracy": 1.0},
                                         {"bucket": "64-127", "pairs": 4, "accuracy": 0.0}]
    table = ok(invoke("eval", "reward", "--run", w.run, "--data", w.mixed, "--threads", 1)).stdout
    assert "accuracy, prompts of 0-63 tokens" in table and "1 (8 pairs)" in table
    assert "accuracy, prompts of 64-127 tokens" in table and "0 (4 pairs)" in table


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 63, 64, 127, 128, 2047, 2048, 10**6)] == \
        ["0-63", "0-63", "64-127", "64-127", "128-255", "1024-2047", "2048+", "2048+"]
    got = accuracy_by_length([300, 5, 70, 5000, 6], [True, False, True, True, True])
    assert got == [{"bucket": "0-63", "pairs": 2, "accuracy": 0.5}, {"bucket": "64-127", "pairs": 1, "accuracy": 1.0},
                   {"bucket": "256-511", "pairs": 1, "accuracy": 1.0}, {"bucket": "2048+", "pairs": 1, "accuracy": 1.0}]


# ---------------------------------------------------------------------------------------------------------
# eval policy: the statistics on their own


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # Wilson (1927)-style example
    lo, hi = wilson_interval(3.5, 7)  # ties as half a success
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)


def test_outcomes_distinct_and_eos_cut():
    assert outcomes([1.0, 0.5, 0.2, 0.3], [0.5, 0.5, 0.25, 0.0], 0.0) == ["win", "tie", "loss", "win"]
    assert outcomes([1.0, 0.2], [0.9, 0.25], 0.1) == ["tie", "tie"]
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5 and distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1], [1]], 2) is None
    assert cut_at_eos([5, 6, 2, 0, 0], [2]) == ([5, 6, 2], True)  # EOS kept, the pads after it dropped
    assert cut_at_eos([5, 0, 6], [2]) == ([5, 0, 6], False)  # no EOS: every token is real, even a pad id
    assert cut_at_eos([9, 7], [2, 7]) == ([9, 7], True)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (as some architectures' have not)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


@pytest.mark.parametrize("keep", [True, False], ids=["logits_to_keep", "without it"])
def test_teacher_forced_logprob_matches_token_by_token(w, keep):
    """The batched, left-padded sum of answer log-probabilities (logits for the answers' positions only) equals
    one forward per token, at a temperature; so does the fallback for a model without `logits_to_keep`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w.other).eval()
    prompts = [[1, 17, 300, 41], [1, 5], [1, 900, 901, 902, 903, 904], [1, 7, 8]]
    answers = [[60, 61, 2], [70], [80, 81, 82, 83, 84], []]  # different lengths: padding in both dimensions
    got = answer_logprob(model if keep else WithoutLogitsToKeep(model), prompts, answers, 0.7, pad_id=0)
    assert got[-1] == 0.0  # an empty answer has probability 1
    for p, a, g in zip(prompts, answers, got, strict=True):
        want = 0.0
        with torch.no_grad():
            for t in range(len(a)):
                logits = model(torch.tensor([p + a[:t]])).logits[0, -1] / 0.7
                want += float(torch.log_softmax(logits.double(), -1)[a[t]])
        assert g == pytest.approx(want, abs=1e-4)


def test_ppo_response_logits_with_and_without_logits_to_keep_and_through_peft(w):
    """PPO's response logits (one helper with eval's): the same values for a model without `logits_to_keep`, and
    through a peft wrapper (whose forward does not name it) the vocabulary logits are still computed for the
    response positions only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.generation import pad_batch
    from rlhf_cli.stages.ppo.rollout import response_logits

    model = AutoModelForCausalLM.from_pretrained(w.other).eval()
    ids, attn = pad_batch([[1, 17, 300, 41], [1, 5]], 0, left=True)
    seq = torch.cat([ids, torch.tensor([[60, 61, 2], [70, 0, 0]])], 1)
    attn = torch.cat([attn, torch.tensor([[1, 1, 1], [1, 0, 0]])], 1)
    with torch.no_grad():
        want = response_logits(model, seq, attn, 4, 0.7)
        got = response_logits(WithoutLogitsToKeep(model), seq, attn, 4, 0.7)
        full = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0)).logits
    assert want.shape == got.shape == (2, 3, full.shape[-1])
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(want, full[:, 3:6].float() / 0.7, atol=1e-5)

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(w.other),
                          LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).eval()
    seen = []
    lora.get_base_model().register_forward_hook(lambda m, a, out: seen.append(out.logits.shape[1]))
    with torch.no_grad():
        lg = response_logits(lora, seq, attn, 4, 0.7)
    assert seen == [4] and lg.shape == (2, 3, full.shape[-1])  # 3 response tokens + 1, not all 7 positions
    assert torch.allclose(lg, want, atol=1e-5)  # LoRA's B starts at zero: the base model's logits


# ---------------------------------------------------------------------------------------------------------
# eval policy: end to end


@pytest.mark.parametrize("copy", [False, True], ids=["same folder", "separate copy"])
def test_policy_against_itself_ties_everywhere_with_zero_kl(w, copy):
    (w.sft / EVAL_FILE).unlink(missing_ok=True)
    model = w.sft
    if copy:  # the same weights as a plain model folder, loaded on its own
        model = Path(shutil.copytree(w.sft, w.root / "sft_copy", dirs_exist_ok=True))
        (model / MANIFEST).unlink()
    result = ok(invoke("eval", "policy", "--model", model, "--baseline", w.sft, "--reward", w.rm, "--prompts",
                       w.prompts, "--temperature", 1.0, "--json", *SAMPLE))
    res = json.loads(result.stdout)
    assert KEYS <= set(res)
    assert res["prompts"] == 10 and (res["wins"], res["ties"], res["losses"]) == (0, 10, 0)
    assert res["tie_rate"] == 1.0 and res["win_rate"] == 0.5 and res["loss_rate"] == 0.0
    lo, hi = res["win_rate_ci"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["mean_score"] == res["baseline_mean_score"] and res["mean_length"] == res["baseline_mean_length"]
    assert (res["distinct_1"], res["distinct_2"]) == (res["baseline_distinct_1"], res["baseline_distinct_2"])
    assert 1 <= res["mean_length"] <= 6
    # a stage folder as --model gets eval_policy.json for `rlhf report`; a plain folder (or the baseline) does not
    assert (w.sft / EVAL_FILE).is_file() != copy
    assert (model / EVAL_FILE).is_file() != copy


def test_policy_against_itself_with_independent_draws(w):
    """--baseline-seed: other answers from the same model, so outcomes vary, but the KL is still exactly 0."""
    res = json.loads(ok(invoke("eval", "policy", "--model", w.sft, "--baseline", w.sft, "--reward", w.rm,
                               "--prompts", w.prompts, "--baseline-seed", 7, "--json", *SAMPLE)).stdout)
    assert (res["seed"], res["baseline_seed"]) == (42, 7)
    assert res["ties"] < 10 and res["wins"] + res["ties"] + res["losses"] == 10
    assert res["kl"] == pytest.approx(0.0, abs=1e-6)
    lo, hi = res["win_rate_ci"]
    assert 0.0 <= lo <= res["win_rate"] <= hi <= 1.0


def test_policy_against_a_different_policy(w):
    save = w.root / "per_prompt.jsonl"
    result = ok(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--reward", w.rm, "--prompts",
                       w.prompts, "--json", "--save", save, "--seed", 3, *SAMPLE))
    res = json.loads(result.stdout)
    assert KEYS <= set(res) and res["prompts"] == 10
    assert res["kl"] > 0
    lo, hi = res["win_rate_ci"]
    assert 0.0 <= lo <= res["win_rate"] <= hi <= 1.0
    assert res["wins"] + res["ties"] + res["losses"] == 10
    assert res["win_rate"] == pytest.approx((res["wins"] + res["ties"] / 2) / 10)
    assert res["tie_rate"] + res["loss_rate"] + res["wins"] / 10 == pytest.approx(1.0)
    # the model is no ppo stage and its generation_config.json has no sampling settings: the defaults
    assert (res["temperature"], res["top_p"], res["max_new_tokens"]) == (0.2, 0.9, 6)
    assert "sampling: temperature 0.2, top_p 0.9, top_k 0, repetition_penalty 1 (" in result.stderr
    for k in ("distinct_1", "distinct_2", "baseline_distinct_1", "baseline_distinct_2"):
        assert 0 < res[k] <= 1
    rows = [json.loads(x) for x in save.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and res["save"] == str(save)
    assert {"prompt", "response", "baseline_response", "score", "baseline_score", "outcome", "kl", "length",
            "baseline_length", "finished", "baseline_finished"} <= set(rows[0])
    assert sum(r["kl"] for r in rows) / 10 == pytest.approx(res["kl"])
    assert sum(r["score"] for r in rows) / 10 == pytest.approx(res["mean_score"])
    assert sum(r["length"] for r in rows) / 10 == pytest.approx(res["mean_length"])
    assert [r["outcome"] for r in rows].count("win") == res["wins"]
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert "eval_file" not in res  # a plain model folder: nothing written into it
    table = ok(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--reward", w.rm, "--prompts",
                      w.prompts, "--max-samples", 2, *SAMPLE)).stdout
    assert "win_rate" in table and "ties count half; 95% CI" in table and "kl" in table


def test_baseline_answers_are_kept_and_reused(w, tmp_path, monkeypatch):
    """The baseline's answers are sampled once per (baseline files, prompts, sampling, seed, batch): a second
    policy measured against it the same way reuses them, and they are the answers it would sample again."""
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    answers = tmp_path / "cache" / "eval_answers"

    def run(model, name, *extra):
        result = ok(invoke("eval", "policy", "--model", model, "--baseline", w.sft, "--reward", w.rm, "--prompts",
                           w.prompts, "--json", "--save", tmp_path / name, "--seed", 5, *SAMPLE, *extra))
        rows = read_jsonl(tmp_path / name)
        return result, [r["baseline_response"] for r in rows], json.loads(result.stdout)

    first, base1, _ = run(w.other, "a.jsonl")
    assert "reused from" not in first.stderr and len(list(answers.glob("*.json"))) == 2  # baseline's, model's
    second, base2, res2 = run(w.ppo, "b.jsonl", "--temperature", 0.2, "--top-p", 0.9)
    assert "--baseline: its answers to these prompts with these settings and seed reused from" in second.stderr
    fresh, base3, res3 = run(w.ppo, "c.jsonl", "--temperature", 0.2, "--top-p", 0.9, "--no-cache")
    assert "reused from" not in fresh.stderr
    assert base1 == base2 == base3  # the kept answers are the ones sampling gives again
    assert res2["baseline_mean_score"] == pytest.approx(res3["baseline_mean_score"]) and res2 == res3 | {
        "seconds": res2["seconds"], "save": res2["save"]}
    other_seed = ok(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--reward", w.rm,
                           "--prompts", w.prompts, "--json", "--seed", 6, *SAMPLE))
    assert "reused from" not in other_seed.stderr and len(list(answers.glob("*.json"))) == 5  # + ppo's, + seed 6's
    # an unreadable file is sampled again and rewritten, not an error
    for f in answers.glob("*.json"):
        f.write_text("{broken")
    again, base4, _ = run(w.other, "d.jsonl")
    assert "reused from" not in again.stderr and base4 == base1
    texts = [f.read_text() for f in answers.glob("*.json")]
    # seed 5's two rewritten; ppo's and seed 6's untouched
    assert sorted(t == "{broken" for t in texts) == [False, False, True, True, True]
    assert all(json.loads(t)["answers"] for t in texts if t != "{broken")


def test_the_same_model_measured_again_samples_nothing(w, tmp_path, monkeypatch):
    """Measured again the same way (here to add a judge), a model's answers and their KL come from the cache:
    the same figures as sampling them again with --no-cache; a model whose files changed is sampled anew."""
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    model = Path(shutil.copytree(w.other, tmp_path / "model"))
    second_judge = Path(shutil.copytree(w.rm, tmp_path / "rm2"))

    def run(*extra):
        result = ok(invoke("eval", "policy", "--model", model, "--baseline", w.sft, "--reward", w.rm, "--prompts",
                           w.prompts, "--json", "--seed", 5, *SAMPLE, *extra))
        return result, json.loads(result.stdout)

    first, res1 = run()
    assert "reused from" not in first.stderr
    again, res2 = run("--judge", second_judge)
    assert "--model: its answers to these prompts with these settings and seed, and their KL to --baseline, " \
           "reused from" in again.stderr and "--baseline: its answers" in again.stderr
    assert len(res2["judges"]) == 2
    for k in ("win_rate", "kl", "mean_length", "mean_score", "baseline_mean_score", "distinct_2", "finished_rate"):
        assert res2[k] == res1[k], k
    fresh_result, fresh = run("--judge", second_judge, "--no-cache")
    assert "reused from" not in fresh_result.stderr
    assert fresh == res2 | {"seconds": fresh["seconds"]}  # the kept answers and KL are the ones sampling gives
    (model / "config.json").touch()  # a changed model (retrained in place): its answers are sampled again
    changed, _ = run()
    assert "--model: its answers" not in changed.stderr and "--baseline: its answers" in changed.stderr


def test_run_defaults_inherit_ppo_sampling_and_write_eval_file(w):
    result = ok(invoke("eval", "policy", "--run", w.run, "--prompts", w.prompts, "--max-samples", 4, "--json",
                       "--threads", 1))
    res = json.loads(result.stdout)
    assert (res["model"], res["baseline"], res["reward"]) == (str(w.ppo), str(w.sft), str(w.rm))
    assert (res["temperature"], res["max_new_tokens"], res["top_k"]) == (0.9, 5, 0)
    assert f"inherited temperature=0.9 from {w.ppo}" in result.stderr
    assert res["mean_length"] <= 5 and res["prompts"] == 4
    saved = json.loads((w.ppo / EVAL_FILE).read_text(encoding="utf-8"))
    assert res["eval_file"] == str(w.ppo / EVAL_FILE)
    assert saved["win_rate"] == res["win_rate"] and len(saved["per_prompt"]) == 4
    assert {"score", "baseline_score", "kl", "outcome"} <= set(saved["per_prompt"][0])


# ---------------------------------------------------------------------------------------------------------
# errors: one line, before any model loads


def test_eval_policy_errors(w, tmp_path):
    base = ["--prompts", w.prompts, "--threads", 1]
    one_error(invoke("eval", "policy", "--model", w.other, "--baseline", w.rm, "--reward", w.rm, *base), 1,
              f"--baseline {w.rm}: is a reward stage", "expected a model that generates")
    one_error(invoke("eval", "policy", "--model", w.rm, "--baseline", w.sft, "--reward", w.rm, *base), 1,
              f"--model {w.rm}: is a reward stage")
    one_error(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--reward", w.sft, *base), 1,
              f"--reward {w.sft}: is an sft stage, expected a reward stage", command_for("reward"))
    one_error(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--reward", w.other, *base), 1,
              "not a reward model", "LlamaForCausalLM")
    missing = tmp_path / "no_run"
    one_error(invoke("eval", "policy", "--run", missing, *base), 1, f"--run {missing}: no such folder")
    partial = tmp_path / "partial_run"
    shutil.copytree(w.run / "sft", partial / "sft")
    one_error(invoke("eval", "policy", "--run", partial, *base), 1,
              f"--run {partial / 'ppo'}: no such folder; expected a finished ppo stage", command_for("ppo"))
    (partial / "ppo").mkdir()
    one_error(invoke("eval", "policy", "--run", partial, *base), 1, f"no {MANIFEST}, so not a finished stage")
    one_error(invoke("eval", "policy", "--model", w.other, "--baseline", w.sft, "--prompts", w.prompts), 2,
              "--reward: missing; pass --reward RM_DIR or --run DIR")
    one_error(invoke("eval", "policy", "--run", w.run), 2, "--prompts: missing")
    one_error(invoke("eval", "policy", "--run", w.run, *base, "--tie-margin", -1), 2, "--tie-margin -1.0")
    one_error(invoke("eval", "policy", "--run", w.run, *base, "--top-p", 0), 2, "--top-p 0.0")
    one_error(invoke("eval", "policy", "--run", w.run, "--prompts", tmp_path / "none.jsonl"), 1, "no such file")


def test_library_api_and_help(w):
    from rlhf_cli import EvalPolicyArgs, eval_policy
    from rlhf_cli.core.progress import Quiet

    res = eval_policy(EvalPolicyArgs(model=str(w.other), baseline=str(w.sft), reward=str(w.rm),
                                     prompts=str(w.prompts), max_samples=2, max_new_tokens=3, threads=1), Quiet())
    assert res["prompts"] == 2 and res["mean_length"] <= 3 and res["kl"] is not None
    text = ok(invoke("eval", "policy", "--help")).stdout
    for flag in ("--model", "--baseline", "--reward", "--prompts", "--run", "--save", "--tie-margin", "--temperature",
                 "--top-p", "--max-new-tokens", "--seed", "--baseline-seed", "--batch-size", "--max-samples",
                 "--threads", "--json", "--config", "--judge"):
        assert f"  {flag} " in text, flag
    assert "  policy " in ok(invoke("eval", "--help")).stdout


def test_both_models_sample_with_the_first_ones_settings(w, tmp_path):
    tuned = Path(shutil.copytree(w.other, tmp_path / "tuned"))
    gen = tuned / "generation_config.json"
    gen.write_text(json.dumps(json.loads(gen.read_text()) | {"do_sample": True, "temperature": 0.5}))
    args = ["--reward", w.rm, "--prompts", w.prompts, "--max-samples", 2, "--json", *SAMPLE]
    result = ok(invoke("eval", "policy", "--model", tuned, "--baseline", w.sft, *args))
    assert json.loads(result.stdout)["temperature"] == 0.5
    err = result.stderr
    assert f"sampling: temperature 0.5, top_p 0.9, top_k 0, repetition_penalty 1 (temperature from {gen}" in err
    assert (f"--baseline {w.sft}: its generation_config.json asks for other sampling settings (none) than --model "
            f"{tuned}'s (temperature 0.5); both sample with the settings above, so the contest is fair") in err
    result = ok(invoke("eval", "policy", "--model", w.sft, "--baseline", tuned, *args))
    assert json.loads(result.stdout)["temperature"] == 0.2  # MODEL's (none: the defaults), not BASE's
    assert f"--baseline {tuned}: its generation_config.json asks for other sampling settings (temperature 0.5)" \
        in result.stderr


def test_temperature_zero_is_greedy_for_both(w):
    """Greedy answers do not depend on the seed: the model against itself ties everywhere even with another seed."""
    res = json.loads(ok(invoke("eval", "policy", "--model", w.sft, "--baseline", w.sft, "--reward", w.rm,
                               "--prompts", w.prompts, "--temperature", 0, "--baseline-seed", 7, "--json",
                               *SAMPLE)).stdout)
    assert res["temperature"] == 0 and res["ties"] == 10 and res["kl"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# eval policy: other judges, and a gain that only the training RM sees


def empty_answer_token(tok) -> int:
    """The last token the RM reads when the answer is empty: what the plain template writes before an answer."""
    from rlhf_cli.core.generation import encode_chat

    return encode_chat(tok, [U("x"), A("")], generation_prompt=False)[-1]


def parrot(src: Path, dest: Path, token_of) -> Path:
    """A copy of a tiny policy that writes one token at every step whatever the prompt: every input embedding
    the same (so the last hidden state is one constant vector h), an untied output layer that is 0 but for that
    token's row, h itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(shutil.copytree(src, dest))
    model = AutoModelForCausalLM.from_pretrained(dest, tie_word_embeddings=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[5].expand_as(
            model.model.embed_tokens.weight))
        h = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_of(AutoTokenizer.from_pretrained(dest))] = h
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def judged(w):
    """A run folder whose ppo stage (a policy that answers " !" again and again) names its reward stage as the RM
    it was trained on; a baseline that always answers nothing; and two RMs that read only the last token, with
    opposite preferences: the training RM scores the empty answer lowest (so the policy wins every prompt), the
    other judge scores it highest (so the policy loses every prompt)."""
    run = w.root / "judged"
    mute = Path(shutil.copytree(w.sft, w.root / "mute"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mute)
    with torch.no_grad():  # every logit 0: greedy decoding writes token 0, a special token, so the text is empty
        model.model.norm.weight.zero_()
    model.save_pretrained(mute)
    trained_on = token_rm(run / "reward", w.sft, empty_answer_token, sign=-1.0)
    flipped = token_rm(w.root / "flipped", w.sft, empty_answer_token, sign=1.0)
    ppo = parrot(w.sft, run / "ppo", bang)
    (ppo / MANIFEST).unlink()
    write_manifest(ppo, stage="ppo", parents=[str(w.sft), str(trained_on)],
                   args={"policy": str(w.sft), "reward": str(trained_on)}, data={}, metrics={}, started=time.time())
    return SimpleNamespace(run=run, ppo=ppo, mute=mute, trained_on=trained_on, flipped=flipped)


GREEDY = ["--temperature", 0, "--prompts", None, "--json", *SAMPLE]


def greedy(w) -> list:
    return [w.prompts if x is None else x for x in GREEDY]


def test_a_judge_that_disagrees_with_the_training_rm_raises_the_warning(w, judged):
    result = ok(invoke("eval", "policy", "--model", judged.ppo, "--baseline", judged.mute, "--reward",
                       judged.trained_on, "--judge", judged.flipped, *greedy(w)))
    res = json.loads(result.stdout)
    assert res["training_reward"] == str(judged.trained_on)
    first, other = res["judges"]
    assert (first["reward"], first["training_rm"]) == (str(judged.trained_on), True)
    assert (other["reward"], other["training_rm"]) == (str(judged.flipped), False)
    # the training RM: every prompt a win, the interval above 0.5; the other judge: every prompt a loss
    assert (first["wins"], first["win_rate"]) == (10, 1.0) and first["win_rate_ci"][0] > 0.5
    assert (other["losses"], other["win_rate"]) == (10, 0.0) and other["win_rate_ci"][1] < 0.5
    assert first["mean_score"] > first["baseline_mean_score"] and other["mean_score"] < other["baseline_mean_score"]
    assert {k: res[k] for k in ("win_rate", "win_rate_ci", "mean_score")} == \
        {k: first[k] for k in ("win_rate", "win_rate_ci", "mean_score")}  # --reward's figures stay at the top
    assert res["gain_only_under_training_rm"] is True
    assert res["warning"].startswith("gain holds only under the training RM") and str(judged.flipped) in res["warning"]
    assert "warning: gain holds only under the training RM" in result.stderr
    saved = json.loads((judged.ppo / EVAL_FILE).read_text(encoding="utf-8"))
    assert saved["judges"] == res["judges"]
    assert [r["judges"][str(judged.flipped)]["outcome"] for r in saved["per_prompt"]] == ["loss"] * 10

    table = ok(invoke("eval", "policy", "--model", judged.ppo, "--baseline", judged.mute, "--reward",
                      judged.trained_on, "--judge", judged.flipped, *[x for x in greedy(w) if x != "--json"])).stdout
    flat_table = " ".join(table.split())
    assert flat_table.count("(training RM)") == 1 and flat_table.count("vs baseline") == 2  # two judges, two rows
    assert "warning: gain holds only under the training RM" in flat_table


def test_three_judges_the_training_rm_found_among_them_and_no_warning_without_another_view(w, judged):
    """The training RM is found by its folder whichever flag names it; one RM given twice judges once (no other
    view, so nothing to warn about); a policy whose manifest names no RM marks no judge as the training RM."""
    res = json.loads(ok(invoke("eval", "policy", "--model", judged.ppo, "--baseline", judged.mute, "--reward",
                               judged.flipped, "--judge", judged.trained_on, "--judge", w.rm, *greedy(w))).stdout)
    assert [j["reward"] for j in res["judges"]] == [str(judged.flipped), str(judged.trained_on), str(w.rm)]
    assert [j["training_rm"] for j in res["judges"]] == [False, True, False]
    assert res["win_rate"] == 0.0 and res["judges"][1]["win_rate"] == 1.0
    assert res["gain_only_under_training_rm"] is True
    result = ok(invoke("eval", "policy", "--model", judged.ppo, "--baseline", judged.mute, "--reward",
                       judged.trained_on, "--judge", judged.trained_on, *greedy(w)))
    res = json.loads(result.stdout)
    assert len(res["judges"]) == 1 and res["gain_only_under_training_rm"] is None and "warning" not in res
    assert f"--judge {judged.trained_on}: already judging, counted once" in result.stderr
    # a policy whose manifest names no RM: the judges are compared, none is marked as the training RM
    result = ok(invoke("eval", "policy", "--model", w.other, "--baseline", judged.mute, "--reward",
                       judged.trained_on, "--judge", judged.flipped, *greedy(w)))
    res = json.loads(result.stdout)
    assert res["training_reward"] is None and not any(j["training_rm"] for j in res["judges"])
    assert res["gain_only_under_training_rm"] is None and "no judge is marked as the training RM" in result.stderr


def test_bad_judge_is_one_line(w, judged, tmp_path):
    base = ["--model", judged.ppo, "--baseline", judged.mute, "--reward", judged.trained_on, "--prompts", w.prompts,
            "--threads", 1]
    one_error(invoke("eval", "policy", *base, "--judge", w.sft), 1,
              f"--judge {w.sft}: is an sft stage, expected a reward stage", command_for("reward"))
    one_error(invoke("eval", "policy", *base, "--judge", w.other), 1, f"--judge {w.other}: not a reward model")
    missing = tmp_path / "no_rm"
    one_error(invoke("eval", "policy", *base, "--judge", missing), 1, f"--judge {missing}: no such folder")


def test_gain_only_under_training_rule():
    from rlhf_cli.evaluation.eval_policy import gain_only_under_training

    def j(name, lo, training=False):
        return {"reward": name, "training_rm": training, "win_rate_ci": [lo, lo + 0.2]}

    assert gain_only_under_training([j("t", 0.6, True), j("a", 0.55), j("b", 0.3)]) == ["b"]
    assert gain_only_under_training([j("t", 0.6, True), j("a", 0.55)]) == []
    assert gain_only_under_training([j("t", 0.4, True), j("a", 0.1)]) == []  # no gain to begin with
    assert gain_only_under_training([j("a", 0.6), j("b", 0.1)]) is None  # the training RM is not known
    assert gain_only_under_training([j("t", 0.6, True)]) is None


def test_library_api_takes_judges(w, judged):
    from rlhf_cli import EvalPolicyArgs, eval_policy
    from rlhf_cli.core.progress import Quiet

    res = eval_policy(EvalPolicyArgs(model=str(judged.ppo), baseline=str(judged.mute), reward=str(judged.trained_on),
                                     judges=str(judged.flipped), prompts=str(w.prompts), max_samples=2,
                                     max_new_tokens=3, temperature=0, threads=1), Quiet())
    assert [j["win_rate"] for j in res["judges"]] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# eval reward: length, and calibration by margin


def lengthy_prefs() -> list[dict]:
    """12 pairs of a long answer ending with " !" (the top score of `build_rm`) and a one-word answer: the long one
    is chosen in the even rows, the short one in the odd rows."""
    rows = []
    for i in range(12):
        long, short = f"sure , {'here is more on that topic ' * (1 + i % 4)}thanks !", ["ok", "no", "fine"][i % 3]
        chosen, rejected = (long, short) if i % 2 == 0 else (short, long)
        rows.append({"prompt": f"Question {i}: tell me more.", "chosen": chosen, "rejected": rejected})
    return rows


def test_eval_reward_length_bias_and_calibration(w):
    data = write_jsonl(w.root / "lengthy.jsonl", lengthy_prefs())
    res = json.loads(ok(invoke("eval", "reward", "--model", w.rm, "--data", data, "--json", "--threads", 1)).stdout)
    assert res["pairs"] == 12 and res["accuracy"] == 0.5
    # the RM prefers the longer answer every time: right where it was chosen, wrong where the shorter one was
    assert (res["chosen_longer_pairs"], res["chosen_longer_accuracy"]) == (6, 1.0)
    assert (res["chosen_shorter_pairs"], res["chosen_shorter_accuracy"]) == (6, 0.0)
    assert res["chosen_same_length_pairs"] == 0
    assert res["length_pearson"] > 0.5 and res["length_spearman"] > 0.5
    buckets = res["by_margin"]
    # the long answers all score the top score and the short ones are 3 words: 3 distinct margins, kept apart
    assert len(buckets) == 3 and sum(b["pairs"] for b in buckets) == 12
    assert all(a["margin_to"] < b["margin_from"] for a, b in zip(buckets[:-1], buckets[1:], strict=True))
    assert all(b["margin_from"] <= b["margin_to"] for b in buckets)
    assert sum(b["accuracy"] * b["pairs"] for b in buckets) == pytest.approx(6)
    saved = json.loads((w.rm / EVAL_REWARD_FILE).read_text(encoding="utf-8"))
    assert res["eval_file"] == str(w.rm / EVAL_REWARD_FILE) and saved["by_margin"] == buckets
    table = " ".join(ok(invoke("eval", "reward", "--model", w.rm, "--data", data, "--threads", 1)).stdout.split())
    assert "length_pearson" in table and "chosen_shorter_accuracy" in table and "accuracy, margin bucket 3" in table


def test_correlations_and_margin_buckets():
    from rlhf_cli.evaluation.eval_reward import accuracy_by_chosen_length, accuracy_by_margin, pearson, ranks, spearman

    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    assert ranks([10, 20, 20, 30, 5]) == [2, 3.5, 3.5, 5, 1]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    assert accuracy_by_chosen_length([1, 5, 3, 2], [4, 2, 3, 9], [False, True, True, True]) == {
        "chosen_shorter_pairs": 2, "chosen_shorter_accuracy": 0.5, "chosen_longer_pairs": 1,
        "chosen_longer_accuracy": 1.0, "chosen_same_length_pairs": 1}
    got = accuracy_by_margin([1, 2, 3, 4, 5], [0, 0, 0, 0, 10], buckets=5)
    assert [(b["margin_from"], b["pairs"], b["accuracy"]) for b in got] == [(1, 1, 1.0), (2, 1, 1.0), (3, 1, 1.0),
                                                                             (4, 1, 1.0), (5, 1, 0.0)]
    got = accuracy_by_margin([0.1, 0.2, 3, 4, 5, 6, 7], [0] * 7, buckets=3)
    assert [b["pairs"] for b in got] == [2, 2, 3] and got[0]["margin_to"] == 0.2
    assert [b["pairs"] for b in accuracy_by_margin([1, 2], [0, 0])] == [1, 1]  # fewer pairs than buckets
    # equal margins stay together: fewer buckets, none overlapping, every pair counted once
    got = accuracy_by_margin([1, 1, -1, 1, 2, 3], [0] * 6, buckets=3)
    assert [(b["margin_from"], b["margin_to"], b["pairs"], b["accuracy"]) for b in got] == [(1, 1, 4, 0.75),
                                                                                           (2, 3, 2, 1.0)]
    assert accuracy_by_margin([], []) == []


# ---------------------------------------------------------------------------------------------------------
# the report shows both evaluations


def test_report_shows_judges_and_reward_figures(w, judged, tmp_path):
    data = write_jsonl(w.root / "lengthy.jsonl", lengthy_prefs())
    ok(invoke("eval", "reward", "--model", judged.trained_on, "--data", data, "--threads", 1))
    ok(invoke("eval", "policy", "--model", judged.ppo, "--baseline", judged.mute, "--reward", judged.trained_on,
              "--judge", judged.flipped, *greedy(w)))
    rew = json.loads((judged.trained_on / EVAL_REWARD_FILE).read_text(encoding="utf-8"))
    md = tmp_path / "report.md"
    res = json.loads(ok(invoke("report", judged.run, "--out", md, "--json")).stdout)
    assert {s["name"]: s["eval_reward"] is not None for s in res["stages"]} == {"reward": True, "ppo": False}
    text = md.read_text(encoding="utf-8")
    for key in ("length_pearson", "length_spearman", "chosen_shorter_accuracy", "chosen_longer_accuracy",
                "chosen_shorter_pairs"):
        assert f"| {key} | {fmt(rew[key])} |" in text, key
    for i, b in enumerate(rew["by_margin"], 1):
        assert f"| accuracy, margin bucket {i} (\\|margin\\| {fmt(b['margin_from'])}-{fmt(b['margin_to'])}) | " \
               f"{fmt(b['accuracy'])} ({b['pairs']} pairs) |" in text
    assert f"| judge {judged.trained_on} (training RM) | win_rate 1 (95% CI " in text
    assert f"| judge {judged.flipped} | win_rate 0 (95% CI " in text
    assert "| warning | gain holds only under the training RM" in text
    page = (tmp_path / "report.html")
    ok(invoke("report", judged.run, "--out", page))
    html_text = page.read_text(encoding="utf-8")
    assert "length_pearson" in html_text and "gain holds only under the training RM" in html_text
