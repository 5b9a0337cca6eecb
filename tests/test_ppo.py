"""`rlhf ppo` on tiny models: learning, resume, the ratio-1 start of every update, masks, and preflight errors.

The reward model here is built by hand rather than trained, so what it wants is known exactly: a Llama sequence
classifier with no transformer layers, so its score reads only the last token it sees,
`score = w . RMSNorm(embedding(last token))`, with `w` a fixed unit vector. A policy raises its score by ending
its responses with tokens whose embeddings point along `w`. Its embeddings are the tiny policy's own, and the
tiny policy's embeddings are scaled up 10x from the random initialisation (logits with a standard deviation near
1 instead of 0.1), so that moving its last hidden state towards `w` changes which tokens it samples within a few
dozen updates. Responses are 4 tokens long, and random responses rarely contain EOS, so the score is read on a
response token.

Variants: the same RM with a plain chat template that writes nothing after the answer (the RM then reads the
decoded and re-encoded text, still ending with the response's last token: used for grpo/rloo, which always pass
text), and one whose tokenizer has two extra tokens (a different vocabulary: re-encoding, and the value model
must start from the policy).

`--threads 1` throughout: on a small shared machine, two torch threads fighting other processes are several
times slower than one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import PLAIN_TEMPLATE, build_tiny, invoke, ok, one_error, read_jsonl, stage, write_jsonl
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.core.manifest import MANIFEST
from rlhf_cli.core.stages import command_for

FAST = ["--threads", "1", "--max-new-tokens", "4", "--sample-every", "0"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def build_rm(dest: Path, policy: Path, template: str | None = None, extra_tokens: int = 0) -> Path:
    """The hand-set reward model of the module docstring, as a finished reward stage."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(policy)
    if template is not None:
        tok.chat_template = template
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    pm = AutoModelForCausalLM.from_pretrained(policy)
    c = pm.config
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=0, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, num_labels=1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    w = torch.randn(c.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = pm.model.embed_tokens.weight
        rm.model.embed_tokens.weight[:emb.shape[0]].copy_(emb)
        rm.score.weight.copy_((w / w.norm()).unsqueeze(0))
    rm.save_pretrained(dest)
    tok.save_pretrained(dest)
    return stage(dest, "reward", max_length=256)


def peaky_sft(dest: Path) -> Path:
    """The tiny policy as an sft stage, its embeddings (tied: the LM head too) scaled 10x so its next-token
    distributions are peaky and sampled answers differ in ways an RM can reward."""
    from transformers import AutoModelForCausalLM

    policy = build_tiny(dest)
    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    model.save_pretrained(policy)
    return stage(policy, "sft", max_length=128)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A run folder with an sft stage (the peaky tiny policy) and reward stages of each kind, plus prompts."""
    root = tmp_path_factory.mktemp("ppo")
    run = root / "run"
    policy = peaky_sft(run / "sft")
    build_rm(run / "reward", policy)
    rows = [{"prompt": f"Tell me about topic {i}."} for i in range(32)]
    return SimpleNamespace(root=root, run=run, policy=policy, rm=run / "reward",
                           rm_plain=build_rm(root / "rm_plain", policy, template=PLAIN_TEMPLATE),
                           rm_vocab=build_rm(root / "rm_vocab", policy, extra_tokens=2),
                           prompts=write_jsonl(root / "prompts.jsonl", rows))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# learning


def test_ppo_raises_the_score_with_bounded_kl(w):
    out = w.root / "learn"
    result = ok(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", out, "--max-steps", 24,
                       "--batch-size", 16, "--num-minibatches", 2, "--grad-accum", 2, "--lr", "1e-3",
                       "--sample-every", 12, "--threads", 1, "--max-new-tokens", 4))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = mean(r["score_mean"] for r in rows[:5]), mean(r["score_mean"] for r in rows[-5:])
    # random 4-token responses score about 0 (w . unit-RMS vector, std 1); the best token scores about 5
    assert abs(first) < 0.5, first
    assert last > first + 0.7, (first, last)
    assert all(r["kl"] < 8 for r in rows), [r["kl"] for r in rows]  # nats per 4-token response
    assert all(r["response_length"] <= 4 for r in rows)
    # the first minibatch of every update sees exactly the rollout policy: ratio 1, approx KL 0
    assert max(r["check/first_logratio_max"] for r in rows) < 1e-5
    assert max(r["check/first_approx_kl"] for r in rows) < 1e-10
    assert all(r["ppo_epochs_done"] == 4 for r in rows)
    assert {"time/generate", "time/score", "time/forward", "time/train", "clipfrac", "entropy"} <= set(rows[0])

    m = manifest(out)
    assert m["stage"] == "ppo" and m["parents"] == [str(w.run / "sft"), str(w.run / "reward")]
    assert m["metrics"]["updates"] == 24 and m["metrics"]["episodes"] == 384
    assert m["metrics"]["initial_score_mean"] == rows[0]["score_mean"]
    assert m["metrics"]["final_score_mean"] == rows[-1]["score_mean"]
    assert m["metrics"]["reward_input"] == "token ids"
    assert m["args"]["max_length"] == 128  # inherited from the sft stage
    assert "inherited max_length=128" in result.stderr
    assert "ppo finished" in result.stdout and f"next: rlhf chat {out}" in result.stdout
    samples = read_jsonl(out / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 12, 24} and all("response" in s for s in samples)
    # the same samples shown as a table while training (the first update's, then every --sample-every)
    assert "samples at update 1" in result.stderr and "samples at update 12" in result.stderr
    assert not re.search(r"samples at update 2\b", result.stderr) and "response" in result.stderr

    # a normal Hugging Face folder on top, the value model, the state for --resume
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert AutoModelForSequenceClassification.from_pretrained(out / "value").config.num_labels == 1
    assert {"trainer.pt", "state.json"} <= {p.name for p in (out / "state").iterdir()}
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 24
    # the finished folder drops the optimiser moments (only a --resume checkpoint needs them)
    final = torch.load(out / "state" / "trainer.pt", weights_only=True)
    assert "optimizer" not in final and {"scheduler", "kl_ctl", "moments", "step"} <= set(final)
    assert not out.with_name("learn.partial").exists()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_algorithms_raise_the_score(w, algo):
    out = w.root / algo
    result = ok(invoke("ppo", "--algo", algo, "--policy", w.policy, "--reward", w.rm_plain, "--prompts", w.prompts,
                       "--out", out, "--max-steps", 12, "--batch-size", 16, "--lr", "1e-2", "--vf-coef", 0.5, *FAST))
    assert f"--algo {algo}: ignoring PPO-only settings --vf-coef" in result.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = mean(r["score_mean"] for r in rows[:4]), mean(r["score_mean"] for r in rows[-4:])
    assert last > first + 0.4, (first, last)
    assert all(r["kl"] < 5 for r in rows)
    m = manifest(out)
    assert m["stage"] == "ppo" and m["args"]["algo"] == algo and m["metrics"]["updates"] == 12
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert not (out / "trainer").exists()


# ---------------------------------------------------------------------------------------------------------
# resume


RESUME = ["--batch-size", 8, "--ppo-epochs", 2, "--num-minibatches", 2, "--lr", "1e-3", "--adaptive-kl",
          "--kl-target", 0.5, "--kl-horizon", 100, "--normalize-rewards", "--max-steps", 4, *FAST]


def test_resume_reaches_the_uninterrupted_result(w):
    common = ["--run", w.run, "--prompts", w.prompts, *RESUME]
    whole, cut = w.root / "whole", w.root / "cut"
    ok(invoke("ppo", *common, "--out", whole))

    stopped = ok(invoke("ppo", *common, "--out", cut, "--stop-after", 2))
    partial = w.root / "cut.partial"
    assert "stopped: checkpoint in" in stopped.stdout and "--resume" in stopped.stdout
    assert not cut.exists() and not (partial / MANIFEST).exists()
    assert json.loads((partial / "state" / "state.json").read_text())["step"] == 2
    assert len(read_jsonl(partial / "metrics.jsonl")) == 2

    # the settings that define the run must match the checkpoint's
    one_error(invoke("ppo", *common, "--out", cut, "--resume", "--seed", 7), 2,
              "--resume: the checkpoint in", "--seed 42, not 7")
    resumed = ok(invoke("ppo", *common, "--out", cut, "--resume"))
    assert "resuming from update 2 of 4" in resumed.stderr
    assert not partial.exists() and (cut / MANIFEST).is_file()

    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if not k.startswith("time/") and k != "episodes_per_second":
                assert rb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (ra["step"], k)
    assert a[-1]["kl_coef"] != a[0]["kl_coef"]  # the adaptive controller moved, and its state was restored
    for sub in ("", "value"):
        wa, wb = weights(whole / sub), weights(cut / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert manifest(cut)["metrics"]["final_score_mean"] == pytest.approx(manifest(whole)["metrics"]
                                                                         ["final_score_mean"], rel=1e-5)


def test_value_warmup_trains_only_the_value_model_first(w):
    """--value-warmup N: the first N updates leave the policy exactly as it started and train the value model;
    the updates after them train both. Checked on the checkpoint after the warm-up and on the finished run."""
    out = w.root / "warmup"
    common = ["--run", w.run, "--prompts", w.prompts, "--out", out, "--batch-size", 4, "--ppo-epochs", 2,
              "--num-minibatches", 2, "--lr", "1e-3", "--max-steps", 3, "--value-warmup", 2, *FAST]
    one_error(invoke("ppo", *common[:-len(FAST)], "--max-steps", 2, *FAST), 2,
              "--value-warmup 2: must be less than the run's 2 updates", "raise --max-steps")
    assert not out.exists() and not (w.root / "warmup.partial").exists()
    stopped = ok(invoke("ppo", *common, "--stop-after", 2))
    assert "the first 2 train the value model only" in stopped.stderr
    partial = w.root / "warmup.partial"
    start, rm = weights(w.policy), weights(w.rm)
    after = weights(partial)  # the checkpoint: the policy on top, the value model in value/
    assert after.keys() == start.keys()
    for k in start:
        assert torch.equal(after[k], start[k]), k  # not a bit moved
    value = weights(partial / "value")
    moved = [k for k in value if k in rm and not torch.equal(value[k], rm[k])]
    assert moved  # the value model (started from the RM) learned
    ok(invoke("ppo", *common, "--resume"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["value_only"] for r in rows] == [True, True, False]
    assert rows[2]["optimizer_steps"] >= 1
    final = weights(out)
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the third update moved the policy
    assert manifest(out)["args"]["value_warmup"] == 2


def test_resume_needs_a_checkpoint(w, tmp_path):
    one_error(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", tmp_path / "o", "--resume", *FAST), 2,
              "--resume: no checkpoint in", "start again without --resume")


# ---------------------------------------------------------------------------------------------------------
# other paths: a reward model with another vocabulary (re-encoded text), LoRA


def test_reencoded_reward_and_lora(w):
    out = w.root / "lora"
    result = ok(invoke("ppo", "--policy", w.policy, "--reward", w.rm_vocab, "--prompts", w.prompts, "--out", out,
                       "--value-init", "policy", "--lora", "--lora-r", 4, "--max-steps", 2, "--batch-size", 4,
                       "--num-minibatches", 2, "--target-kl", "1e-9", "--lr", "1e-3", *FAST))
    assert "re-encoded with its own chat template (the vocabularies differ)" in result.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and max(r["check/first_logratio_max"] for r in rows) < 1e-5
    # --target-kl: the first minibatch starts at KL 0 and steps; the second has moved past 1e-9 and stops the update
    assert [(r["optimizer_steps"], r["early_stopped"]) for r in rows] == [(1, True), (1, True)]
    m = manifest(out)
    assert m["metrics"]["reward_input"] == "re-encoded text" and m["args"]["lora"] is True
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# rollouts and masks, pad == EOS


def test_rollout_masks_scores_and_logprobs_with_pad_equal_to_eos(w):
    """A real batched rollout with a tokenizer whose pad is its EOS: the mask ends at the first EOS, left padding
    and everything after EOS change nothing, and the RM reads the score where an unpadded pass would."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

    from rlhf_cli.core.generation import encode_chat
    from rlhf_cli.core.reward_model import RewardModel, RewardSpec, token_scores
    from rlhf_cli.stages.ppo.core import logprobs_from_logits
    from rlhf_cli.stages.ppo.preflight import Plan, template_suffix
    from rlhf_cli.stages.ppo.rollout import generate_rollouts, rollout_forward, score_rollout

    tok = AutoTokenizer.from_pretrained(w.policy)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    policy = AutoModelForCausalLM.from_pretrained(w.policy).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(w.rm).eval()
    prompts = [encode_chat(tok, [{"role": "user", "content": "Hi" + " there" * k}]) for k in (0, 3, 7, 1, 5, 2)]
    assert len({len(p) for p in prompts}) == 6  # different lengths: real left padding
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
                           eos_token_id=[eos], pad_token_id=eos, sequence_bias={(eos,): 9.0})
    torch.manual_seed(3)
    ro = generate_rollouts(policy, prompts, gen, eos, [eos], torch.device("cpu"))

    lengths = ro.mask.sum(1).tolist()
    assert ro.ends.any() and not ro.ends.all(), (ro.ends, lengths)  # both kinds of row in the batch
    for i in range(6):
        r = ro.response[i].tolist()
        n = r.index(eos) + 1 if eos in r else len(r)
        assert lengths[i] == n and ro.mask[i, :n].all() and not ro.mask[i, n:].any()
        assert bool(ro.ends[i]) == (eos in r)
        assert ro.attn[i].sum() == len(prompts[i]) + n

    old, ref, values, _, _ = rollout_forward(policy, policy, rm, ro, 1.0, 4, lora=False)
    plan = Plan(policy="p", policy_path=w.policy, policy_manifest=None, reward_spec=RewardSpec("r", w.rm, None),
                tok=tok, rm_tok=tok, same_ids=True, turn_suffix=template_suffix(tok), why_reencode="", prompts=None,
                prompt_ids=prompts, rows=[], too_long=0, eos_ids=[eos], rm_max_length=256)
    scores = score_rollout(RewardModel("r", rm, tok, 256), plan, ro, [], 4)
    suffix = template_suffix(tok)
    assert suffix  # ChatML: a newline after <|im_end|>
    with torch.no_grad():
        for i in range(6):
            n = lengths[i]
            resp = ro.response[i, :n]
            alone = torch.tensor([prompts[i] + resp.tolist()])
            logits = policy(input_ids=alone).logits[0, len(prompts[i]) - 1:-1]
            torch.testing.assert_close(old[i, :n], logprobs_from_logits(logits[None], resp[None])[0],
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ref[i, :n], old[i, :n])
            v = token_scores(rm, alone, torch.ones_like(alone))[0, len(prompts[i]) - 1:-1]
            torch.testing.assert_close(values[i, :n], v, rtol=1e-4, atol=1e-4)
            scored = prompts[i] + resp.tolist() + (suffix if ro.ends[i] else [])
            expect = rm(input_ids=torch.tensor([scored])).logits[0, 0]
            torch.testing.assert_close(scores[i], expect, rtol=1e-4, atol=1e-4)

    # each chunk and minibatch drops only the columns that are padding in all its rows
    from rlhf_cli.stages.ppo.rollout import by_length, minibatches, trimmed

    order = by_length(ro).tolist()
    total = ro.attn.sum(1).tolist()
    assert [total[i] for i in order] == sorted(total)
    # the three rows with the shortest prompts (which rows are shortest in all depends on what was sampled): the
    # batch's longest prompt is not among them, so leading columns are dropped
    short = torch.tensor(sorted(range(6), key=lambda i: len(prompts[i]))[:3])
    seq, attn, pl, r = trimmed(ro, short)
    assert r == max(lengths[i] for i in short.tolist()) and seq.shape[1] == pl + r
    assert pl == max(len(prompts[i]) for i in short.tolist()) < ro.prompt_len
    assert attn[:, 0].any() and attn[:, pl + r - 1].any()  # the first and last columns hold a real token
    for i, row in zip(short.tolist(), seq, strict=True):
        assert row[attn[short.tolist().index(i)].bool()].tolist() == prompts[i] + ro.response[i, :lengths[i]].tolist()
    torch.manual_seed(0)
    grouped = minibatches(ro, 2, True)
    assert sorted(tuple(g.tolist()) for g in grouped) == sorted(tuple(order[k:k + 2]) for k in (0, 2, 4))
    shuffled = minibatches(ro, 2, False)
    assert sorted(sum((g.tolist() for g in shuffled), [])) == list(range(6)) and all(len(g) == 2 for g in shuffled)


# ---------------------------------------------------------------------------------------------------------
# preflight errors: one `error:` line, no traceback, nothing written


def test_preflight_errors(w, tmp_path):
    o = tmp_path / "o"
    base = ["--prompts", w.prompts, "--out", o, *FAST]

    def fails(code: int, *args_and_fragments):
        *args, fragments = args_and_fragments
        one_error(invoke("ppo", *args, *base), code, *fragments)
        assert not o.exists() and not o.with_name("o.partial").exists()

    fails(1, "--policy", w.policy, "--reward", w.policy,
          [f"--reward {w.policy}: is an sft stage, expected a reward stage", command_for("reward")])
    fails(1, "--policy", w.rm, "--reward", w.rm,
          [f"--policy {w.rm}: is a reward stage, expected an sft stage", command_for("sft")])
    plain_rm = tmp_path / "plain_rm"
    shutil.copytree(w.rm, plain_rm)
    (plain_rm / MANIFEST).unlink()
    fails(1, "--policy", plain_rm, "--reward", w.rm, ["not a causal language model", "LlamaForSequenceClassification"])
    plain_lm = tmp_path / "plain_lm"
    shutil.copytree(w.policy, plain_lm)
    (plain_lm / MANIFEST).unlink()
    fails(1, "--policy", plain_lm, "--reward", plain_lm, ["not a reward model", "LlamaForCausalLM"])
    fails(1, "--policy", tmp_path / "nope", "--reward", w.rm, ["--policy", "no such folder"])
    fails(1, "--run", tmp_path / "empty_run", [f"--run {tmp_path / 'empty_run' / 'sft'}: no such folder"])
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors", MANIFEST):
        shutil.copy(w.rm / f, no_tok / f)
    fails(1, "--policy", w.policy, "--reward", no_tok, [f"--reward {no_tok}: no usable tokenizer"])
    no_eos = tmp_path / "no_eos"
    shutil.copytree(w.rm, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": None}))
    fails(1, "--policy", w.policy, "--reward", no_eos, [f"--reward {no_eos}: the tokenizer defines no EOS token"])
    fails(2, "--policy", w.policy, "--reward", w.rm_vocab, ["--value-init reward: the reward model's vocabulary "
                                                             "differs", "pass --value-init policy"])
    fails(1, "--run", w.run, "--max-length", 32, ["every prompt is longer than 28 tokens", "raise --max-length"])
    fails(2, "--run", w.run, "--minibatch-size", 3, ["--minibatch-size 3: must divide --batch-size 8"])
    fails(2, "--run", w.run, "--algo", "grpo", "--batch-size", 6, ["--batch-size 6", "multiple of --group-size 4"])
    fails(2, "--run", w.run, "--kl-estimator", "k9", ["--kl-estimator: 'k9' is not one of: k1, k2, k3"])
    one_error(invoke("ppo", "--run", w.run, "--out", o), 2, "--prompts: missing")
    one_error(invoke("ppo", "--prompts", w.prompts, "--out", o), 2, "--policy: missing")
    one_error(invoke("ppo", "--run", w.run, "--prompts", tmp_path / "none.jsonl", "--out", o), 1, "no such file")
    one_error(invoke("ppo", "--policy", w.policy, "--reward", w.rm, "--prompts", w.prompts), 2, "--out: missing")


def test_help_lists_the_ppo_and_shared_flags_and_the_demo_config_resolves():
    from helpers import ROOT

    from rlhf_cli.core.config import resolve
    from rlhf_cli.stages.ppo.args import PPOArgs

    demo = ROOT / "examples" / "configs" / "demo_ppo.yaml"
    assert demo.read_text().startswith("# rlhf ppo --config examples/configs/demo_ppo.yaml")
    assert resolve(PPOArgs, demo, {"run": "runs/demo"}).max_new_tokens == 48
    text = CliRunner().invoke(app, ["ppo", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--policy", "--reward", "--prompts", "--out", "--run", "--config", "--max-steps", "--lr",
                 "--batch-size", "--grad-accum", "--max-length", "--seed", "--lora", "--max-samples", "--threads",
                 "--precision", "--overwrite", "--ppo-epochs", "--minibatch-size", "--num-minibatches",
                 "--temperature", "--top-k", "--top-p", "--max-new-tokens", "--missing-eos-penalty", "--score-clip",
                 "--normalize-rewards", "--kl-coef", "--kl-estimator", "--adaptive-kl", "--kl-target", "--kl-horizon",
                 "--gamma", "--lam", "--whiten-advantages", "--clip-eps", "--clip-value", "--vf-coef",
                 "--max-grad-norm", "--target-kl", "--value-init", "--value-warmup", "--sample-every", "--save-every",
                 "--resume", "--algo", "--group-size", "--stop-after"):
        assert flag in text, flag


def test_trl_algorithm_resumes_from_its_checkpoint(w):
    common = ["--algo", "grpo", "--policy", w.policy, "--reward", w.rm_plain, "--prompts", w.prompts,
              "--max-steps", 3, "--batch-size", 8, "--lr", "1e-2", *FAST]
    whole, cut = w.root / "g_whole", w.root / "g_cut"
    ok(invoke("ppo", *common, "--out", whole))
    ok(invoke("ppo", *common, "--out", cut, "--stop-after", 1))
    assert not cut.exists() and list((w.root / "g_cut.partial" / "trainer").glob("checkpoint-1"))
    assert "resuming from step 1 of 3" in ok(invoke("ppo", *common, "--out", cut, "--resume")).stderr
    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for k in ("score_mean", "loss", "kl", "entropy"):
        assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-5, abs=1e-6), k
    for k, t in weights(whole).items():
        torch.testing.assert_close(weights(cut)[k], t, rtol=1e-5, atol=1e-6)
