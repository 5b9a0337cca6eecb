"""`rlhf eval policy`: is the trained policy better than its baseline, and how far did it move to get there?

For every prompt both MODEL (say the PPO policy) and BASE (say the SFT model it started from) sample one answer;
the reward model (RM) scores both, rendered as prompt + answer through the RM tokenizer's own chat template.

- win / tie / loss: MODEL's score against BASE's on the same prompt; a tie when they differ by at most
  `--tie-margin` (default 0: only exactly equal scores). `win_rate` counts a tie as half a win (so a model
  compared with itself scores 0.5), `tie_rate` and `loss_rate` are the plain shares of ties and losses.
  `win_rate_ci` is the 95% Wilson score interval of `win_rate` over the prompts (ties as half a success).
- `kl`: KL(MODEL || BASE) per answer, the sequence-level k1 estimate on MODEL's own samples: the sum over the
  answer's tokens (up to and including EOS; all of them when cut at --max-new-tokens) of log p_MODEL - log p_BASE,
  both by teacher forcing, then averaged over prompts. Log-probabilities use the sampling temperature (logits / T,
  as `rlhf ppo` does, so the figure is comparable with its `kl`; T = 1 when greedy), over the full vocabulary
  (--top-p, --top-k and --repetition-penalty do not change them). Needs the same vocabulary in both models;
  otherwise it is left out.
- lengths: answer tokens up to and including EOS (as `rlhf ppo` counts `response_length`); distinct-1/2: distinct
  token unigrams / bigrams over all of a model's answers, divided by their total count (EOS not counted).

Other judges (`--judge RM_DIR`, repeatable) score the same answers: win / tie / loss, the win rate with its
interval and the mean scores under each one, in `judges` (the `--reward` RM first). A policy trained against an RM
can learn what that RM over-rewards rather than what people want; a second RM that did not steer training is a
check on that. The training RM is the one MODEL's manifest names (ppo, grpo, rloo and best-of-n record theirs);
when its win-rate interval lies above 0.5 and another judge's does not, `gain_only_under_training_rm` is true and
a warning says so.

Sampling settings not given are inherited from MODEL's ppo manifest (the distribution it was trained to sample
from), else taken from MODEL's generation_config.json, else the defaults for small instruct models (temperature
0.2, top-p 0.9; `core.args.SAMPLING_DEFAULTS`), and max-new-tokens 64. Both models always sample with these same
settings, so the contest is fair: BASE's own generation_config.json is not used (a line says so when it differs).
`--temperature 0` is greedy decoding for both. Each batch of prompts is seeded from `--seed` and its
index, the same for both models: a model compared with itself samples identical answers (all ties, KL 0), and
two similar models draw from common random numbers, so they often give the same answer where they agree (a tie).
Means, KL, lengths and diversity do not depend on this coupling; the win and tie rates do: `--baseline-seed`
draws BASE's answers independently of MODEL's.

    rlhf eval policy --run runs/demo --prompts examples/data/prompts.jsonl --json
    rlhf eval policy --model runs/demo/ppo --baseline runs/demo/sft --reward runs/demo/reward \\
        --prompts examples/data/prompts.jsonl --save runs/demo/eval_policy.jsonl
    rlhf eval policy --run runs/demo --prompts examples/data/prompts.jsonl --judge runs/other/reward
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.core import linear_kernels, runtime
from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.generation import (
    LM,
    SAMPLING_KEYS,
    Sampling,
    cut_at_eos,
    last_logits,
    load_lm,
    pad_batch,
    pick_sampling,
    refuse_reward_stage,
    sampling_differs,
    sampling_layers,
)
from rlhf_cli.core.manifest import Manifest, manifest_if_stage, read_manifest, require_stage
from rlhf_cli.core.models import LoadOptions, cache_dir, resolve_model
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel
from rlhf_cli.core.stages import EVAL_FILE, ORDER, POLICY_STAGES
from rlhf_cli.data import load_prompts
from rlhf_cli.evaluation.args import POLICY_MAX_NEW_TOKENS, EvalPolicyArgs
from rlhf_cli.stages.ppo.core import logprobs_from_logits

Z95 = 1.959963984540054


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure Python, unit-tested on their own)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; `successes` may be fractional (ties counted as half)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def distinct_n(sequences: list[list[int]], n: int) -> float | None:
    """Distinct n-grams over all sequences divided by their total count (Li et al. 2016); None if there are none."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def outcomes(scores: list[float], base_scores: list[float], tie_margin: float) -> list[str]:
    return ["tie" if abs(a - b) <= tie_margin else "win" if a > b else "loss"
            for a, b in zip(scores, base_scores, strict=True)]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def contest_figures(scores: list[float], base_scores: list[float], oc: list[str]) -> dict[str, Any]:
    """Win / tie / loss counts and rates (a tie is half a win), the win rate's 95% Wilson interval, mean scores."""
    n = len(oc)
    wins, ties = oc.count("win"), oc.count("tie")
    losses = n - wins - ties
    lo, hi = wilson_interval(wins + ties / 2, n)
    return {"win_rate": (wins + ties / 2) / n, "win_rate_ci": [lo, hi], "tie_rate": ties / n, "loss_rate": losses / n,
            "wins": wins, "ties": ties, "losses": losses, "mean_score": _mean(scores),
            "baseline_mean_score": _mean(base_scores),
            "mean_score_diff": _mean([a - b for a, b in zip(scores, base_scores, strict=True)])}


def gain_only_under_training(judges: list[dict[str, Any]]) -> list[str] | None:
    """The judges under which a gain the training RM sees does not hold: the training RM's win-rate interval lies
    above 0.5 and theirs does not. None when that cannot be told (no judge is the training RM, or no other)."""
    training = [j for j in judges if j["training_rm"]]
    others = [j for j in judges if not j["training_rm"]]
    if not training or not others:
        return None
    if training[0]["win_rate_ci"][0] <= 0.5:
        return []
    return [j["reward"] for j in others if j["win_rate_ci"][0] <= 0.5]


# ---------------------------------------------------------------------------------------------------------
# Checks before any model loads


def _pick_lm(spec: str | None, run: str | None, stage: str, flag: str) -> str:
    if spec is None:
        if run is None:
            raise ConfigError(f"{flag}: missing; pass {flag} DIR or --run DIR (uses DIR/{stage})")
        return str(require_stage(Path(run) / stage, stage, "--run").path)
    refuse_reward_stage(spec, flag)
    return spec


def newest_policy(run: str) -> str:
    """The policy to measure when only --run is given: the newest finished policy stage in RUN other than sft (the
    baseline), such as RUN/ppo or RUN/best-of-n; RUN/ppo (and its error) when there is none."""
    found = [(m.data.get("finished") or "", ORDER.index(name), str(m.path)) for name in POLICY_STAGES
             if name != "sft" and (m := read_manifest(Path(run) / name)) is not None and m.stage == name]
    return max(found)[2] if found else str(require_stage(Path(run) / "ppo", "ppo", "--run").path)


def _sampling(args: EvalPolicyArgs, model_manifest: Manifest | None, model_path: Path,
              say: Callable[[str], None]) -> Sampling:
    """The flags, else MODEL's ppo stage, else MODEL's generation_config.json, else the defaults (module doc)."""
    parent = model_manifest.args if model_manifest is not None and model_manifest.stage == "ppo" else {}
    inherited: dict[str, Any] = {}
    for name in (*SAMPLING_KEYS, "max_new_tokens"):
        if getattr(args, name) is None and (parent.get(name) is not None or (name == "top_k" and name in parent)):
            inherited[name] = parent[name] or 0
            say(f"inherited {name}={inherited[name]} from {model_manifest.path}")
    layers = sampling_layers(args, model_path)
    if inherited:
        layers.insert(1, (f"from the ppo stage {model_manifest.path}", inherited))
    max_new_tokens = args.max_new_tokens or inherited.get("max_new_tokens") or POLICY_MAX_NEW_TOKENS
    sampling, line = pick_sampling(layers, max_new_tokens)
    say(line)
    return sampling


def training_reward(m: Manifest | None) -> str | None:
    """The RM that MODEL's stage was trained against, when its manifest says: the `reward` setting (ppo, grpo,
    rloo, best-of-n), else a parent that is a reward stage."""
    if m is None:
        return None
    if m.args.get("reward"):
        return str(m.args["reward"])
    for parent in m.data.get("parents") or []:
        pm = manifest_if_stage(parent) if isinstance(parent, str) and Path(parent).is_dir() else None
        if pm is not None and pm.stage == "reward":
            return parent
    return None


def _norm(p: Any) -> str:
    """A folder as a comparable string: resolved when it is local, else the name as given (a hub id)."""
    path = Path(str(p))
    return str(path.resolve()) if path.exists() else str(p)


def _check(args: EvalPolicyArgs) -> None:
    if isinstance(args.judges, str):  # one judge given as a string in YAML or from the Python API
        args.judges = [args.judges]
    if args.judges is not None and not (isinstance(args.judges, list)
                                        and all(isinstance(j, str) and j for j in args.judges)):
        raise ConfigError(f"--judge {args.judges!r}: expected reward model folders (a list of paths in YAML: "
                          f"`judges: [runs/a/reward, runs/b/reward]`)")
    validate(args)
    if args.run is not None and not Path(args.run).is_dir():
        raise CheckpointError(f"--run {args.run}: no such folder; expected a run folder holding finished sft, "
                              f"reward and ppo stages (made by `rlhf sft --run {args.run}`, `rlhf reward ...`)")
    if args.prompts is None:
        raise ConfigError("--prompts: missing; expected a prompt file (or any SFT or preference file)")
    if args.save is not None and Path(args.save).is_dir():
        raise ConfigError(f"--save {args.save}: is a folder; expected a .jsonl file path")


# ---------------------------------------------------------------------------------------------------------
# Sampling, teacher forcing


def sample_ids(lm: LM, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """One answer per prompt as token ids, cut after the first EOS."""
    return [cut_at_eos(row, lm.eos_ids)[0] for row in lm.sample_ids(prompts, 1, sampling)]


def answer_logprob(model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], temperature: float,
                   pad_id: int) -> list[float]:
    """Sum of log p(answer token | prompt, earlier answer tokens) per row, by teacher forcing. Left padding (with
    positions counted over real tokens, as generate does) ends every answer at the last column, so vocabulary
    logits are computed for the last (longest answer + 1) positions only, not for every prompt token: at 48-token
    answers to 800-token prompts, a batch of 8 holds 77 MB of logits instead of 1.26 GB."""
    x, att = pad_batch([p + a for p, a in zip(prompts, answers, strict=True)], pad_id, left=True)
    r = max(len(a) for a in answers)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        x, att = x.to(dev), att.to(dev)
        logits = last_logits(model, x, att, r + 1)
        out = []
        for row, a in enumerate(answers):
            # logits[:, j] predicts the token at column W - r + j (W: the batch's width), so this answer's
            # tokens, the last len(a) columns, are predicted by positions r - len(a) .. r - 1
            lg = logits[row, r - len(a):r].float() / temperature
            lp = logprobs_from_logits(lg.unsqueeze(0), torch.tensor([a], device=lg.device))
            out.append(float(lp.sum()))
    return out


@dataclass
class Contest:
    """The two models, their encoded prompts, and what they answered."""

    model: LM
    base: LM
    model_prompts: list[list[int]]
    base_prompts: list[list[int]]
    same_vocab: bool
    answers: list[list[int]]
    base_answers: list[list[int]]
    kls: list[float | None]


def _load_contest(args: EvalPolicyArgs, model_spec: str, base_spec: str, prompts: list[list[dict]],
                  sampling: Sampling, say: Callable[[str], None]) -> tuple[Contest, int]:
    """Both models loaded (one copy when they are the same folder) with their prompts fitted to their context;
    also returns how many prompts were cut."""
    loading = LoadOptions.of(args)
    model_path = resolve_model(model_spec, "--model", loading=loading)
    base_path = resolve_model(base_spec, "--baseline", say, loading)
    same = Path(base_path).resolve() == Path(model_path).resolve()
    note = None if same else sampling_differs((f"--model {model_spec}", model_path),
                                              (f"--baseline {base_spec}", base_path), "so the contest is fair")
    if note:
        say(note)
    model = load_lm(model_spec, "--model", args.precision, say, loading)
    base = model if same else load_lm(base_spec, "--baseline", args.precision, lambda s: None, loading)
    same_vocab = same or model.tok.get_vocab() == base.tok.get_vocab()
    if not same_vocab:
        say(f"--baseline {base_spec}: its vocabulary differs from --model {model_spec}'s, so the KL between them "
            f"is not measured")
    model_prompts, cut = model.fit_prompts(prompts, sampling.max_new_tokens, "--model")
    base_prompts, base_cut = (model_prompts, cut) if same else base.fit_prompts(prompts, sampling.max_new_tokens,
                                                                                 "--baseline")
    if cut or base_cut:
        say(f"{max(cut, base_cut)} prompts too long for the context kept their last tokens")
    return Contest(model, base, model_prompts, base_prompts, same_vocab, [], [], []), max(cut, base_cut)


CACHED_ANSWERS = 64  # answer files kept in RLHF_CLI_CACHE/eval_answers (the newest)


def baseline_seed(args: EvalPolicyArgs) -> int:
    """The seed BASE's answers are drawn with: --baseline-seed, else --seed (the same random numbers as MODEL)."""
    return args.seed if args.baseline_seed is None else args.baseline_seed


def answers_key(c: Contest, args: EvalPolicyArgs, sampling: Sampling, side: str) -> str:
    """What one side's answers depend on (`side`: "baseline" or "model"): its files (names, sizes, modification
    times), the encoded prompts, the sampling settings, seed and batch size, and the numerics (precision, threads,
    library versions, the linear layers' kernel). MODEL's key also holds BASE's, since MODEL's KL to BASE is kept
    with its answers. The same key means the same answers: sampling is seeded per batch and deterministic on a
    given machine."""
    import transformers

    lm, prompts, seed = ((c.base, c.base_prompts, baseline_seed(args)) if side == "baseline"
                         else (c.model, c.model_prompts, args.seed))
    files = sorted((f.name, st.st_size, st.st_mtime_ns) for f in Path(lm.path).iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model") for st in [f.stat()])
    what = {"v": 3, "base": str(Path(lm.path).resolve()), "files": files, "prompts": prompts,
            "sampling": dataclasses.asdict(sampling), "batch_size": args.batch_size,
            "seed": seed, "precision": str(next(lm.model.parameters()).dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "linear": linear_kernels.kernel_name()}
    if side == "model":
        what |= {"side": "model", "against": answers_key(c, args, sampling, "baseline")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def answers_cache(c: Contest, args: EvalPolicyArgs, sampling: Sampling, side: str) -> Path | None:
    """Where one side's answers to these prompts are kept for the next evaluation the same way: BASE's when
    several policies are measured against one SFT model, MODEL's (with its KL to BASE) when the same policy is
    measured again, by another judge for instance. RLHF_CLI_CACHE/eval_answers; None with --no-cache."""
    if not args.cache:
        return None
    return cache_dir() / "eval_answers" / f"{answers_key(c, args, sampling, side)}.json"


def read_cached(path: Path | None, n: int, with_kls: bool = False) -> dict[str, list] | None:
    """The kept answers (and KLs) when `path` holds `n` of them, else None."""
    try:
        got = json.loads(path.read_text(encoding="utf-8")) if path else None
        answers, kls = got["answers"], got["kls"] if with_kls else []
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: sample again (and write it anew)
    ok = (isinstance(answers, list) and len(answers) == n and all(isinstance(a, list) for a in answers)
          and (not with_kls or (isinstance(kls, list) and len(kls) == n)))
    return {"answers": answers, "kls": kls} if ok else None


def keep_answers(path: Path | None, record: dict[str, Any], reporter: Reporter) -> None:
    """Write one side's answers into the cache, keeping only its newest files."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))
        kept = sorted(path.parent.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in kept[CACHED_ANSWERS:]:  # the newest ones only: the cache stays small
            old.unlink(missing_ok=True)
    except OSError as e:  # a read-only cache costs the next run time, not this one its result
        reporter.info(f"could not keep the answers in {path}: {e}")


def batches_by_length(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Prompt indices in batches of `size`, shortest prompts first: a batch pads every prompt to its longest, so
    batching prompts of similar length saves most of the padding (on multi-turn prompts of mixed lengths, most of
    the work). The order depends on the prompts alone, so both models and every run get the same batches."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _sample_both(c: Contest, args: EvalPolicyArgs, sampling: Sampling, reporter: Reporter) -> None:
    """One answer per prompt from each model, batch by batch (prompts of similar length together), with MODEL's
    KL to BASE on its own answers. Either side's answers come from the cache when it holds them (`answers_cache`):
    BASE's when another policy was measured against it the same way, MODEL's (and its KL) when this one was.
    The answers end up in the prompts' order."""
    n, bs = len(c.model_prompts), args.batch_size
    temp = sampling.temperature or 1.0
    cache, mcache = (answers_cache(c, args, sampling, side) for side in ("baseline", "model"))
    cached, mcached = read_cached(cache, n), read_cached(mcache, n, with_kls=True)
    if cached is not None:
        reporter.info(f"--baseline: its answers to these prompts with these settings and seed reused from {cache} "
                      f"(--no-cache samples them again)")
    if mcached is not None:
        reporter.info(f"--model: its answers to these prompts with these settings and seed, and their KL to "
                      f"--baseline, reused from {mcache} (--no-cache samples them again)")
    answers: list[list[int] | None] = [None] * n
    base_answers: list[list[int] | None] = [None] * n
    kls: list[float | None] = [None] * n
    reporter.start(n)
    t1 = time.time()
    new_tokens, done = 0, 0
    try:
        for b, idx in enumerate(batches_by_length(c.model_prompts, bs)):
            if mcached is not None:
                a = [list(mcached["answers"][i]) for i in idx]
                for i in idx:
                    kls[i] = mcached["kls"][i]
            else:
                # the same seed per batch for both models: identical models sample identical answers
                runtime.seed_all(args.seed * 100_003 + b)
                a = sample_ids(c.model, [c.model_prompts[i] for i in idx], sampling)
            if cached is not None:
                ba = [list(cached["answers"][i]) for i in idx]
            else:
                runtime.seed_all(baseline_seed(args) * 100_003 + b)
                ba = sample_ids(c.base, [c.base_prompts[i] for i in idx], sampling)
            if c.same_vocab and mcached is None:
                lp = answer_logprob(c.model.model, [c.model_prompts[i] for i in idx], a, temp,
                                    c.model.tok.pad_token_id)
                lq = answer_logprob(c.base.model, [c.base_prompts[i] for i in idx], a, temp, c.base.tok.pad_token_id)
                for i, x, y in zip(idx, lp, lq, strict=True):
                    kls[i] = x - y
            for i, x, y in zip(idx, a, ba, strict=True):
                answers[i], base_answers[i] = x, y
            done += len(idx)
            new_tokens += (sum(map(len, a)) if mcached is None else 0) + (sum(map(len, ba)) if cached is None else 0)
            elapsed = time.time() - t1
            reporter.update(done, n, {"tokens/s": new_tokens / max(elapsed, 1e-9)}, elapsed)
    finally:
        reporter.finish()
    c.answers, c.base_answers, c.kls = answers, base_answers, kls  # type: ignore[assignment]
    if cached is None:
        keep_answers(cache, {"baseline": str(c.base.path), "answers": c.base_answers}, reporter)
    if mcached is None:
        keep_answers(mcache, {"model": str(c.model.path), "answers": c.answers, "kls": c.kls}, reporter)


# ---------------------------------------------------------------------------------------------------------
# The command


def eval_policy(args: EvalPolicyArgs, reporter: Reporter | None = None) -> dict[str, Any]:
    """Sample MODEL and BASE on every prompt, judge both with the RM; returns the summary (see the module doc).

    Writes per-prompt rows to `args.save` when given, and `eval_policy.json` into MODEL when it is a stage
    folder (for `rlhf report`)."""
    reporter = reporter or Reporter()
    say = reporter.info
    t0 = time.time()
    _check(args)
    if args.model or not args.run:
        model_spec = _pick_lm(args.model, args.run, "ppo", "--model")
    else:
        model_spec = newest_policy(args.run)
        say(f"measuring {model_spec}, the newest policy stage in {args.run} (--model to choose another)")
    base_spec = _pick_lm(args.baseline, args.run, "sft", "--baseline")
    loading = LoadOptions.of(args)
    judge_spec = RewardModel.locate(args.reward, args.run, "--reward", say, loading)
    extra_specs, seen = [], {_norm(judge_spec.path)}
    for name in args.judges or []:
        spec = RewardModel.locate(name, None, "--judge", say, loading)
        if _norm(spec.path) in seen:
            say(f"--judge {name}: already judging, counted once")
            continue
        seen.add(_norm(spec.path))
        extra_specs.append(spec)
    model_manifest = manifest_if_stage(model_spec)
    training = training_reward(model_manifest)
    sampling = _sampling(args, model_manifest, resolve_model(model_spec, "--model", say, loading), say)
    ds = load_prompts(args.prompts, args.max_samples)
    say(ds.describe())
    prompts = [r["prompt"] for r in ds.rows]

    runtime.quiet_libraries()
    threads = runtime.configure_threads(args.threads)
    judge = RewardModel.load(judge_spec, args.precision)
    contest, cut = _load_contest(args, model_spec, base_spec, prompts, sampling, say)
    say(f"sampling one answer per prompt from {model_spec} and from {base_spec} ({threads} thread"
        f"{'s' if threads != 1 else ''}, {sampling.describe()}, max_new_tokens {sampling.max_new_tokens}); "
        f"judged by {judge.name}")
    _sample_both(contest, args, sampling, reporter)
    per_prompt = _judge(contest, judge, prompts, args, say)
    del judge
    extra = [_judge_again(spec, per_prompt, prompts, args, say) for spec in extra_specs]
    res = {"model": model_spec, "baseline": base_spec, "reward": judge_spec.name, "prompts_file": args.prompts}
    res |= summarize(per_prompt, contest.answers, contest.base_answers, contest.model.eos_ids, contest.base.eos_ids)
    res |= _judges_summary(judge_spec.name, judge_spec.path, extra, per_prompt, training, say)
    res |= {"tie_margin": args.tie_margin, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty,
            "max_new_tokens": sampling.max_new_tokens, "seed": args.seed,
            "baseline_seed": baseline_seed(args),
            "truncated_prompts": cut, "seconds": round(time.time() - t0, 2)}
    _write(args, res, per_prompt, model_manifest, say)
    return res


def _judge(c: Contest, judge: RewardModel, prompts: list[list[dict]], args: EvalPolicyArgs,
           say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The RM's score of both answers to every prompt, and the per-prompt rows."""
    model_texts = [c.model.answer(r).text for r in c.answers]
    base_texts = [c.base.answer(r).text for r in c.base_answers]
    say(f"scoring {2 * len(prompts)} answers with {judge.name}")
    scores = judge.score_answers(prompts, model_texts, args.batch_size)
    base_scores = judge.score_answers(prompts, base_texts, args.batch_size)
    if judge.truncated:
        say(f"{judge.truncated} prompt + answer sequences longer than {judge.max_length} tokens kept their last "
            f"{judge.max_length} tokens for the reward model")
    oc = outcomes(scores, base_scores, args.tie_margin)
    ans, base_ans = c.answers, c.base_answers
    return [{"prompt": prompts[i], "response": model_texts[i], "baseline_response": base_texts[i],
             "score": scores[i], "baseline_score": base_scores[i], "outcome": oc[i], "kl": c.kls[i],
             "length": len(ans[i]), "baseline_length": len(base_ans[i]),
             "finished": cut_at_eos(ans[i], c.model.eos_ids)[1],
             "baseline_finished": cut_at_eos(base_ans[i], c.base.eos_ids)[1]}
            for i in range(len(prompts))]


def _judge_again(spec: Any, per_prompt: list[dict[str, Any]], prompts: list[list[dict]], args: EvalPolicyArgs,
                 say: Callable[[str], None]) -> tuple[str, Path]:
    """Another judge's scores of the same answers, into each row's `judges`; loaded for this and freed after."""
    judge = RewardModel.load(spec, args.precision)
    say(f"scoring {2 * len(prompts)} answers with the judge {judge.name}")
    scores = judge.score_answers(prompts, [r["response"] for r in per_prompt], args.batch_size)
    base_scores = judge.score_answers(prompts, [r["baseline_response"] for r in per_prompt], args.batch_size)
    if judge.truncated:
        say(f"{judge.truncated} prompt + answer sequences longer than {judge.max_length} tokens kept their last "
            f"{judge.max_length} tokens for the judge {judge.name}")
    for row, a, b, o in zip(per_prompt, scores, base_scores, outcomes(scores, base_scores, args.tie_margin),
                            strict=True):
        row.setdefault("judges", {})[judge.name] = {"score": a, "baseline_score": b, "outcome": o}
    return spec.name, spec.path


def _judges_summary(name: str, path: Path, extra: list[tuple[str, Path]], per_prompt: list[dict[str, Any]],
                    training: str | None, say: Callable[[str], None]) -> dict[str, Any]:
    """`judges` (the --reward RM first, then each --judge), the training RM, and whether the gain holds only
    under it (a warning when it does)."""
    trained_on = {_norm(training)} if training else set()

    def row(judge: str, folder: Path, scores: list[float], base_scores: list[float], oc: list[str]) -> dict:
        return {"reward": judge, "training_rm": bool({_norm(judge), _norm(folder)} & trained_on)} \
            | contest_figures(scores, base_scores, oc)

    judges = [row(name, path, [r["score"] for r in per_prompt], [r["baseline_score"] for r in per_prompt],
                  [r["outcome"] for r in per_prompt])]
    for judge, folder in extra:
        got = [r["judges"][judge] for r in per_prompt]
        judges.append(row(judge, folder, [g["score"] for g in got], [g["baseline_score"] for g in got],
                          [g["outcome"] for g in got]))
    out: dict[str, Any] = {"judges": judges, "training_reward": training}
    if len(judges) > 1 and training is None:
        say("no judge is marked as the training RM: MODEL's manifest names no reward model (a ppo, grpo, rloo "
            "or best-of-n stage does)")
    elif len(judges) > 1 and not any(j["training_rm"] for j in judges):
        say(f"the training RM {training} is not among the judges; add --judge {training} to compare with it")
    failing = gain_only_under_training(judges)
    out["gain_only_under_training_rm"] = None if failing is None else bool(failing)
    if failing:
        trained = next(j for j in judges if j["training_rm"])
        lo, hi = trained["win_rate_ci"]
        out["warning"] = (f"gain holds only under the training RM: win rate {trained['win_rate']:.3g} (95% CI "
                          f"{lo:.3g}-{hi:.3g}) under {trained['reward']}, but not above 0.5 under "
                          f"{', '.join(failing)}")
        say(f"warning: {out['warning']}")
    return out


def summarize(per_prompt: list[dict], ans: list[list[int]], base_ans: list[list[int]], eos: list[int],
              base_eos: list[int]) -> dict[str, Any]:
    """The figures of the module docstring from the per-prompt rows and the answers' token ids."""
    n = len(per_prompt)
    kls = [r["kl"] for r in per_prompt if r["kl"] is not None]
    mean = _mean
    def content(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
        return [r[:-1] if r and r[-1] in eos_ids else r for r in rows]

    text, base_text = content(ans, eos), content(base_ans, base_eos)
    return {
        "prompts": n, **contest_figures([r["score"] for r in per_prompt], [r["baseline_score"] for r in per_prompt],
                                        [r["outcome"] for r in per_prompt]),
        "kl": mean(kls) if len(kls) == n else None,
        "mean_length": mean([r["length"] for r in per_prompt]),
        "baseline_mean_length": mean([r["baseline_length"] for r in per_prompt]),
        "finished_rate": mean([float(r["finished"]) for r in per_prompt]),
        "baseline_finished_rate": mean([float(r["baseline_finished"]) for r in per_prompt]),
        "distinct_1": distinct_n(text, 1), "distinct_2": distinct_n(text, 2),
        "baseline_distinct_1": distinct_n(base_text, 1), "baseline_distinct_2": distinct_n(base_text, 2),
    }


def _write(args: EvalPolicyArgs, res: dict[str, Any], per_prompt: list[dict], model_manifest: Manifest | None,
           say: Callable[[str], None]) -> None:
    if args.save:
        path = Path(args.save)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt))
        res["save"] = str(path)
        say(f"per-prompt results: {path}")
    if model_manifest is not None:  # a stage folder: `rlhf report` finds the figures there
        dest = Path(model_manifest.path) / EVAL_FILE
        keep = ("score", "baseline_score", "outcome", "kl", "length", "baseline_length", "judges")
        body = res | {"per_prompt": [{k: r[k] for k in keep if k in r} for r in per_prompt]}
        atomic_write_text(dest, json.dumps(body, ensure_ascii=False, indent=1) + "\n")
        res["eval_file"] = str(dest)
