"""Stage 3, the simple alternative to PPO: best-of-n rejection sampling, then fine-tuning on the winners.

InstructGPT's authors name it as the baseline an RL stage should beat: sample K answers per prompt from the policy,
keep the one the reward model (RM) scores highest, and fine-tune the policy on those (prompt, best answer) pairs.
There is no value model, no KL penalty and no on-policy loop, so it is cheap and stable; what it can gain is
bounded by how much better the best of K is than a typical sample (`selection_gain` in the manifest), and one
round moves the policy only as far as imitating those answers does. PPO optimises the RM score directly and can
go further (and over-optimise it).

1. Sample K answers per prompt (`core.generation.LM`, with the sampling of `rlhf generate`: the flags, else the
   policy's generation_config.json, else temperature 0.7 and top-p 0.9), in fixed batches of
   `--sample-batch-size` prompts, each seeded from `--seed` and its index: the same command draws the same
   answers, the ones `rlhf generate` draws with the same seed and batch size.
2. Score every answer with the RM (`core.reward_model.RewardModel`, prompt + answer through the RM's own chat
   template). Each batch's rows are appended to `OUT.partial/samples.jsonl` and fsynced before the next batch, so
   Ctrl-C (or SIGTERM) stops after the batch in flight and `--resume` samples only the prompts not yet scored.
3. Select, per prompt, the highest-scored answer (the first of equal ones). A prompt is dropped when that score is
   below `--min-score` (no answer good enough to imitate), when it beats the mean of the K scores by less than
   `--min-margin` (the RM sees little difference between the answers: the winner is mostly noise), or when the
   winner is empty. Nothing kept is an error.
4. Fine-tune with `rlhf sft` (`stages.sft.train.run_sft`) from the policy on the kept pairs (`kept.jsonl`), with
   this stage's optimisation flags; the SFT loss on the kept answers before and after goes into the manifest. The
   fine-tune trains in `OUT.partial/sft` and `--resume` continues it as `rlhf sft --resume` would.

With `--objective dpo`, step 4 is instead `rlhf dpo` (`stages.dpo.train.run_dpo`) from the policy, its own
reference, on each kept prompt's best answer against its worst (`pairs.jsonl`): the RM's ranking of the policy's
own samples, learned from both ends (online DPO, as in iterative/rejection-sampling DPO); a prompt whose best and
worst answers are the same text is dropped.

The result is a normal causal-LM folder (the fine-tuned policy) holding `samples.jsonl` (every prompt with its K
answers, their scores, the best one and whether it was kept), `kept.jsonl` (what was fine-tuned on), SFT's
`metrics.jsonl`, and `rlhf_manifest.json`, written last, whose parents are the policy and the RM.

    rlhf best-of-n --run runs/demo --prompts examples/data/prompts.jsonl -k 4 --max-new-tokens 48 --epochs 2
    rlhf eval policy --run runs/demo --model runs/demo/best-of-n --prompts examples/data/hh_prompts_test.jsonl
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_cli.core import dry_run as dry
from rlhf_cli.core import hub, launch, memory, runtime, vllm_engine
from rlhf_cli.core.config import dump_yaml, to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError, DataError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.generation import LM, Answer, Sampling, load_lm, pick_sampling, sampling_layers, tokenizer_lm
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.manifest import (
    MANIFEST,
    Manifest,
    ResumableOutput,
    manifest_if_stage,
    read_manifest,
    require_stage,
    stage_output,
    write_manifest,
)
from rlhf_cli.core.models import LoadOptions, load_tokenizer, resolve_model
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel, RewardSpec, read_config
from rlhf_cli.core.stages import a_stage, command_for, is_policy
from rlhf_cli.core.training import complete_checkpoints, plan_memory
from rlhf_cli.data import load_prompts
from rlhf_cli.interact.args import GENERATE_SAMPLING
from rlhf_cli.interact.generate import prompt_key, read_existing
from rlhf_cli.stages.best_of_n.args import BestOfNArgs, check_best_of_n_args
from rlhf_cli.stages.dpo.args import DPOArgs
from rlhf_cli.stages.dpo.train import run_dpo
from rlhf_cli.stages.sft.args import SFTArgs
from rlhf_cli.stages.sft.train import run_sft

STAGE = "best-of-n"
SAMPLING_TIMEOUT_S = 12 * 3600  # how long the other processes wait for rank 0's sampling
SAMPLES = "samples.jsonl"  # every prompt, its K answers and scores, the best and whether it was kept
KEPT = "kept.jsonl"  # the (prompt, best answer) pairs fine-tuned on, as SFT messages
PAIRS = "pairs.jsonl"  # --objective dpo: the (prompt, best answer, worst answer) rows trained on
DPO_DIR = "dpo"  # OUT.partial/dpo: the DPO fine-tune's stage folder, as SFT_DIR
SFT_DIR = "sft"  # OUT.partial/sft: the fine-tune's own stage folder until its files move up into OUT
RESUME_FILE = "resume.json"
# What decides the samples: a resumed run must use the same (the selection and the fine-tune's flags may change
# until the fine-tune has started; then `rlhf sft --resume` guards its own settings).
RESUME_KEYS = ("policy", "reward", "prompts", "max_samples", "k", "seed", "sample_batch_size", "temperature",
               "top_p", "top_k", "repetition_penalty", "max_new_tokens", "precision")
# The fine-tune flags passed to `rlhf sft` as they are.
SFT_KEYS = ("epochs", "max_steps", "lr", "lr_scheduler", "warmup_ratio", "batch_size", "grad_accum", "max_length",
            "weight_decay", "seed", "assistant_only_loss", "lora", "lora_r", "lora_alpha", "lora_dropout",
            "lora_targets", "lora_merge", "freeze_layers", "gradient_checkpointing", "max_memory", "micro_batch_size",
            "save_every", "logging_steps", "precision", "threads", "allow_pickle", "trust_remote_code",
            "report_to")
DPO_KEYS = tuple(k for k in SFT_KEYS if k != "assistant_only_loss")  # DPO learns from the answers' tokens only


# ---------------------------------------------------------------------------------------------------------
# Checks before anything is written


def pick_policy(args: BestOfNArgs, say: Callable[[str], None]) -> tuple[Path, Manifest | None]:
    """The policy's folder and manifest (RUN/sft when not given); refuses anything that does not generate."""
    if args.policy is None:
        if not args.run:
            raise ConfigError("--policy: missing; pass --policy SFT_DIR or --run DIR (uses DIR/sft)")
        args.policy = str(require_stage(Path(args.run) / "sft", "sft", "--run").path)
    m = manifest_if_stage(args.policy)
    if m is not None and not is_policy(m.stage):
        raise CheckpointError(f"--policy {args.policy}: is {a_stage(m.stage)}, expected a policy (a causal LM) such "
                              f"as an sft stage, made by `{command_for('sft')}`")
    path = resolve_model(args.policy, "--policy", say, LoadOptions.of(args))
    archs = read_config(path, "--policy").get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise CheckpointError(f"--policy {args.policy}: not a causal language model (found "
                              f"{', '.join(archs) or 'no architectures'}); expected an sft stage, made by "
                              f"`{command_for('sft')}`")
    return path, m


def pick_sampling_settings(args: BestOfNArgs, policy_path: Path, say: Callable[[str], None]) -> Sampling:
    sampling, line = pick_sampling(sampling_layers(args, policy_path, GENERATE_SAMPLING), args.max_new_tokens)
    if sampling.temperature == 0 and args.k > 1:  # greedy from the generation config
        raise ConfigError(f"--policy {args.policy}: its generation_config.json asks for greedy decoding (do_sample "
                          f"false), so all {args.k} answers would be the same; pass --temperature above 0 (such as "
                          f"0.7)")
    say(line)
    return sampling


def check_resume(args: BestOfNArgs, staged: ResumableOutput, say: Callable[[str], None]) -> None:
    """With --resume: an unfinished run to continue, sampled with the same settings."""
    part = staged.partial
    if not args.resume:
        if part.exists():
            say(f"discarding the unfinished run in {part} (pass --resume to continue it)")
        return
    try:
        saved = json.loads((part / RESUME_FILE).read_text(encoding="utf-8"))["args"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"--resume: no unfinished best-of-n run in {part}; start again without --resume") from None
    now = resume_dict(args)
    changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        flag = "--num-samples" if k == "k" else "--" + k.replace("_", "-")
        raise ConfigError(f"{flag} {now.get(k)}: the run being resumed used {saved.get(k)}; resume with the same "
                          f"sampling settings, or start again without --resume")


def resume_dict(args: BestOfNArgs) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RESUME_KEYS}


# ---------------------------------------------------------------------------------------------------------
# Steps 1-2: sample and score, batch by batch


def sample_and_score(args: BestOfNArgs, samples: Path, prompts: list[list[dict]], sampling: Sampling,
                     rm_spec: RewardSpec, reporter: Reporter) -> dict[str, Any]:
    """Append a scored row for every prompt not yet in `samples`; returns figures of this run's sampling."""
    say = reporter.info
    keys = [prompt_key(p) for p in prompts]
    done: set[str] = set()
    if samples.exists():
        done, _ = read_existing(samples, args.policy, args.k, say)
    todo = sum(k not in done for k in keys)
    figures: dict[str, Any] = {"sampled_prompts": todo, "resumed_prompts": len(keys) - todo}
    if todo == 0:
        return figures
    if done:
        say(f"{samples}: {len(keys) - todo} of {len(keys)} prompts already sampled and scored; {todo} to go")
    loading = LoadOptions.of(args)
    engine = None
    if args.use_vllm:  # the tokenizer here, the weights in vLLM
        lm = tokenizer_lm(args.policy, resolve_model(args.policy, "--policy", say, loading), loading)
    else:
        lm = load_lm(args.policy, "--policy", args.precision, say, loading)
    encoded, cut = lm.fit_prompts(prompts, sampling.max_new_tokens, "--policy")
    if args.use_vllm:
        engine = open_engine(args, lm, max(len(e) for e in encoded) + sampling.max_new_tokens)
    rm = RewardModel.load(rm_spec, args.precision)
    if cut:
        say(f"{cut} prompts longer than {lm.context - sampling.max_new_tokens} tokens kept their last tokens")
    say(f"sampling {args.k} answers per prompt from {args.policy} ({sampling.describe()}, max_new_tokens "
        f"{sampling.max_new_tokens}{', with vLLM' if engine else ''}); scoring them with {rm.name}")
    reporter.start(todo)
    t0 = time.time()
    written = new_tokens = 0
    best_sum = all_sum = 0.0
    bs = args.sample_batch_size
    try:
        with StopSignals(say, "batch") as signals, samples.open("a", encoding="utf-8") as f:
            for b, start in enumerate(range(0, len(keys), bs)):
                batch = range(start, min(start + bs, len(keys)))
                missing = [i for i in batch if keys[i] not in done]
                if not missing:
                    continue
                # Seeded per fixed batch, as `rlhf generate` is: a resumed run draws what an uninterrupted one would.
                runtime.seed_all(args.seed * 100_003 + b)
                answers = dict(zip(batch, sample(lm, engine, [encoded[i] for i in batch], args.k, sampling,
                                                 args.seed * 100_003 + b), strict=True))
                texts = [a.text for i in missing for a in answers[i]]
                scores = rm.score_answers([prompts[i] for i in missing for _ in range(args.k)], texts,
                                          batch_size=max(16, args.k))
                for n, i in enumerate(missing):
                    row_scores = scores[n * args.k:(n + 1) * args.k]
                    row = {"prompt": prompts[i], "responses": [a.text for a in answers[i]], "scores": row_scores,
                           "finished": [a.finished for a in answers[i]], "model": args.policy}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    new_tokens += sum(a.tokens for a in answers[i])
                    best_sum += max(row_scores)
                    all_sum += sum(row_scores) / args.k
                written += len(missing)
                f.flush()
                os.fsync(f.fileno())
                elapsed = time.time() - t0
                reporter.update(written, todo, {"best score": best_sum / written, "mean score": all_sum / written,
                                                "tokens/s": new_tokens / max(elapsed, 1e-9)}, elapsed)
                if signals and written < todo:  # the rows so far are on disk; --resume continues after them
                    raise signals.stop(f"after {written} of {todo} prompts", str(samples))
    finally:
        reporter.finish()
        if engine is not None:
            engine.close()  # the fine-tune's memory plan counts what is free after it
    if rm.truncated:
        say(f"{rm.truncated} prompt + answer sequences longer than {rm.max_length} tokens kept their last "
            f"{rm.max_length} tokens for the reward model")
    figures.update(sampling_seconds=round(time.time() - t0, 2), new_tokens=new_tokens,
                   generation=engine.name if engine is not None else "hf")
    del lm, rm
    gc.collect()
    memory.return_freed_memory()  # the fine-tune's memory plan counts what is free now
    return figures


def open_engine(args: BestOfNArgs, lm: LM, max_model_len: int) -> vllm_engine.Engine:
    """--use-vllm: a vLLM engine on the policy's folder, for the sampling only."""
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[runtime.pick_precision(args.precision)]
    return vllm_engine.VLLMEngine(lm.path, dtype=dtype, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                  max_model_len=max_model_len, eos_ids=lm.eos_ids, seed=args.seed,
                                  trust_remote_code=args.trust_remote_code)


def sample(lm: LM, engine: vllm_engine.Engine | None, prompts: list[list[int]], k: int, sampling: Sampling,
           seed: int) -> list[list[Answer]]:
    """K answers per prompt: transformers' generate on the loaded model, or the engine (seeded per batch)."""
    if engine is None:
        return lm.sample(prompts, k, sampling)
    rows = engine.generate(prompts, vllm_engine.SampleSettings(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty, n=k, seed=seed))
    return [[lm.answer(rows[p * k + j]) for j in range(k)] for p in range(len(prompts))]


def read_samples(samples: Path, prompts: list[list[dict]]) -> list[dict]:
    """The scored rows in prompt order, one per prompt."""
    by_key: dict[str, dict] = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_key[prompt_key(row["prompt"])] = row
    missing = [p for p in prompts if prompt_key(p) not in by_key]
    if missing:  # cannot happen after sample_and_score; a file edited by hand
        raise DataError(f"{samples}: no scored row for {len(missing)} prompts; start again without --resume")
    return [by_key[prompt_key(p)] for p in prompts]


# ---------------------------------------------------------------------------------------------------------
# Step 3: select


def select(scores: list[float], responses: list[str], min_score: float | None, min_margin: float | None
           ) -> tuple[int, str | None]:
    """The index of the best answer (the first of equal scores) and why its prompt is dropped (None: kept)."""
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))
    if min_score is not None and scores[best] < min_score:
        return best, "below --min-score"
    if min_margin is not None and scores[best] - sum(scores) / len(scores) < min_margin:
        return best, "below --min-margin"
    if not responses[best].strip():
        return best, "empty best answer"
    return best, None


def selection_scores(row: dict, missing_eos_penalty: float | None) -> list[float]:
    """The scores the choice of best and worst uses: the RM's, less --missing-eos-penalty for an answer that did
    not finish."""
    if not missing_eos_penalty:
        return list(row["scores"])
    return [s if done else s - missing_eos_penalty for s, done in zip(row["scores"], row["finished"], strict=True)]


def preference_pairs(ranked: list[float], responses: list[str], best: int, worst: int, which: str,
                     min_gap: float | None) -> list[list[int]]:
    """--objective dpo: the (chosen, rejected) answer indices trained on, by the selection's scores: the best
    against the worst, or with --pairs all every two answers whose scores differ (the higher one chosen), in order
    of the chosen answer's rank then the rejected one's. A pair needs two different texts, a non-empty chosen
    answer and, with --min-pair-gap, that much between the two scores."""
    if which == "best-worst":
        candidates = [(best, worst)]
    else:
        order = sorted(range(len(ranked)), key=lambda j: (-ranked[j], j))
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:] if ranked[i] > ranked[j]]
    text = [r.strip() for r in responses]
    return [[i, j] for i, j in candidates
            if text[i] and text[i] != text[j] and (min_gap is None or ranked[i] - ranked[j] >= min_gap)]


def select_all(rows: list[dict], args: BestOfNArgs) -> dict[str, Any]:
    """Mark each row's best answer and whether it is kept (with --objective dpo, also its worst and the pairs
    trained on); returns the selection's figures."""
    dropped: dict[str, int] = {}
    dpo = args.objective == "dpo"
    for row in rows:
        ranked = selection_scores(row, args.missing_eos_penalty)
        best, why = select(ranked, row["responses"], args.min_score, args.min_margin)
        worst = min(range(len(ranked)), key=lambda j: (ranked[j], j))
        pairs: list[list[int]] = []
        if dpo:
            pairs = preference_pairs(ranked, row["responses"], best, worst, args.pairs, args.min_pair_gap)
            if why is None and row["responses"][worst].strip() == row["responses"][best].strip():
                why = "best and worst answers the same"
            elif why is None and not pairs:
                why = "no pair --min-pair-gap apart"
        row.update(best=best, kept=why is None, dropped=why, response=row["responses"][best],
                   score=row["scores"][best], mean_score=sum(row["scores"]) / len(row["scores"]))
        if dpo:
            row.update(worst=worst, rejected=row["responses"][worst], worst_score=row["scores"][worst],
                       pairs=pairs if why is None else [])
        if why:
            dropped[why] = dropped.get(why, 0) + 1
    kept = [r for r in rows if r["kept"]]
    n = len(rows)
    mean_best = sum(r["score"] for r in rows) / n
    mean_all = sum(r["mean_score"] for r in rows) / n
    figures = {"prompts": n, "k": args.k, "kept": len(kept), "dropped": dropped or None,
               "mean_score": mean_all, "mean_best_score": mean_best, "selection_gain": mean_best - mean_all,
               "mean_kept_score": sum(r["score"] for r in kept) / len(kept) if kept else None,
               "reached_eos": sum(sum(r["finished"]) for r in rows) / (n * args.k),
               "kept_finished": sum(r["finished"][r["best"]] for r in kept) / len(kept) if kept else None}
    if dpo:
        figures["dpo_pairs"] = sum(len(r["pairs"]) for r in kept)
    return figures


def no_kept_error(rows: list[dict], args: BestOfNArgs, samples: Path) -> DataError:
    # the thresholds saw the selection's scores (less --missing-eos-penalty), so the message quotes those
    ranked = [selection_scores(r, args.missing_eos_penalty) for r in rows]
    top = max(max(s) for s in ranked)
    margin = max(max(s) - sum(s) / len(s) for s in ranked)
    why = []
    if args.min_score is not None:
        why.append(f"--min-score {args.min_score:g} (the highest best score is {top:.4g})")
    if args.min_margin is not None:
        why.append(f"--min-margin {args.min_margin:g} (the largest margin over the mean is {margin:.4g})")
    cause = " and ".join(why) if why else "every best answer is empty"
    return DataError(f"--prompts {args.prompts}: no prompt kept, so nothing to fine-tune on: {cause}; lower the "
                     f"threshold (the scored samples are kept in {samples}: add --resume to reuse them)")


# ---------------------------------------------------------------------------------------------------------
# Step 4: fine-tune


def sft_args(args: BestOfNArgs, dest: Path) -> SFTArgs:
    """`rlhf sft` on the kept pairs, from the policy, with this stage's optimisation flags; its loss on the kept
    answers before and after training is the eval loss."""
    kept = str(dest / KEPT)
    sft_dir = dest / SFT_DIR
    started = complete_checkpoints(sft_dir.with_name(SFT_DIR + ".partial"))
    return SFTArgs(model=args.policy, data=kept, eval_data=kept, out=str(sft_dir), overwrite=True, format="messages",
                   resume=args.resume and bool(started), **{k: getattr(args, k) for k in SFT_KEYS})


def dpo_args(args: BestOfNArgs, dest: Path) -> DPOArgs:
    """`rlhf dpo` on the kept pairs (best against worst, or with --pairs all every scored pair, a prompt's pairs
    in one batch), from the policy (also its reference), with this stage's optimisation flags; no eval set (before
    training the implicit reward margin is 0 by construction)."""
    dpo_dir = dest / DPO_DIR
    started = complete_checkpoints(dpo_dir.with_name(DPO_DIR + ".partial"))
    return DPOArgs(model=args.policy, data=str(dest / PAIRS), out=str(dpo_dir), overwrite=True, format="explicit",
                   method="dpo", beta=args.beta,
                   group_by_prompt=args.pairs == "all", resume=args.resume and bool(started),
                   **{k: getattr(args, k) for k in DPO_KEYS})


def write_kept(dest: Path, rows: list[dict], fine_tune_started: bool, objective: str = "sft") -> None:
    """The kept rows as the fine-tune reads them: SFT messages (`kept.jsonl`), or for --objective dpo explicit
    preference pairs (`pairs.jsonl`)."""
    def pairs(r: dict) -> list[dict]:
        return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
                for i, j in r["pairs"]]

    def messages(r: dict) -> list[dict]:
        return [{"messages": r["prompt"] + [{"role": "assistant", "content": r["response"]}]}]

    as_rows, path = (pairs, dest / PAIRS) if objective == "dpo" else (messages, dest / KEPT)
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for r in rows if r["kept"] for x in as_rows(r))
    if fine_tune_started and path.is_file() and path.read_text(encoding="utf-8") != text:
        raise ConfigError("--min-score/--min-margin/--missing-eos-penalty/--pairs/--min-pair-gap: they keep other "
                          "answers than the interrupted fine-tune was training on; resume with the same settings, "
                          "or start again without --resume")
    atomic_write_text(path, text)


def move_up(sft_dir: Path, dest: Path) -> Manifest:
    """The fine-tuned model's files into the stage folder; returns the fine-tune's manifest (its figures go into
    this stage's)."""
    m = read_manifest(sft_dir)
    for item in sft_dir.iterdir():
        if item.name not in (MANIFEST, "rlhf_config.yaml"):  # this stage writes its own
            os.replace(item, dest / item.name)
    shutil.rmtree(sft_dir)
    return m


# ---------------------------------------------------------------------------------------------------------
# The stage


def dry_run(args: BestOfNArgs, reporter: Reporter, out: Path, policy_path: Path, rm_spec: RewardSpec, ds: Any,
            loading: LoadOptions) -> Path:
    """`--dry-run`: the plan of this run (see `rlhf_cli.core.dry_run`): K answers of up to --max-new-tokens
    generated per prompt, each scored by the RM, then at most one kept answer per prompt fine-tuned on (an upper
    bound: thresholds keep fewer)."""
    choice = runtime.precision_choice(args.precision)
    precision = choice.precision
    tok = load_tokenizer(policy_path, loading=loading)
    prompt_lens = [len(tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]) for r in ds.rows]
    seqs = [n + args.max_new_tokens for n in prompt_lens]
    plan = plan_memory(args, policy_path, causal=True, lengths=seqs, seqs_per_example=1, precision=precision,
                       say=reporter.info)
    shape, rm_shape = memory.ModelShape.of(policy_path), memory.ModelShape.of(rm_spec.path)
    answers = len(prompt_lens) * args.k
    dpo = args.objective == "dpo"  # two answers per pair trained, and the reference's pass over both
    per_prompt = args.k * (args.k - 1) // 2 if dpo and args.pairs == "all" else 1  # at most, with --pairs all
    items = len(prompt_lens) * per_prompt
    steps, per_epoch = dry.trainer_steps(args, items)
    trained = dry.padded_tokens(seqs, plan.micro_batch, seed=args.seed) * per_prompt * steps / per_epoch
    compute = dry.Compute(
        train_flops=(2 if dpo else 1) * trained * dry.train_flops(shape, head=1.0, lora=args.lora,
                                                                  lora_r=args.lora_r,
                                                                  freeze_layers=args.freeze_layers or 0),
        forward_flops=(args.k * sum(prompt_lens) * dry.forward_flops(shape, 0.0)
                       + args.k * sum(seqs) * dry.forward_flops(rm_shape, 0.0)
                       # sft: the eval loss before and after; dpo: the reference on both answers per pass
                       + (2 * trained if dpo else 2 * sum(seqs)) * dry.forward_flops(shape, 1.0)),
        decode_tokens=answers * args.max_new_tokens, decode_batch=args.sample_batch_size * args.k)
    t = dry.estimate_time(compute, shape, int(plan.micro_batch * sum(seqs) / max(len(seqs), 1)), precision)
    summary = {"policy": f"{args.policy} ({policy_path})", "reward model": f"{args.reward} ({rm_spec.path})",
               "prompts": ds.describe(), "prompt token lengths": dry.length_stats(prompt_lens),
               "answers sampled": f"{answers} ({len(prompt_lens)} prompts x -k {args.k}, up to {args.max_new_tokens} "
                                  f"tokens each), each scored by the reward model",
               "optimisation steps": f"at most {steps} ({per_epoch} per epoch over at most {items} kept "
                                     f"{'pairs' if dpo else 'answers'}; effective batch "
                                     f"{args.batch_size * args.grad_accum})",
               "tokens per epoch": f"{sum(seqs) * per_prompt} (at most: every prompt kept, every answer "
                                   f"{args.max_new_tokens} tokens)",
               "generation": vllm_engine.describe(args.use_vllm, "colocate", args.vllm_gpu_memory_utilization)}
    return dry.finish(reporter, dry.report(STAGE, out, args, summary, steps, sum(seqs) * per_prompt, plan, t,
                                           {"precision (used)": str(choice)}))


def run_best_of_n(args: BestOfNArgs, reporter: Reporter | None = None) -> Path:
    """Sample K answers per prompt, keep the RM's best, fine-tune the policy on them; returns the stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    check_best_of_n_args(args)
    policy_path, _ = pick_policy(args, say)
    loading = LoadOptions.of(args)
    rm_spec = RewardModel.locate(args.reward, args.run, "--reward", say, loading)
    args.reward = rm_spec.name
    ds = load_prompts(args.prompts, args.max_samples)
    say(ds.describe())
    prompts = [r["prompt"] for r in ds.rows]
    sampling = pick_sampling_settings(args, policy_path, say)
    staged = stage_output(args.out, args.run, STAGE, args.overwrite, ResumableOutput, resume=args.resume)
    check_resume(args, staged, say)
    if not args.dry_run:  # before any weights load; a dry run shows whether it would run here instead
        vllm_engine.check_vllm(args.use_vllm, launch.processes(args), what="rlhf best-of-n")
    if args.dry_run:
        return dry_run(args, reporter, staged.out, policy_path, rm_spec, ds, loading)

    runtime.quiet_libraries()
    threads = runtime.configure_threads(args.threads)
    # Under several processes rank 0 samples alone while the others wait (hence the long timeout), then every
    # rank fine-tunes on its share of the kept answers.
    runtime.init_distributed(timeout_s=SAMPLING_TIMEOUT_S)
    with staged as dest:
        samples = dest / SAMPLES
        sampled: dict[str, Any] = {}
        if runtime.is_main_process():
            atomic_write_text(dest / RESUME_FILE, json.dumps({"args": resume_dict(args)}, indent=2) + "\n")
            sampled = sample_and_score(args, samples, prompts, sampling, rm_spec, reporter)
            rows = read_samples(samples, prompts)
            select_all(rows, args)
            atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        runtime.barrier()
        rows = read_samples(samples, prompts)
        picked = select_all(rows, args)
        if not picked["kept"]:
            raise no_kept_error(rows, args, samples)
        say(f"kept {picked['kept']} of {picked['prompts']} prompts; mean best score {picked['mean_best_score']:.4g}, "
            f"mean score of all {args.k * picked['prompts']} answers {picked['mean_score']:.4g} (selection gain "
            f"{picked['selection_gain']:.4g})")
        if args.missing_eos_penalty:
            say(f"--missing-eos-penalty {args.missing_eos_penalty:g}: answers that did not finish ranked that much "
                f"lower; {picked['kept_finished']:.0%} of the kept best answers finished ({picked['reached_eos']:.0%} "
                f"of all answers)")

        dpo = args.objective == "dpo"
        fine_tune = dpo_args(args, dest) if dpo else sft_args(args, dest)
        sft_dir = Path(fine_tune.out)
        if read_manifest(sft_dir) is None:
            if runtime.is_main_process():
                write_kept(dest, rows, fine_tune.resume, args.objective)
            runtime.barrier()
            if dpo:
                which = "best against worst answers" if args.pairs == "best-worst" else \
                    "answers, every two whose scores differ"
                which += f" by at least {args.min_pair_gap:g}" if args.min_pair_gap is not None else ""
                say(f"DPO from {args.policy} on {picked['dpo_pairs']} pairs of the {picked['kept']} kept prompts' "
                    f"{which} ({dest / PAIRS})")
                run_dpo(fine_tune, reporter)
            else:
                say(f"fine-tuning {args.policy} on the {picked['kept']} kept answers ({dest / KEPT})")
                run_sft(fine_tune, reporter)
        if not runtime.is_main_process():
            return staged.out  # rank 0 writes the stage folder; StagedOutput waits for it on the way out
        sft = move_up(sft_dir, dest)
        (dest / RESUME_FILE).unlink(missing_ok=True)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf best-of-n --config rlhf_config.yaml\n")
        sm = sft.metrics
        common = {"threads": threads, "precision": sm.get("precision"),
                  "precision_reason": sm.get("precision_reason"), "memory": sm.get("memory")}
        if dpo:
            kept_rows = [r for r in rows if r["kept"]]
            metrics = picked | sampled | common | {
                "objective": "dpo", "mean_worst_score": sum(r["worst_score"] for r in kept_rows) / len(kept_rows),
                "dpo_steps": sm.get("steps"), "dpo_train_loss": sm.get("train_loss"),
                "dpo_reward_margin_last": sm.get("train_rewards_margins_last"),
                "dpo_reward_accuracy_last": sm.get("train_rewards_accuracies_last"),
                "dpo_train_seconds": sm.get("train_seconds")}
        else:
            metrics = picked | sampled | common | {
                "objective": "sft",
                "sft_loss_before": sm.get("eval_loss_before"), "sft_loss_after": sm.get("eval_loss"),
                "sft_steps": sm.get("steps"), "sft_train_loss": sm.get("train_loss"),
                "sft_first_loss": sm.get("first_loss"), "sft_last_loss": sm.get("last_loss"),
                "sft_train_seconds": sm.get("train_seconds")}
        resolved = {"resolved_policy": str(policy_path), "resolved_reward": str(rm_spec.path),
                    "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                                 "repetition_penalty": sampling.repetition_penalty},
                    "lr": sft.args.get("lr"), "max_length": sft.args.get("max_length")}
        data = {"prompts": ds.summary(), "kept": sft.data.get("data", {}).get("train")}
        write_manifest(dest, stage=STAGE, parents=[args.policy, args.reward], args=to_dict(args) | resolved,
                       data=data, metrics=metrics, started=started)
    hub.push_if_asked(args, staged.out, say)  # --push-to-hub: checked before sampling, uploaded now
    return staged.out
