"""`rlhf best-of-n`: sample K answers, keep the reward model's best, fine-tune on them; with a reward model whose
preference is known exactly.

The reward model is set by hand: a Llama sequence classifier with no transformer layers, whose tokenizer's chat
template writes nothing after the answer, so its score reads only the answer's last token:
`score = w . RMSNorm(embedding(last token))`, with `w` the unit embedding of the token " !". The policy is the tiny
random Llama with the real tokenizer (its answers are random tokens, so their scores spread).

`--threads 1` throughout: on a small shared machine, two torch threads fighting other processes are several times
slower than one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import invoke, ok, one_error, read_jsonl, stage, token_rm, write_jsonl

from rlhf_cli.core.manifest import MANIFEST
from rlhf_cli.core.stages import STAGES, command_for, is_policy
from rlhf_cli.stages.best_of_n.train import preference_pairs, select, select_all

# Short random answers, a few fast fine-tune steps with a large learning rate (the tiny model memorises them).
FAST = ["-k", 4, "--max-new-tokens", 6, "--sample-batch-size", 4, "--temperature", 1.0, "--threads", 1,
        "--batch-size", 4, "--lr", "1e-2", "--max-length", 64]


def build_rm(dest: Path, policy: Path) -> Path:
    """The hand-set reward model of the module docstring (it prefers answers ending in " !"), as a reward stage."""
    return token_rm(dest, policy, lambda tok: tok("well !", add_special_tokens=False)["input_ids"][-1])


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def w(tiny, tmp_path_factory):
    """A run folder (sft = the tiny policy, reward = the hand-set RM), 8 prompts, and one finished best-of-n run
    in RUN/best-of-n."""
    root = tmp_path_factory.mktemp("bestofn")
    run = root / "run"
    sft = stage(Path(shutil.copytree(tiny, run / "sft")), "sft", max_length=64)
    rm = build_rm(run / "reward", tiny)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    result = ok(invoke("best-of-n", "--run", run, "--prompts", prompts, "--max-steps", 16, "--lr-scheduler",
                       "constant", *FAST))
    return SimpleNamespace(root=root, run=run, sft=sft, rm=rm, prompts=prompts, out=run / "best-of-n",
                           result=result)


def test_keeps_the_highest_scored_answer_and_records_the_reward_models_scores(w):
    from rlhf_cli.core.reward_model import RewardModel

    rows = read_jsonl(w.out / "samples.jsonl")
    assert len(rows) == 8
    for r in rows:
        assert len(r["responses"]) == len(r["scores"]) == len(r["finished"]) == 4
        assert r["best"] == max(range(4), key=lambda j: r["scores"][j])
        assert r["score"] == max(r["scores"]) and r["response"] == r["responses"][r["best"]]
        assert r["kept"] is True and r["dropped"] is None
    assert len({s for r in rows for s in r["scores"]}) > 8  # the random answers do differ in score
    # the recorded scores are the RM's, computed here directly for a few rows
    rm = RewardModel.load(RewardModel.locate(str(w.rm)))
    for r in rows[:3]:
        direct = rm.score_answers([r["prompt"]] * 4, r["responses"])
        assert direct == pytest.approx(r["scores"], abs=1e-5)
    # what was fine-tuned on: the best answer of every kept prompt
    kept = read_jsonl(w.out / "kept.jsonl")
    assert [k["messages"] for k in kept] == [r["prompt"] + [{"role": "assistant", "content": r["response"]}]
                                             for r in rows]


def test_stage_folder_manifest_and_metrics(w):
    from transformers import AutoModelForCausalLM

    m = manifest(w.out)
    assert m["stage"] == "best-of-n" and is_policy("best-of-n") and STAGES["best-of-n"].kind == "policy"
    assert m["parents"] == [str(w.sft), str(w.rm)]
    rows = read_jsonl(w.out / "samples.jsonl")
    mx = m["metrics"]
    assert (mx["prompts"], mx["k"], mx["kept"]) == (8, 4, 8)
    assert mx["mean_best_score"] == pytest.approx(sum(r["score"] for r in rows) / 8)
    assert mx["mean_score"] == pytest.approx(sum(s for r in rows for s in r["scores"]) / 32)
    assert mx["selection_gain"] == pytest.approx(mx["mean_best_score"] - mx["mean_score"]) and mx["selection_gain"] > 0
    assert mx["sft_steps"] == 16
    # the fine-tune learns the kept answers: its loss on them falls (from about ln(vocab) = 10.8 nats per token)
    assert mx["sft_loss_before"] > 10 and mx["sft_loss_after"] < 0.7 * mx["sft_loss_before"]
    assert m["args"]["sampling"]["temperature"] == 1.0 and m["args"]["k"] == 4
    # a normal causal-LM folder with the manifest; nothing left of the fine-tune's own staging
    model = AutoModelForCausalLM.from_pretrained(w.out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    names = {p.name for p in w.out.iterdir()}
    assert {"model.safetensors", "samples.jsonl", "kept.jsonl", "metrics.jsonl", "rlhf_config.yaml"} <= names
    assert not {"sft", "sft.partial", "resume.json", "trainer"} & names
    assert not (w.run / "best-of-n.partial").exists()
    # the summary on stdout and the next command
    assert "best-of-n finished" in w.result.stdout and "selection_gain" in w.result.stdout
    assert f"next: rlhf eval policy --model {w.out}" in w.result.stdout.replace("\n", "")


def test_eval_policy_and_report_pick_up_the_stage(w):
    """`rlhf eval policy --run RUN` measures RUN/best-of-n (the newest policy stage) against RUN/sft; `rlhf report`
    lists the stage (it reads the stage registry)."""
    res = json.loads(ok(invoke("eval", "policy", "--run", w.run, "--prompts", w.prompts, "--max-samples", 2,
                               "--max-new-tokens", 4, "--threads", 1, "--json")).stdout)
    assert (res["model"], res["baseline"], res["reward"], res["prompts"]) == (str(w.out), str(w.sft), str(w.rm), 2)
    assert res["kl"] > 0  # the fine-tune moved the policy
    assert (w.out / "eval_policy.json").is_file()
    rep = json.loads(ok(invoke("report", w.run, "--out", w.root / "report.md", "--json")).stdout)
    assert [s["name"] for s in rep["stages"]] == ["sft", "reward", "best-of-n"]
    assert "| selection_gain |" in (w.root / "report.md").read_text(encoding="utf-8")


SAMPLED = ("prompt", "responses", "scores", "finished", "model")


def test_interrupt_resume_and_min_score(w, tmp_path, monkeypatch):
    """One run, stopped and resumed three times: Ctrl-C after the first batch keeps its scored rows; --resume
    samples the rest, the same answers and scores as the uninterrupted seeded run in RUN/best-of-n; with no prompt
    above --min-score it stops with one error and no stage folder, keeping the samples; --resume with a lower
    threshold reuses them (nothing sampled again) and fine-tunes on the prompts above it, until Ctrl-C after its
    first step; --resume continues the fine-tune from that checkpoint to the end."""
    from rlhf_cli.core import training
    from rlhf_cli.core.reward_model import RewardModel

    out, partial = tmp_path / "bon", tmp_path / "bon.partial"
    scored = RewardModel.score_answers
    calls = []

    def score_then_interrupt(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the batch finishes, is saved, the run stops
        return scored(self, *a, **kw)

    monkeypatch.setattr(RewardModel, "score_answers", score_then_interrupt)
    base = ["best-of-n", "--policy", w.sft, "--reward", w.rm, "--prompts", w.prompts, "--out", out,
            "--max-steps", 2, *FAST]
    stopped = invoke(*base)
    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert "stopped by SIGINT after 4 of 8 prompts" in stopped.stderr and "--resume" in stopped.stderr
    assert len(read_jsonl(partial / "samples.jsonl")) == 4 and not out.exists()

    one_error(invoke(*base, "--resume", "--min-score", 100), 1,
              "no prompt kept, so nothing to fine-tune on: --min-score 100 (the highest best score is", "--resume")
    assert len(calls) == 2  # only the second batch was sampled and scored
    assert not out.exists() and not list(tmp_path.glob(f"**/{MANIFEST}"))
    rows, seeded = read_jsonl(partial / "samples.jsonl"), read_jsonl(w.out / "samples.jsonl")
    assert [{k: r[k] for k in SAMPLED} for r in rows] == [{k: r[k] for k in SAMPLED} for r in seeded]
    assert not any(r["kept"] for r in rows) and {r["dropped"] for r in rows} == {"below --min-score"}

    best = sorted(r["score"] for r in rows)
    threshold = (best[3] + best[4]) / 2  # halfway between the 4th and 5th best scores: 4 of 8 prompts pass
    stepped = training.ProgressCallback.on_step_end

    def step_then_interrupt(self, args, state, control, **kw):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the fine-tune: its step 1 is checkpointed
        return stepped(self, args, state, control, **kw)

    monkeypatch.setattr(training.ProgressCallback, "on_step_end", step_then_interrupt)
    stopped = invoke(*base, "--min-score", threshold, "--resume")
    assert stopped.exit_code == 130 and "at step 1 of 2" in stopped.stderr, (stopped.stdout, stopped.stderr)
    assert not out.exists() and (partial / "sft.partial" / "trainer" / "checkpoint-1").is_dir()
    monkeypatch.setattr(training.ProgressCallback, "on_step_end", stepped)
    resumed = ok(invoke(*base, "--min-score", threshold, "--resume"))
    assert "resuming from" in resumed.stderr and "checkpoint-1" in resumed.stderr
    assert len(calls) == 2  # nothing sampled again
    rows = read_jsonl(out / "samples.jsonl")
    assert [r["kept"] for r in rows] == [r["score"] >= threshold for r in rows] and sum(r["kept"] for r in rows) == 4
    # the same seed wrote the same file as the uninterrupted run, but for which prompts passed the threshold
    assert [{k: v for k, v in r.items() if k not in ("kept", "dropped")} for r in rows] == \
        [{k: v for k, v in r.items() if k not in ("kept", "dropped")} for r in seeded]
    mx = manifest(out)["metrics"]
    assert (mx["kept"], mx["dropped"], mx["resumed_prompts"], mx["sft_steps"]) == (4, {"below --min-score": 4}, 8, 2)
    assert [k["messages"][-1]["content"] for k in read_jsonl(out / "kept.jsonl")] == \
        [r["response"] for r in rows if r["kept"]]


def test_bad_input_one_error_line_and_nothing_written(w, tmp_path):
    out = tmp_path / "out"
    common = ["--prompts", w.prompts, "--out", out, *FAST]
    one_error(invoke("best-of-n", "--policy", w.rm, "--reward", w.rm, *common), 1,
              f"--policy {w.rm}: is a reward stage", command_for("sft"))
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.sft, *common), 1,
              f"--reward {w.sft}: is an sft stage, expected a reward stage", command_for("reward"))
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.rm, "--prompts", tmp_path / "none.jsonl",
                     "--out", out), 1, "none.jsonl", "no such file")
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.rm, "--out", out), 2, "--prompts: missing")
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.rm, *common, "-k", 0), 2,
              "--num-samples 0: expected a whole number >= 1")
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.rm, *common, "--temperature", 0), 2,
              "--temperature 0 is greedy decoding")
    one_error(invoke("best-of-n", "--policy", w.sft, "--reward", w.rm, *common, "--resume"), 2,
              "--resume: no unfinished best-of-n run")
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, *FAST), 2,
              f"--out {w.out}: already holds a finished best-of-n stage; pass --overwrite")
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_select_rules():
    assert select([0.1, 0.5, 0.5, -1.0], ["a", "b", "c", "d"], None, None) == (1, None)  # the first of equals
    assert select([0.1, 0.5], ["a", "b"], 0.6, None) == (1, "below --min-score")
    assert select([0.1, 0.5], ["a", "b"], 0.5, None) == (1, None)  # at the threshold: kept
    assert select([0.4, 0.5], ["a", "b"], None, 0.1) == (1, "below --min-margin")  # 0.05 over the mean
    assert select([0.2, 0.5], ["a", "b"], None, 0.1) == (1, None)
    assert select([0.3, 0.5], ["a", "  "], None, None) == (1, "empty best answer")


def test_missing_eos_penalty_ranks_cut_off_answers_lower():
    """--missing-eos-penalty: an answer that ran out of tokens loses its lead, for best and for worst; the RM's
    scores are kept as they are."""
    from rlhf_cli.stages.best_of_n.args import BestOfNArgs

    def rows():
        return [{"scores": [0.9, 0.5, -0.2, -0.3], "finished": [False, True, True, False],
                 "responses": ["long and cut", "short", "meh", "bad"]}]

    plain, penal = rows(), rows()
    select_all(plain, BestOfNArgs(prompts="p", objective="dpo"))
    figures = select_all(penal, BestOfNArgs(prompts="p", objective="dpo", missing_eos_penalty=1.0))
    assert (plain[0]["best"], plain[0]["worst"]) == (0, 3)
    assert (penal[0]["best"], penal[0]["worst"]) == (1, 3)  # 0.9 - 1 = -0.1 < 0.5; -0.3 - 1 stays the worst
    assert penal[0]["score"] == 0.5 and penal[0]["scores"] == [0.9, 0.5, -0.2, -0.3]
    assert figures["kept_finished"] == 1.0
    pushed = [{"scores": [0.9, 0.5, -0.2], "finished": [True, False, True], "responses": ["a", "b", "c"]}]
    select_all(pushed, BestOfNArgs(prompts="p", objective="dpo", k=3, missing_eos_penalty=1.0))
    assert (pushed[0]["best"], pushed[0]["worst"]) == (0, 1)  # the cut-off answer becomes the rejected one


def test_library_api():
    from rlhf_cli import BestOfNArgs, run_best_of_n
    from rlhf_cli.stages.best_of_n.args import BestOfNArgs as Args
    from rlhf_cli.stages.best_of_n.train import run_best_of_n as run

    assert (BestOfNArgs, run_best_of_n) == (Args, run)
    assert BestOfNArgs(prompts="p.jsonl").k == 4


def test_demo_config_resolves():
    """The example config holds only known keys, opens with the command that runs it, and matches the demo."""
    from helpers import ROOT

    from rlhf_cli.core.config import resolve
    from rlhf_cli.stages.best_of_n.args import BestOfNArgs

    demo = ROOT / "examples" / "configs" / "demo_best_of_n.yaml"
    assert demo.read_text().startswith("# rlhf best-of-n --config examples/configs/demo_best_of_n.yaml --run runs/demo")
    args = resolve(BestOfNArgs, demo, {"run": "runs/demo", "k": 2})  # a flag overrides the file
    assert (args.prompts, args.k, args.max_new_tokens, args.freeze_layers) == ("examples/data/prompts.jsonl", 2, 48, 20)


def test_objective_dpo_trains_best_against_worst(w, tmp_path):
    """--objective dpo: each kept prompt's best answer against its worst (the RM's ranking of the policy's own
    samples), trained with DPO from the policy: the policy's log-probability margin of best over worst grows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bon-dpo"
    ok(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", out, "--objective", "dpo", "--beta",
              "0.1", "--max-steps", 8, "--lr-scheduler", "constant", *[x if x != "1e-2" else "1e-3" for x in FAST]))
    rows = read_jsonl(out / "samples.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    kept = [r for r in rows if r["kept"]]
    assert len(pairs) == len(kept) >= 6
    for r, p in zip(kept, pairs, strict=True):
        assert r["worst"] == min(range(4), key=lambda j: (r["scores"][j], j))
        assert p == {"prompt": r["prompt"], "chosen": r["response"], "rejected": r["responses"][r["worst"]]}
        assert r["worst_score"] < r["score"]
    m = manifest(out)
    assert m["args"]["objective"] == "dpo" and m["metrics"]["objective"] == "dpo"
    assert m["metrics"]["dpo_steps"] == 8 and m["parents"] == [str(w.sft), str(w.rm)]
    assert m["metrics"]["mean_worst_score"] < m["metrics"]["mean_best_score"]
    assert not (out / "kept.jsonl").exists() and not (out / "dpo").exists()

    tok = AutoTokenizer.from_pretrained(out)

    def margin(model_dir: Path) -> float:
        """Mean over the pairs of log p(chosen) - log p(rejected), each answer's tokens after its prompt."""
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        total = 0.0
        for p in pairs:
            lp = []
            for answer in (p["chosen"], p["rejected"]):
                prompt = tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
                full = tok.apply_chat_template(p["prompt"] + [{"role": "assistant", "content": answer}],
                                               tokenize=True, return_dict=False)
                ids = torch.tensor([full])
                with torch.no_grad():
                    logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                lp.append(float(logp[len(prompt) - 1:].sum()))
            total += lp[0] - lp[1]
        return total / len(pairs)

    before, after = margin(w.sft), margin(out)
    assert after > before + 1.0, (before, after)


def test_objective_dpo_needs_two_answers(w, tmp_path):
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", tmp_path / "x", "--objective",
                     "dpo", "-k", 1, "--threads", 1), 2, "--objective dpo: needs at least 2 answers per prompt")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_preference_pairs_rules():
    """--pairs all: every two answers whose selection scores differ, the higher one chosen, ordered by the chosen
    answer's rank; equal scores, equal texts, an empty chosen answer and gaps under --min-pair-gap make no pair."""
    ranked = [0.25, 1.0, -0.5, 0.25]  # exact in binary: the gaps are 0.75 and 1.5
    texts = ["a", "b", "c", "d"]
    every = [[1, 0], [1, 3], [1, 2], [0, 2], [3, 2]]  # not 0-3: equal scores
    assert preference_pairs(ranked, texts, 1, 2, "best-worst", None) == [[1, 2]]
    assert preference_pairs(ranked, texts, 1, 2, "all", None) == every
    assert preference_pairs(ranked, texts, 1, 2, "all", 0.75) == every  # at the gap: kept
    assert preference_pairs(ranked, texts, 1, 2, "all", 1.0) == [[1, 2]]
    assert preference_pairs(ranked, texts, 1, 2, "best-worst", 1.6) == []
    assert preference_pairs(ranked, ["a", "b", "b ", " "], 1, 2, "all", None) == [[1, 0], [1, 3], [0, 2]]
    # the same rules on a row: a kept prompt's pairs, and a prompt dropped when none is left
    from rlhf_cli.stages.best_of_n.args import BestOfNArgs

    rows = [{"scores": ranked, "finished": [True] * 4, "responses": texts},
            {"scores": [0.3, 0.1], "finished": [True, True], "responses": ["x", "y"]}]
    figures = select_all(rows, BestOfNArgs(prompts="p", objective="dpo", pairs="all", min_pair_gap=0.5))
    assert rows[0]["pairs"] == every and rows[0]["kept"]
    assert rows[1]["pairs"] == [] and rows[1]["dropped"] == "no pair --min-pair-gap apart"
    assert figures["dpo_pairs"] == 5 and figures["kept"] == 1


def test_objective_dpo_all_pairs(w, tmp_path):
    """--pairs all: pairs.jsonl holds every scored pair of each kept prompt's answers (a prompt's pairs next to
    each other), DPO trains on them grouped by prompt, and the manifest counts them."""
    out = tmp_path / "bon-all"
    result = ok(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", out, "--objective", "dpo",
                       "--pairs", "all", "--max-steps", 2, *FAST))
    rows = [r for r in read_jsonl(out / "samples.jsonl") if r["kept"]]
    pairs = read_jsonl(out / "pairs.jsonl")
    expected = []
    for r in rows:
        order = sorted(range(4), key=lambda j: (-r["scores"][j], j))
        for a, i in enumerate(order):
            expected += [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
                         for j in order[a + 1:] if r["scores"][i] > r["scores"][j]
                         and r["responses"][i].strip() and r["responses"][i].strip() != r["responses"][j].strip()]
    assert pairs == expected and len(pairs) > len(rows)
    m = manifest(out)
    assert m["metrics"]["dpo_pairs"] == len(pairs) and m["args"]["pairs"] == "all"
    assert f"DPO from {w.sft} on {len(pairs)} pairs" in result.output and "pairs grouped by prompt" in result.output


def test_pairs_flags_need_objective_dpo(w, tmp_path):
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", tmp_path / "x", "--pairs", "all",
                     "--threads", 1), 2, "--pairs: chooses the preference pairs of --objective dpo")
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", tmp_path / "x",
                     "--min-pair-gap", "0.5", "--threads", 1), 2, "--min-pair-gap: chooses the preference pairs")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
