"""Stage 3: reinforcement learning against the reward model with PPO, written here from the algorithm.

The InstructGPT recipe (Ouyang et al. 2022) after Ziegler et al. (2019), with the implementation details of
Huang et al. (2024), "The N+ Implementation Details of RLHF with PPO". Every update:

1. Rollouts: `--batch-size` prompts, one response each sampled from the policy (batched HF generate with left
   padding and the KV cache; temperature, top-k, top-p; stops at EOS).
2. Scores: the reward model (RM) reads prompt + response and gives one score. When both models share the
   vocabulary and the chat template, the policy's token ids go straight in (plus the template's end-of-turn
   suffix, so the RM sees what it was trained on); otherwise the response is decoded and re-encoded through the
   RM's own template. Responses without EOS can be penalised (`--missing-eos-penalty`); scores can be
   normalised with running statistics (`--normalize-rewards`) and clipped (`--score-clip`).
3. Shaped per-token rewards: `-beta * KL_t(policy || SFT)` on every response token (estimator k1 or k3), the
   score added on the last one; beta fixed or adapted towards `--kl-target` (Ziegler et al. 2019, 2.2).
4. Advantages: a value model (started from the RM, or from the policy with a fresh one-output head; its head is
   applied to every hidden state) predicts a value per token; GAE(gamma, lambda), then whitened advantages.
5. PPO: `--ppo-epochs` passes over minibatches of the rollouts (rollouts of similar length together, in a
   shuffled order; or random minibatches) with the clipped surrogate for the policy and the clipped value loss,
   gradient accumulation and clipping, a decaying learning rate, and an optional early stop of the update when
   the approximate KL to the rollout policy passes `--target-kl`.

Every forward pass (old and reference log-probabilities, values, RM scores, training) runs its rows without the
columns that are padding in all of them: with prompts of mixed lengths, padding is a large part of a batch.

The reference is a frozen copy of the SFT policy (with `--lora`, the same weights with the adapters switched
off). Old log-probabilities come from the same forward path as the training passes, dropout off and logits
divided by the sampling temperature, so the first minibatch of each update starts at ratio 1 (recorded in
metrics.jsonl as check/first_logratio_max). Masks come from the first EOS, never from `ids != pad`, so a
tokenizer whose pad token is its EOS corrupts nothing. `--algo grpo` and `--algo rloo` give the same prompts
and RM to TRL's GRPOTrainer / RLOOTrainer instead (group baselines, no value model).

The run folder: the policy at the top (a normal Hugging Face folder), OUT/value, OUT/state (scheduler, RNG, KL
controller and reward statistics; the checkpoints in OUT.partial also hold the optimiser state: enough for
`--resume`), metrics.jsonl (one line per update), samples.jsonl, and the manifest, written last.

    rlhf ppo --run runs/demo --prompts examples/data/prompts.jsonl --max-steps 20 --max-new-tokens 48
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.config import check_choices, dump_yaml, opt, to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError, DataError
from rlhf_cli.core.generation import encode_chat
from rlhf_cli.core.manifest import (
    STAGE_COMMANDS,
    Manifest,
    StagedOutput,
    a_stage,
    manifest_if_stage,
    require_stage,
    stage_dir,
    write_manifest,
)
from rlhf_cli.core.models import configure_threads, pick_precision, resolve_model, set_distinct_pad, torch_dtype
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.training import freeze_lower_layers, inherit, lora_config, quiet_libraries
from rlhf_cli.data.io import DataSet, load_prompts

ALGOS = ("ppo", "grpo", "rloo")
DEFAULT_MAX_LENGTH = 512
DEFAULT_LR = 3e-6
DEFAULT_LORA_LR = 5e-5
DEFAULT_PPO_EPOCHS = 4
N_SAMPLES = 3  # rollouts shown and kept in samples.jsonl every --sample-every updates

# Settings that define the run: a resumed run must use the same ones (--max-steps may change).
RESUME_KEYS = ("algo", "policy", "reward", "prompts", "max_samples", "batch_size", "seed", "lora", "value_init",
               "max_new_tokens")
# PPO settings that GRPO/RLOO do not use; given with those, they are named as ignored.
PPO_ONLY = ("minibatch_size", "num_minibatches", "kl_estimator", "adaptive_kl", "kl_target", "kl_horizon", "gamma",
            "lam", "whiten_advantages", "clip_value", "vf_coef", "target_kl", "value_init", "group_by_length")


@dataclass
class PPOArgs:
    policy: str | None = opt(None, "Policy to train, also the frozen reference: an sft stage (default: RUN/sft) "
                                   "or any causal LM folder or hub id.")
    reward: str | None = opt(None, "Reward model: a reward stage (default: RUN/reward) or a folder with a "
                                   "one-output sequence classifier.")
    prompts: str | None = opt(None, "Prompts to sample on: a prompts file, any SFT or preference file (their "
                                    "prompts), a folder of them, or a hub dataset.")
    out: str | None = opt(None, "Output folder (default: RUN/ppo when --run is given).")
    run: str | None = opt(None, "Run folder: reads RUN/sft and RUN/reward, writes RUN/ppo.")
    overwrite: bool = opt(False, "Replace a finished stage already in --out (only once the new one is complete).")
    resume: bool = opt(False, "Continue the unfinished run whose last checkpoint is in OUT.partial.")
    stop_after: int | None = opt(None, "Stop after this many updates as if interrupted, leaving a checkpoint in "
                                       "OUT.partial for --resume (time-sliced jobs, tests).")
    algo: str = opt("ppo", "ppo: this toolkit's PPO with a value model; grpo, rloo: TRL's GRPOTrainer or "
                           "RLOOTrainer with the same reward model (group baselines, no value model).",
                    choices=ALGOS)
    max_samples: int | None = opt(None, "Use at most this many prompts.")
    max_steps: int | None = opt(None, "Updates to run, each on --batch-size rollouts (default: one pass over "
                                      "the prompts).")
    batch_size: int = opt(8, "Rollouts (prompt + sampled response) per update.")
    ppo_epochs: int | None = opt(None, "Passes over each update's rollouts (default 4; grpo/rloo: 1).")
    minibatch_size: int | None = opt(None, "Rollouts per optimiser step inside an update (default: all of "
                                           "them); must divide --batch-size.")
    num_minibatches: int | None = opt(None, "Or: split each update's rollouts into this many minibatches.")
    grad_accum: int = opt(1, "Split each minibatch into this many micro-batches whose gradients are summed "
                             "(same result, less memory).")
    lr: float | None = opt(None, f"Peak learning rate (default {DEFAULT_LR:g}; {DEFAULT_LORA_LR:g} with --lora).")
    lr_scheduler: str = opt("linear", "Learning-rate schedule over the updates.",
                            choices=("linear", "cosine", "constant"))
    warmup_ratio: float = opt(0.0, "Fraction of the updates spent warming up the learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_length: int | None = opt(None, "Longest prompt + response in tokens (default: the policy stage's, else "
                                       f"{DEFAULT_MAX_LENGTH}); longer prompts are dropped and counted.")
    max_new_tokens: int = opt(64, "Longest response in tokens.")
    temperature: float = opt(0.7, "Sampling temperature (log-probabilities use the same temperature).")
    top_k: int | None = opt(None, "Sample only among the k most likely tokens (default: all).")
    top_p: float = opt(1.0, "Nucleus sampling: the smallest set of tokens with this much probability.")
    missing_eos_penalty: float | None = opt(None, "Subtract this from the score of a response that hit "
                                                  "--max-new-tokens without EOS (e.g. 1.0).")
    score_clip: float | None = opt(None, "Clip (shaped) scores to [-x, x].")
    normalize_rewards: bool = opt(False, "Normalise scores with the running mean and std of all scores so far.")
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (initial value with --adaptive-kl; grpo/rloo: beta).")
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1 = log p - log p_ref (unbiased), "
                                  "k3 = (r - 1) - log r (unbiased, never negative), k2 = squared log ratio / 2.",
                            choices=("k1", "k2", "k3"))
    adaptive_kl: bool = opt(False, "Adapt beta so the KL per response tracks --kl-target (Ziegler et al.).")
    kl_target: float = opt(6.0, "Target KL per response (nats) for --adaptive-kl.")
    kl_horizon: float = opt(10000.0, "Horizon (rollouts) of the adaptive KL controller.")
    gamma: float = opt(1.0, "Discount factor.")
    lam: float = opt(0.95, "GAE lambda.")
    whiten_advantages: bool = opt(True, "Normalise advantages to mean 0, std 1 per update.")
    clip_eps: float = opt(0.2, "PPO ratio clip range epsilon.")
    clip_value: float = opt(0.2, "Value clip range around the rollout-time values.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this.")
    group_by_length: bool = opt(True, "Make each update's minibatches of rollouts of similar length (less padding, "
                                      "faster on prompts of mixed lengths; their order is shuffled every epoch), "
                                      "else random minibatches.")
    target_kl: float | None = opt(None, "Stop an update's remaining PPO epochs once the approximate KL to the "
                                        "rollout policy passes this (e.g. 0.1).")
    value_init: str = opt("reward", "Start the value model from the reward model, or from the policy with a "
                                    "fresh one-output head.", choices=("reward", "policy"))
    group_size: int = opt(4, "grpo/rloo: responses sampled per prompt (TRL's num_generations).")
    sample_every: int = opt(10, "Show and keep a few prompt/response/score samples every N updates (0: never).")
    save_every: int = opt(0, "Checkpoint into OUT.partial every N updates for --resume (0: only at the end).")
    seed: int = opt(42, "Random seed (prompt order, sampling, minibatches, fresh heads, LoRA).")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores this process may use).")
    precision: str = opt("auto", "Numeric precision: auto = bf16 on GPUs that have it, fp32 on CPU.",
                         choices=("auto", "fp32", "bf16", "fp16"))
    lora: bool = opt(False, "Train LoRA adapters on the policy and the value model; the reference is the policy "
                            "with its adapters switched off.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = opt(0.0, "LoRA dropout (0 keeps rollout and training log-probabilities identical).")
    lora_targets: str = opt("all-linear", "Modules that get adapters: all-linear or a comma list "
                                          "(q_proj,v_proj).")
    lora_merge: bool = opt(True, "Merge adapters into a full checkpoint (the adapter is kept in OUT/adapter).")
    freeze_layers: int = opt(0, "Freeze the embeddings and the lowest N layers of the policy and value model.")


def _check_args(a: PPOArgs) -> None:
    check_choices(a)

    def need(ok: bool, flag: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: expected {expected}")

    for name in ("batch_size", "grad_accum", "max_new_tokens", "lora_r", "group_size"):
        need(getattr(a, name) >= 1, name, "a whole number >= 1")
    for name in ("max_steps", "ppo_epochs", "minibatch_size", "num_minibatches", "stop_after", "max_samples"):
        if getattr(a, name) is not None:
            need(getattr(a, name) >= 1, name, "a whole number >= 1")
    for name in ("sample_every", "save_every", "freeze_layers"):
        need(getattr(a, name) >= 0, name, "a whole number >= 0")
    if a.lr is not None:
        need(0 < a.lr < 1, "lr", "a small positive number such as 1e-6")
    if a.max_length is not None:
        need(a.max_length >= 16, "max_length", "at least 16 tokens")
    need(a.temperature > 0, "temperature", "a positive number")
    need(0 < a.top_p <= 1, "top_p", "a probability, 0 < p <= 1")
    if a.top_k is not None:
        need(a.top_k >= 0, "top_k", "a whole number >= 0 (0: no limit)")
    for name in ("kl_coef", "vf_coef", "weight_decay"):
        need(getattr(a, name) >= 0, name, "a number >= 0")
    for name in ("kl_target", "kl_horizon", "clip_eps", "clip_value", "max_grad_norm"):
        need(getattr(a, name) > 0, name, "a positive number")
    for name in ("target_kl", "score_clip"):
        if getattr(a, name) is not None:
            need(getattr(a, name) > 0, name, "a positive number")
    need(0 <= a.gamma <= 1, "gamma", "a discount factor, 0 <= gamma <= 1")
    need(0 <= a.lam <= 1, "lam", "0 <= lambda <= 1")
    need(0 <= a.warmup_ratio < 1, "warmup_ratio", "a fraction of the updates, 0 <= x < 1")
    need(0 <= a.lora_dropout < 1, "lora_dropout", "a probability, 0 <= p < 1")
    if a.algo == "ppo":
        mb = minibatch_size(a)
        if a.batch_size % mb:
            raise ConfigError(f"--minibatch-size {mb}: must divide --batch-size {a.batch_size}")
        if mb % a.grad_accum:
            raise ConfigError(f"--grad-accum {a.grad_accum}: must divide the minibatch size {mb} "
                              f"(--batch-size / --num-minibatches, or --minibatch-size)")
    else:
        if a.batch_size % a.group_size:
            raise ConfigError(f"--batch-size {a.batch_size}: with --algo {a.algo} it counts responses and must be "
                              f"a multiple of --group-size {a.group_size}")
        if a.batch_size % a.grad_accum:
            raise ConfigError(f"--grad-accum {a.grad_accum}: must divide --batch-size {a.batch_size}")
        if a.group_size < 2:
            raise ConfigError(f"--group-size {a.group_size}: --algo {a.algo} compares responses to the same "
                              f"prompt; expected at least 2")


def minibatch_size(a: PPOArgs) -> int:
    if a.minibatch_size is not None and a.num_minibatches is not None:
        if a.minibatch_size * a.num_minibatches != a.batch_size:
            raise ConfigError(f"--minibatch-size {a.minibatch_size} and --num-minibatches {a.num_minibatches} "
                              f"disagree with --batch-size {a.batch_size}; pass only one of them")
    if a.minibatch_size is not None:
        return a.minibatch_size
    if a.num_minibatches is not None:
        if a.batch_size % a.num_minibatches:
            raise ConfigError(f"--num-minibatches {a.num_minibatches}: must divide --batch-size {a.batch_size}")
        return a.batch_size // a.num_minibatches
    return a.batch_size


# ---------------------------------------------------------------------------------------------------------
# Preflight: every check that needs no weights, before any weights load


@dataclass
class Plan:
    """What the preflight found: folders, tokenizers, the encoded prompts, how the RM reads the policy's text."""

    policy: str  # as given (or RUN/sft)
    policy_path: Path
    policy_manifest: Manifest | None
    reward: str
    reward_path: Path
    reward_manifest: Manifest | None
    tok: Any  # the policy's tokenizer, left padding for generation
    rm_tok: Any
    same_ids: bool  # the RM reads the policy's token ids directly
    why_reencode: str
    prompts: DataSet
    prompt_ids: list[list[int]]
    rows: list[dict]  # prompt rows kept, aligned with prompt_ids
    too_long: int
    eos_ids: list[int]
    rm_max_length: int


def _config_json(path: Path, flag: str) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{flag} {path}: unreadable config.json ({e}); expected a Hugging Face model "
                              f"folder") from None


def _pick_policy(a: PPOArgs, say) -> tuple[str, Path, Manifest | None]:
    if a.policy is None:
        if not a.run:
            raise ConfigError("--policy: missing; pass --policy SFT_DIR or --run DIR (uses DIR/sft)")
        a.policy = str(require_stage(Path(a.run) / "sft", "sft", "--run").path)
    m = manifest_if_stage(a.policy)
    if m is not None and m.stage not in ("sft", "ppo", "rejection"):
        raise CheckpointError(f"--policy {a.policy}: is {a_stage(m.stage)}, expected an sft stage (a causal LM), "
                              f"made by `{STAGE_COMMANDS['sft']}`")
    path = resolve_model(a.policy, flag="--policy", say=say)
    archs = _config_json(path, "--policy").get("architectures") or []
    if not any(x.endswith("ForCausalLM") or x.endswith("LMHeadModel") for x in archs):
        raise CheckpointError(f"--policy {a.policy}: not a causal language model (found "
                              f"{', '.join(archs) or 'no architectures'}); expected an sft stage, made by "
                              f"`{STAGE_COMMANDS['sft']}`")
    return a.policy, path, m


def _pick_reward(a: PPOArgs, say) -> tuple[str, Path, Manifest | None]:
    from rlhf_cli.evaluation.eval_reward import resolve_reward_model

    a.reward, m = resolve_reward_model(a.reward, a.run, "--reward")
    path = resolve_model(a.reward, flag="--reward", say=say)
    cfg = _config_json(path, "--reward")
    archs = cfg.get("architectures") or []
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels")
    if not any("ForSequenceClassification" in x for x in archs) or labels != 1:
        raise CheckpointError(f"--reward {a.reward}: not a reward model (expected a sequence classifier with one "
                              f"output, found {', '.join(archs) or 'no architectures'}); train one with "
                              f"`{STAGE_COMMANDS['reward']}`")
    return a.reward, path, m


def _load_tok(path: Path, flag: str, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise CheckpointError(f"{flag} {name}: no usable tokenizer in {path} ({type(e).__name__}); expected the "
                              f"tokenizer files next to the weights, as every stage saves them") from None
    if tok.eos_token_id is None:
        raise CheckpointError(f"{flag} {name}: the tokenizer defines no EOS token, so responses cannot end; set "
                              f"eos_token in {path / 'tokenizer_config.json'}")
    set_distinct_pad(tok)
    return tok


def template_suffix(tok: Any) -> list[int] | None:
    """Token ids the chat template writes after an assistant turn's EOS (ChatML: a newline), or None when the
    turn does not end with the EOS token (then the fast path is not exact and the text is re-encoded)."""
    probe = "@@ANSWER@@"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": probe}],
                                       tokenize=False)
    except Exception:
        return None
    after = text.rsplit(probe, 1)[-1] if probe in text else None
    if after is None or not after.startswith(tok.eos_token):
        return None
    return tok(after[len(tok.eos_token):], add_special_tokens=False)["input_ids"]


def eos_ids_of(tok: Any, path: Path) -> list[int]:
    """`generation.stop_ids` from the folder's generation_config.json, read before the weights load."""
    from rlhf_cli.core.generation import stop_ids

    try:
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        gen = None
    return stop_ids(tok, gen)


def preflight(a: PPOArgs, say) -> Plan:
    if a.prompts is None:
        raise ConfigError("--prompts: missing; expected a prompts file (any format `rlhf sft` or `rlhf reward` "
                          "reads), a folder or a hub dataset")
    policy, policy_path, pm = _pick_policy(a, say)
    reward, reward_path, rm = _pick_reward(a, say)
    prompts = load_prompts(a.prompts, a.max_samples)
    say(prompts.describe())
    max_length = inherit(a, pm, "max_length", DEFAULT_MAX_LENGTH, say)
    if a.max_new_tokens >= max_length:
        raise ConfigError(f"--max-new-tokens {a.max_new_tokens}: must be below --max-length {max_length} (prompt + "
                          f"response)")

    quiet_libraries()
    tok = _load_tok(policy_path, "--policy", policy)
    rm_tok = _load_tok(reward_path, "--reward", reward)
    if not tok.chat_template:
        raise CheckpointError(f"--policy {policy}: the tokenizer has no chat template, so prompts cannot be "
                              f"rendered; use an instruct or sft model, or set chat_template")
    same_vocab = tok.get_vocab() == rm_tok.get_vocab()
    same_template = (tok.chat_template or None) == (rm_tok.chat_template or None)
    suffix = template_suffix(tok) if same_vocab and same_template else None
    same_ids = same_vocab and same_template and suffix is not None
    why = ("" if same_ids else "the vocabularies differ" if not same_vocab else
           "the chat templates differ" if not same_template else "the template's turn does not end with EOS")
    if not same_ids:
        if not rm_tok.chat_template:
            raise CheckpointError(f"--reward {reward}: its tokenizer differs from the policy's ({why}) and has no "
                                  f"chat template to re-encode conversations with; set chat_template in "
                                  f"{reward_path / 'tokenizer_config.json'}")
        if not same_vocab and a.value_init == "reward" and a.algo == "ppo":
            raise ConfigError("--value-init reward: the reward model's vocabulary differs from the policy's, so a "
                              "value model started from it cannot read the policy's tokens; pass --value-init "
                              "policy")
    tok.padding_side = "left"
    limit = max_length - a.max_new_tokens
    ids, rows, too_long = [], [], 0
    for r in prompts.rows:
        x = encode_chat(tok, r["prompt"])  # the template exists: checked above
        if len(x) > limit:
            too_long += 1
            continue
        ids.append(x)
        rows.append(r)
    if too_long:
        say(f"dropped {too_long} prompts longer than {limit} tokens (--max-length {max_length} minus "
            f"--max-new-tokens {a.max_new_tokens})")
    if not ids:
        raise DataError(f"--prompts {a.prompts}: every prompt is longer than {limit} tokens (--max-length "
                        f"{max_length} minus --max-new-tokens {a.max_new_tokens}); raise --max-length or lower "
                        f"--max-new-tokens")
    rm_max = (rm.args.get("max_length") if rm else None) or max_length
    return Plan(policy, policy_path, pm, reward, reward_path, rm, tok, rm_tok, same_ids, why, prompts, ids, rows,
                too_long, eos_ids_of(tok, policy_path), int(rm_max))


# ---------------------------------------------------------------------------------------------------------
# Forward passes shared by rollouts and training: one code path, so old and new log-probabilities match


def position_ids(attn: Any) -> Any:
    """Positions counted over real tokens only, as generate does with left padding."""
    return (attn.long().cumsum(1) - 1).clamp_min(0)


def response_logits(model: Any, seq: Any, attn: Any, prompt_len: int, temperature: float) -> Any:
    """Logits [B, R, V] (float32, divided by the temperature) that predict the R response tokens."""
    r = seq.shape[1] - prompt_len
    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), logits_to_keep=r + 1,
                use_cache=False)
    return out.logits[:, :-1].float() / temperature


def _head_model(model: Any) -> tuple[Any, Any]:
    """(backbone, head) of a sequence classifier, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    backbone = getattr(base, base.base_model_prefix, None)
    if head is None or backbone is None:
        raise CheckpointError(f"{type(base).__name__}: cannot find the backbone and score head of this sequence "
                              f"classifier; use a model with a `score` head (Llama, Qwen, Mistral, SmolLM, ...)")
    return backbone, head


def token_scores(model: Any, seq: Any, attn: Any) -> Any:
    """The classifier head applied to every hidden state: [B, T] float32 (values, or the RM's score per prefix)."""
    backbone, head = _head_model(model)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    return head(hidden.last_hidden_state).squeeze(-1).float()


@dataclass
class Rollout:
    seq: Any  # [B, P + R]: left-padded prompt, then the response; tokens after the first EOS are pad
    attn: Any  # [B, P + R]: 1 on real prompt and response tokens
    prompt_len: int  # P
    response: Any  # [B, R]
    mask: Any  # [B, R] bool: real response tokens, up to and including the first EOS
    ends: Any  # [B] bool: the response ended with EOS


def generate_rollouts(policy: Any, prompt_ids: list[list[int]], gen_config: Any, pad_id: int,
                      eos_ids: list[int], device: Any) -> Rollout:
    """Sample one response per prompt in one batched generate call."""
    import torch

    from rlhf_cli.core.generation import pad_batch
    from rlhf_cli.stages.ppo.core import response_mask_from_ids

    ids, attn = (t.to(device) for t in pad_batch(prompt_ids, pad_id, left=True))
    with torch.no_grad():
        out = policy.generate(input_ids=ids, attention_mask=attn, generation_config=gen_config)
    p = ids.shape[1]
    response = out[:, p:]
    # One generate call pads only finished rows, so a pad id inside an unfinished row is a real token: no pad here.
    mask, ends = response_mask_from_ids(response, eos_ids, None)
    response = response.masked_fill(~mask, pad_id)
    return Rollout(torch.cat([ids, response], 1), torch.cat([attn, mask.long()], 1), p, response, mask, ends)


def response_texts(tok: Any, ro: Rollout, n: int | None = None) -> list[str]:
    """The responses as text, without EOS and what follows it."""
    rows = range(ro.response.shape[0] if n is None else min(n, ro.response.shape[0]))
    return tok.batch_decode([ro.response[i][ro.mask[i]].tolist() for i in rows], skip_special_tokens=True)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def leading_pad(attn: Any) -> int:
    """How many leading columns are padding in every row."""
    return int((attn == 0).all(0).long().cumprod(0).sum())


def trimmed(ro: Rollout, rows: Any) -> tuple[Any, Any, int, int]:
    """Rows of a rollout without the columns that are padding in every one of them (the leading prompt padding
    and the response padding after the longest response): (seq, attn, prompt_len, response_len). Those columns
    are masked out everywhere, so results do not change; on prompts of mixed lengths it saves much of the work."""
    attn = ro.attn[rows]
    k = leading_pad(attn[:, :ro.prompt_len])
    r = max(1, int(ro.mask[rows].sum(1).max()))
    end = ro.prompt_len + r
    return ro.seq[rows][:, k:end], attn[:, k:end], ro.prompt_len - k, r


def by_length(ro: Rollout) -> Any:
    """Row indices from the shortest to the longest prompt + response (stable)."""
    import torch

    return torch.argsort(ro.attn.sum(1), stable=True)


def minibatches(ro: Rollout, size: int, group_by_length: bool) -> list[Any]:
    """One PPO epoch's minibatches of row indices, in a random order. Grouped by length: consecutive rows of the
    length order (less padding per minibatch); else a random partition."""
    import torch

    n = ro.seq.shape[0]
    if not group_by_length:
        return list(torch.randperm(n).split(size))
    groups = list(by_length(ro).split(size))
    return [groups[i] for i in torch.randperm(len(groups)).tolist()]


def rollout_forward(policy: Any, ref: Any, value: Any, ro: Rollout, temperature: float, size: int,
                    lora: bool) -> tuple[Any, Any, Any, Any]:
    """Old log-probabilities, reference log-probabilities, values and entropies of the response tokens (what
    stands after a row's end means nothing and is masked everywhere). Rows go through in chunks of similar
    length, each without its all-padding columns."""
    import contextlib

    import torch

    from rlhf_cli.stages.ppo.core import entropy_from_logits, logprobs_from_logits

    n, width = ro.response.shape
    logps, refs, values, ents = (torch.zeros(n, width, device=ro.seq.device) for _ in range(4))
    order = by_length(ro)
    with torch.no_grad():
        for s in chunks(n, size):
            rows = order[s]
            seq, attn, pl, r = trimmed(ro, rows)
            resp = ro.response[rows][:, :r]
            logits = response_logits(policy, seq, attn, pl, temperature)
            logps[rows, :r] = logprobs_from_logits(logits, resp)
            ents[rows, :r] = entropy_from_logits(logits)
            del logits
            with policy.disable_adapter() if lora else contextlib.nullcontext():
                ref_logits = response_logits(ref, seq, attn, pl, temperature)
            refs[rows, :r] = logprobs_from_logits(ref_logits, resp)
            del ref_logits
            values[rows, :r] = token_scores(value, seq, attn)[:, pl - 1:-1]
    return logps, refs, values, ents


# ---------------------------------------------------------------------------------------------------------
# Scoring with the reward model


class RewardScorer:
    """Scores prompt + response with the RM: the policy's ids directly when the tokenizers agree, else the text
    re-encoded with the RM's template; then the missing-EOS penalty, running normalisation and clipping."""

    def __init__(self, rm: Any, plan: Plan, a: PPOArgs, device: Any):
        from rlhf_cli.stages.ppo.core import RunningMoments

        self.rm, self.plan, self.a, self.device = rm, plan, a, device
        self.suffix = template_suffix(plan.tok) if plan.same_ids else None
        self.moments = RunningMoments()

    def score_rollout(self, ro: Rollout, rows: list[dict], batch: int) -> Any:
        """Raw RM scores [B] of a rollout batch."""
        import torch

        if not self.plan.same_ids:
            texts = response_texts(self.plan.tok, ro)
            return self.score_conversations([row["prompt"] + [{"role": "assistant", "content": t}]
                                             for row, t in zip(rows, texts, strict=True)], batch)
        # The RM was trained on whole rendered turns: append what the template writes after the EOS.
        pad = self.plan.tok.pad_token_id
        lengths = ro.mask.sum(1)
        extra = len(self.suffix) if ro.ends.any() else 0
        seq = torch.cat([ro.seq, torch.full((ro.seq.shape[0], extra), pad, dtype=ro.seq.dtype,
                                            device=ro.seq.device)], 1)
        attn = torch.cat([ro.attn, torch.zeros((ro.seq.shape[0], extra), dtype=ro.attn.dtype,
                                               device=ro.attn.device)], 1)
        last = ro.prompt_len + lengths - 1
        if extra:
            suffix = torch.tensor(self.suffix, dtype=seq.dtype, device=seq.device)
            for i in torch.nonzero(ro.ends).flatten().tolist():
                at = int(last[i]) + 1
                seq[i, at:at + extra] = suffix
                attn[i, at:at + extra] = 1
            last = last + ro.ends.long() * extra
        return self._score_ids(seq, attn, last, batch)

    def score_conversations(self, convs: list[list[dict]], batch: int = 8) -> Any:
        """Raw RM scores of whole conversations rendered with the RM's own chat template."""
        import torch

        from rlhf_cli.core.generation import encode_chat, pad_batch

        tok = self.plan.rm_tok
        ids = [encode_chat(tok, c, generation_prompt=False)[-self.plan.rm_max_length:] for c in convs]
        seq, attn = pad_batch(ids, tok.pad_token_id)
        last = torch.tensor([len(x) - 1 for x in ids])
        return self._score_ids(seq.to(self.device), attn.to(self.device), last.to(self.device), batch)

    def _score_ids(self, seq: Any, attn: Any, last: Any, batch: int) -> Any:
        import torch

        out = torch.zeros(seq.shape[0], device=seq.device)
        order = torch.argsort(attn.sum(1), stable=True)  # chunks of similar length waste less on padding
        with torch.no_grad():
            for s in chunks(seq.shape[0], batch):
                rows = order[s]
                a = attn[rows]
                k = leading_pad(a)
                end = int(last[rows].max()) + 1
                scores = token_scores(self.rm, seq[rows][:, k:end], a[:, k:end])
                out[rows] = scores.gather(1, (last[rows] - k).unsqueeze(1)).squeeze(1)
        return out

    def shape(self, raw: Any, ends: Any) -> Any:
        """Raw scores -> the scores PPO optimises: normalised, penalised without EOS, clipped."""
        import torch

        s = raw.clone()
        if self.a.normalize_rewards:
            self.moments.update(raw)
            if self.moments.count > 1:  # one score has no spread to divide by
                s = self.moments.normalize(s)
        if self.a.missing_eos_penalty is not None:
            s = s - self.a.missing_eos_penalty * (~ends.bool()).to(s.dtype)
        if self.a.score_clip is not None:
            s = torch.clamp(s, -self.a.score_clip, self.a.score_clip)
        return s


# ---------------------------------------------------------------------------------------------------------
# Run folder: checkpoints and logs


class _Stopped(Exception):
    """--stop-after reached: leave OUT.partial with its checkpoint, as an interruption would."""


class ResumableOutput(StagedOutput):
    """StagedOutput whose OUT.partial survives into a --resume run."""

    def __init__(self, out: Path, overwrite: bool, resume: bool):
        super().__init__(out, overwrite)
        self.resume = resume

    @property
    def checkpoint(self) -> Path:
        return self.partial / "state" / "state.json"

    def __enter__(self) -> Path:
        if self.resume:
            return self.partial
        return super().__enter__()


@functools.lru_cache(maxsize=2)
def prompt_order(seed: int, n: int, epoch: int) -> list[int]:
    """The prompts' order in one pass: a function of (seed, pass) alone, so a resumed run needs no state for it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _lr_lambda(kind: str, total: int, warmup: int):
    def f(u: int) -> float:
        if u < warmup:
            return (u + 1) / (warmup + 1)
        frac = min(1.0, (u - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0
    return f


def _jsonl_append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _jsonl_keep(path: Path, upto: int) -> list[dict]:
    """Lines of a log with step <= upto (a resumed run drops what came after its checkpoint)."""
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if r.get("step", 0) <= upto]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_tok(tok: Any, dest: Path) -> None:
    side = tok.padding_side
    tok.padding_side = "right"  # the folder is a normal model folder; generation code sets its own side
    tok.save_pretrained(dest)
    tok.padding_side = side


def save_checkpoint(dest: Path, policy: Any, value: Any, tok: Any, a: PPOArgs, state: dict) -> None:
    """Weights, then state.json last: a checkpoint cut short by a crash is never taken for a complete one."""
    import torch

    sdir = dest / "state"
    sdir.mkdir(exist_ok=True)
    (sdir / "state.json").unlink(missing_ok=True)
    if a.lora:
        policy.save_pretrained(dest / "adapter")
        _save_tok(tok, dest / "adapter")
        value.save_pretrained(dest / "value" / "adapter")
    else:
        policy.save_pretrained(dest, safe_serialization=True)
        _save_tok(tok, dest)
        value.save_pretrained(dest / "value", safe_serialization=True)
        _save_tok(tok, dest / "value")
    torch.save({k: v for k, v in state.items() if k != "summary"}, sdir / "trainer.pt")
    tmp = sdir / "state.json.tmp"
    tmp.write_text(json.dumps(state["summary"], indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, sdir / "state.json")


def _check_resume(a: PPOArgs, summary: dict, where: Path) -> None:
    for k in RESUME_KEYS:
        then, now = summary["args"].get(k), getattr(a, k)
        if then != now:
            raise ConfigError(f"--resume: the checkpoint in {where} was made with --{k.replace('_', '-')} {then}, "
                              f"not {now}; resume with the same settings, or start afresh without --resume")


# ---------------------------------------------------------------------------------------------------------
# The stage


def run_ppo(args: PPOArgs, reporter: Reporter | None = None) -> Path:
    """Train the policy against the reward model; returns the finished stage folder (with --stop-after, the
    OUT.partial folder holding the checkpoint)."""
    reporter = reporter or Reporter(every=1)
    say = reporter.info
    started = time.time()
    _check_args(args)
    out = stage_dir(args.out, args.run, "ppo", "--out")
    if out is None:
        raise ConfigError("--out: missing; pass --out DIR or --run DIR (writes DIR/ppo)")
    staged = ResumableOutput(out, args.overwrite, args.resume)
    if args.resume and args.algo == "ppo" and not staged.checkpoint.is_file():
        raise ConfigError(f"--resume: no checkpoint in {staged.partial} (one is written every --save-every N "
                          f"updates, and by --stop-after); start again without --resume")
    if args.resume and args.algo != "ppo" and not list((staged.partial / "trainer").glob("checkpoint-*")):
        raise ConfigError(f"--resume: no checkpoint in {staged.partial / 'trainer'} (one is written every "
                          f"--save-every N steps, and by --stop-after); start again without --resume")
    if not args.resume and staged.partial.exists():
        say(f"discarding the unfinished run in {staged.partial} (pass --resume to continue it)")
    plan = preflight(args, say)
    say("reward model reads " + ("the policy token ids directly (same tokenizer and chat template)" if plan.same_ids
                                 else f"the text re-encoded with its own chat template ({plan.why_reencode})"))
    try:
        if args.algo != "ppo":
            return _run_trl(args, plan, staged, reporter, started)
        return _run_ppo(args, plan, staged, reporter, started)
    except _Stopped:
        return staged.partial


def fit_vocab(m: Any, t: Any) -> Any:
    """A pad token the tokenizer had to add (no unused special token to reuse) needs an embedding row."""
    set_distinct_pad(t, m)
    return m


def _load_models(a: PPOArgs, plan: Plan, precision: str, device: Any, resume_dir: Path | None) -> tuple:
    """Policy, reference (None with LoRA), reward model, value model; from the checkpoint when resuming."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch_dtype(precision)
    tok = plan.tok
    value_base = plan.reward_path if a.value_init == "reward" else plan.policy_path

    def causal(path: Path) -> Any:
        return fit_vocab(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tok)

    def classifier(path: Path, t: Any = tok) -> Any:
        return fit_vocab(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype), t)

    full_resume = resume_dir is not None and not a.lora
    policy = causal(resume_dir if full_resume else plan.policy_path)
    ref = None if a.lora else causal(plan.policy_path)
    rm = classifier(plan.reward_path, plan.rm_tok)
    value = classifier(resume_dir / "value" if full_resume else value_base)
    if a.freeze_layers:
        freeze_lower_layers(policy, a.freeze_layers)
        freeze_lower_layers(value, a.freeze_layers)
    if a.lora:
        from peft import PeftModel, get_peft_model

        if resume_dir is not None:
            policy = PeftModel.from_pretrained(policy, resume_dir / "adapter", is_trainable=True)
            value = PeftModel.from_pretrained(value, resume_dir / "value" / "adapter", is_trainable=True)
        else:
            policy = get_peft_model(policy, lora_config(a, "CAUSAL_LM", policy))
            value = get_peft_model(value, lora_config(a, "SEQ_CLS", value))
    for m in (policy, ref, rm, value):
        if m is not None:
            m.to(device)
            m.eval()  # dropout off everywhere: rollout and training passes must agree
    for m in (ref, rm):
        if m is not None:
            m.requires_grad_(False)
    _head_model(value)
    _head_model(rm)
    return policy, ref, rm, value


def _run_ppo(a: PPOArgs, plan: Plan, staged: ResumableOutput, reporter: Reporter, started: float) -> Path:
    say = reporter.info
    import torch
    import transformers
    from transformers import GenerationConfig

    from rlhf_cli.stages.ppo.core import (
        AdaptiveKLController,
        FixedKLController,
        compute_gae,
        kl_estimate,
        logprobs_from_logits,
        masked_mean,
        masked_whiten,
        per_token_rewards,
        policy_loss,
        value_loss,
    )

    threads = configure_threads(a.threads)
    precision = pick_precision(a.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lr = a.lr or (DEFAULT_LORA_LR if a.lora else DEFAULT_LR)
    epochs = a.ppo_epochs or DEFAULT_PPO_EPOCHS
    mb = minibatch_size(a)
    micro = mb // a.grad_accum
    n_prompts = len(plan.prompt_ids)
    total = a.max_steps or max(1, math.ceil(n_prompts / a.batch_size))
    tok = plan.tok

    resume_summary = None
    if a.resume:
        resume_summary = json.loads(staged.checkpoint.read_text(encoding="utf-8"))
        _check_resume(a, resume_summary, staged.partial)
        if resume_summary["step"] >= total:
            raise ConfigError(f"--resume: the checkpoint is already at update {resume_summary['step']} of "
                              f"--max-steps {total}; raise --max-steps to continue")
    transformers.set_seed(a.seed)  # fresh heads, LoRA initialisation
    policy, ref, rm, value = _load_models(a, plan, precision, device, staged.partial if a.resume else None)
    n_policy = sum(p.numel() for p in policy.parameters())
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    how = f"LoRA r={a.lora_r}" if a.lora else "full fine-tune"
    say(f"ppo: policy {plan.policy} ({n_policy / 1e6:.0f}M parameters, {how}), reward {plan.reward}, value model "
        f"from the {a.value_init} model; {precision}, {threads} threads, lr {lr:g}, {total} updates x "
        f"{a.batch_size} rollouts, {epochs} PPO epochs x {a.batch_size // mb} minibatches")

    try:  # the fused kernel is several times faster, on CPU too
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=a.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=a.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(a.lr_scheduler, total, round(a.warmup_ratio * total)))
    kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl
              else FixedKLController(a.kl_coef))
    scorer = RewardScorer(rm, plan, a, device)
    gen_config = GenerationConfig(
        do_sample=True, temperature=a.temperature, top_k=a.top_k or 0, top_p=a.top_p,
        max_new_tokens=a.max_new_tokens, eos_token_id=plan.eos_ids, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, use_cache=True)

    step, elapsed_before = 0, 0.0
    with staged as dest:
        metrics_path, samples_path = dest / "metrics.jsonl", dest / "samples.jsonl"
        history: list[dict] = []
        if resume_summary is not None:
            st = torch.load(dest / "state" / "trainer.pt", weights_only=False, map_location="cpu")
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            kl_ctl.load_state_dict(st["kl_ctl"])
            scorer.moments.load_state_dict(st["moments"])
            _set_rng_state(st["rng"])
            step, elapsed_before = st["step"], st.get("elapsed", 0.0)
            history = _jsonl_keep(metrics_path, step)
            _jsonl_keep(samples_path, step)
            say(f"resuming from update {step} of {total} in {dest}")
        else:
            for p in (metrics_path, samples_path):
                p.write_text("", encoding="utf-8")
        lora = a.lora
        ref_model = policy if lora else ref
        t_start = time.time()

        def state_for(step: int, with_optimizer: bool = True) -> dict:
            # the finished folder keeps everything but the optimiser moments (twice the trainable weights' size)
            opt_state = {"optimizer": optimizer.state_dict()} if with_optimizer else {}
            return {"step": step, **opt_state, "scheduler": scheduler.state_dict(),
                    "kl_ctl": kl_ctl.state_dict(), "moments": scorer.moments.state_dict(), "rng": _rng_state(),
                    "elapsed": elapsed_before + time.time() - t_start,
                    "summary": {"step": step, "total": total, "args": to_dict(a),
                                "kl_ctl": kl_ctl.state_dict(), "moments": scorer.moments.state_dict()}}

        reporter.start(total)
        while step < total:
            t0 = time.time()
            # prompt order: a fresh seeded permutation per pass, a function of (seed, update) alone
            idx = [prompt_order(a.seed, n_prompts, k // n_prompts)[k % n_prompts]
                   for k in range(step * a.batch_size, (step + 1) * a.batch_size)]
            rows = [plan.rows[i] for i in idx]
            ro = generate_rollouts(policy, [plan.prompt_ids[i] for i in idx], gen_config, tok.pad_token_id,
                                   plan.eos_ids, device)
            t1 = time.time()
            raw = scorer.score_rollout(ro, rows, micro)
            scores = scorer.shape(raw, ro.ends)
            t2 = time.time()
            old_logp, ref_logp, old_values, entropy = rollout_forward(policy, ref_model, value, ro, a.temperature,
                                                                      micro, lora)
            mask = ro.mask.to(old_logp.dtype)
            kl_tok = kl_estimate(old_logp, ref_logp, a.kl_estimator) * mask
            seq_kl = kl_tok.sum(1)
            beta = kl_ctl.value
            rewards = per_token_rewards(scores, kl_tok, mask, beta)
            adv, returns = compute_gae(rewards, old_values, mask, a.gamma, a.lam)
            if a.whiten_advantages:
                adv = masked_whiten(adv, mask)
            t3 = time.time()

            stats: dict[str, list[float]] = {}
            first_check: dict[str, float] = {}
            epochs_done, steps_done, stopped = 0, 0, False
            n = ro.seq.shape[0]
            for _ in range(epochs):
                for ids_mb in minibatches(ro, mb, a.group_by_length):
                    ids_mb = ids_mb.to(device)
                    n_tok = mask[ids_mb].sum().clamp_min(1.0)
                    optimizer.zero_grad(set_to_none=True)
                    mb_stats: dict[str, float] = {}
                    for part in ids_mb.split(micro):
                        seq, attn, pl, r = trimmed(ro, part)
                        m = mask[part][:, :r]
                        logits = response_logits(policy, seq, attn, pl, a.temperature)
                        new_logp = logprobs_from_logits(logits, ro.response[part][:, :r])
                        del logits
                        vpred = token_scores(value, seq, attn)[:, pl - 1:-1]
                        pg, pgs = policy_loss(new_logp, old_logp[part][:, :r], adv[part][:, :r], m, a.clip_eps)
                        vf, vfs = value_loss(vpred, old_values[part][:, :r], returns[part][:, :r], m, a.clip_value)
                        w = m.sum() / n_tok  # token-weighted: grad accumulation gives the minibatch's exact loss
                        ((pg + a.vf_coef * vf) * w).backward()
                        if not first_check:
                            dev = (new_logp - old_logp[part][:, :r]).detach().abs() * m
                            first_check = {"check/first_logratio_max": float(dev.max()),
                                           "check/first_approx_kl": float(pgs["approx_kl"])}
                        for k, v in {"policy_loss": pg, "value_loss": vf, **pgs, **vfs}.items():
                            mb_stats[k] = mb_stats.get(k, 0.0) + float(v) * float(w)
                    # the policy has drifted too far from the rollout policy: drop this step and the rest
                    stopped = a.target_kl is not None and mb_stats["approx_kl"] > a.target_kl
                    if not stopped:
                        mb_stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm))
                        optimizer.step()
                        steps_done += 1
                    for k, v in mb_stats.items():
                        stats.setdefault(k, []).append(v)
                    if stopped:
                        break
                epochs_done += 1
                if stopped:
                    break
            optimizer.zero_grad(set_to_none=True)
            cur_lr = scheduler.get_last_lr()[0]
            scheduler.step()
            kl_ctl.update(seq_kl.mean(), a.batch_size)
            step += 1
            t4 = time.time()

            lengths = ro.mask.sum(1).float()
            row = {
                "step": step, "episodes": step * a.batch_size,
                "score_mean": float(raw.mean()), "score_std": float(raw.std()) if n > 1 else 0.0,
                "reward_mean": float(scores.mean()), "kl": float(seq_kl.mean()), "kl_coef": beta,
                "entropy": float(masked_mean(entropy, mask)), "response_length": float(lengths.mean()),
                "eos_fraction": float(ro.ends.float().mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "value_mean": float(masked_mean(old_values, mask)), "return_mean": float(masked_mean(returns, mask)),
                "lr": cur_lr, "ppo_epochs_done": epochs_done, "optimizer_steps": steps_done,
                "early_stopped": stopped, **first_check,
                "episodes_per_second": a.batch_size / (t4 - t0),
                "time/generate": t1 - t0, "time/score": t2 - t1, "time/forward": t3 - t2, "time/train": t4 - t3,
                "time/update": t4 - t0,
            }
            history.append(row)
            _jsonl_append(metrics_path, row)
            if a.sample_every and (step % a.sample_every == 0 or step == 1):
                texts = response_texts(tok, ro, N_SAMPLES)
                shown = []
                for r, t, s in zip(rows, texts, raw.tolist(), strict=False):
                    _jsonl_append(samples_path, {"step": step, "prompt": r["prompt"], "response": t, "score": s})
                    shown.append({"prompt": r["prompt"][-1]["content"][:200], "response": t[:400], "score": s})
                reporter.samples(f"samples at update {step}", shown)
            reporter.update(step, total, {
                "score": row["score_mean"], "score_std": row["score_std"], "kl": row["kl"], "entropy": row["entropy"],
                "clipfrac": row["clipfrac"], "approx_kl": row["approx_kl"], "vf_loss": row["value_loss"],
                "len": row["response_length"], "eps/s": row["episodes_per_second"],
            }, elapsed_before + time.time() - t_start)
            if a.save_every and step % a.save_every == 0 and step < total:
                save_checkpoint(dest, policy, value, tok, a, state_for(step))
            if a.stop_after is not None and step >= a.stop_after and step < total:
                save_checkpoint(dest, policy, value, tok, a, state_for(step))
                reporter.finish()
                raise _Stopped()
        reporter.finish()

        save_checkpoint(dest, policy, value, tok, a, state_for(step, with_optimizer=False))
        if a.lora:
            _finish_lora(dest, policy, value, tok, a)
        dump_yaml(a, dest / "rlhf_config.yaml", header="# rlhf ppo --config rlhf_config.yaml\n")
        first, last = history[0], history[-1]
        times = [h["time/update"] for h in history]
        metrics = {
            "updates": step, "episodes": step * a.batch_size,
            "initial_score_mean": first["score_mean"], "final_score_mean": last["score_mean"],
            "final_kl": last["kl"], "final_kl_coef": kl_ctl.value, "final_entropy": last["entropy"],
            "final_response_length": last["response_length"], "final_eos_fraction": last["eos_fraction"],
            "seconds_per_update": sum(times) / len(times),
            **{f"seconds_{k[5:]}_per_update": sum(h[k] for h in history) / len(history)
               for k in ("time/generate", "time/score", "time/forward", "time/train")},
            "reward_input": "token ids" if plan.same_ids else "re-encoded text",
            "threads": threads, "precision": precision, "lr": lr,
        }
        _write_ppo_manifest(dest, a, plan, metrics, started, lr=lr, ppo_epochs=epochs, minibatch_size=mb)
    return staged.out


def _write_ppo_manifest(dest: Path, a: PPOArgs, plan: Plan, metrics: dict, started: float, **resolved: Any) -> None:
    """The stage's manifest, written last: parents = the policy and RM, args with what was resolved from them."""
    data = {"prompts": plan.prompts.summary() | {"too_long": plan.too_long, "used": len(plan.prompt_ids)}}
    write_manifest(dest, stage="ppo", parents=[plan.policy, plan.reward],
                   args=to_dict(a) | {"resolved_policy": str(plan.policy_path),
                                      "resolved_reward": str(plan.reward_path), **resolved},
                   data=data, metrics=metrics, started=started)


def _finish_lora(dest: Path, policy: Any, value: Any, tok: Any, a: PPOArgs) -> None:
    """The final LoRA checkpoint as a normal folder: merged weights on top (adapter kept in OUT/adapter)."""
    if a.lora_merge:
        policy.merge_and_unload().save_pretrained(dest, safe_serialization=True)
    else:
        policy.save_pretrained(dest)
    _save_tok(tok, dest)
    value.merge_and_unload().save_pretrained(dest / "value", safe_serialization=True)
    _save_tok(tok, dest / "value")


# ---------------------------------------------------------------------------------------------------------
# --algo grpo | rloo: TRL's trainers with the same prompts, reward model and output layout


def _run_trl(a: PPOArgs, plan: Plan, staged: ResumableOutput, reporter: Reporter, started: float) -> Path:
    say = reporter.info
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from rlhf_cli.core.training import drop_printer, save_model

    defaults = PPOArgs()
    ignored = [f"--{k.replace('_', '-')}" for k in PPO_ONLY if getattr(a, k) != getattr(defaults, k)]
    if ignored:
        say(f"--algo {a.algo}: ignoring PPO-only settings {', '.join(ignored)}")
    if a.algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    threads = configure_threads(a.threads)
    precision = pick_precision(a.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lr = a.lr or (DEFAULT_LORA_LR if a.lora else DEFAULT_LR)
    iterations = a.ppo_epochs or 1
    total = a.max_steps or max(1, math.ceil(len(plan.prompt_ids) * a.group_size / a.batch_size))
    tok = plan.tok
    transformers.set_seed(a.seed)
    dtype = torch_dtype(precision)
    policy = fit_vocab(AutoModelForCausalLM.from_pretrained(plan.policy_path, dtype=dtype), tok)
    policy.generation_config.eos_token_id = plan.eos_ids
    if a.freeze_layers:
        freeze_lower_layers(policy, a.freeze_layers)
    rm = fit_vocab(AutoModelForSequenceClassification.from_pretrained(plan.reward_path, num_labels=1, dtype=dtype),
                   plan.rm_tok)
    rm.to(device).eval().requires_grad_(False)
    scorer = RewardScorer(rm, plan, a, device)
    eos = set(plan.eos_ids)

    def reward_model(prompts, completions, completion_ids, **kw) -> list[float]:
        convs = [p + c if isinstance(p, list) else [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": c}]
                 for p, c in zip(prompts, completions, strict=True)]
        raw = scorer.score_conversations(convs, a.batch_size)
        ends = torch.tensor([bool(ids) and ids[-1] in eos for ids in completion_ids], device=raw.device)
        if "log_metric" in kw:
            kw["log_metric"]("score_raw", float(raw.mean()))
        return scorer.shape(raw, ends).tolist()

    common = dict(
        per_device_train_batch_size=a.batch_size // a.grad_accum, gradient_accumulation_steps=a.grad_accum,
        learning_rate=lr, lr_scheduler_type=a.lr_scheduler, warmup_steps=a.warmup_ratio,
        weight_decay=a.weight_decay, max_steps=total, seed=a.seed, data_seed=a.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=False, logging_steps=1,
        logging_strategy="steps", save_strategy="steps" if a.save_every else "no", save_steps=a.save_every or 500,
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        num_generations=a.group_size, max_completion_length=a.max_new_tokens, temperature=a.temperature,
        top_p=a.top_p, top_k=a.top_k or 0, beta=a.kl_coef, epsilon=a.clip_eps, max_grad_norm=a.max_grad_norm,
        num_iterations=iterations, disable_dropout=True, log_completions=False, shuffle_dataset=True,
    )
    history: list[dict] = []

    class _Log(TrainerCallback):
        """metrics.jsonl (one line per step), the live figures, and --stop-after."""

        def __init__(self) -> None:
            self.t0 = time.time()
            self.last_step_time = time.time()

        def on_train_begin(self, args, state, control, **kw):
            reporter.start(state.max_steps or total)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            if "reward" not in logs:
                return
            now = time.time()
            row = {"step": state.global_step, "episodes": state.global_step * a.batch_size,
                   "score_mean": logs.get("score_raw", logs["reward"]), "reward_mean": logs["reward"],
                   "score_std": logs.get("reward_std"), "kl": logs.get("kl"), "entropy": logs.get("entropy"),
                   "response_length": logs.get("completions/mean_length"),
                   "time/update": now - self.last_step_time, **logs}
            self.last_step_time = now
            history.append(row)
            _jsonl_append(dest / "metrics.jsonl", row)
            fig = {"score": row["score_mean"], "score_std": row["score_std"], "kl": row["kl"],
                   "entropy": row["entropy"], "clipfrac": logs.get("clip_ratio/region_mean"),
                   "len": row["response_length"]}
            reporter.update(state.global_step, state.max_steps, {k: v for k, v in fig.items() if v is not None},
                            now - self.t0)

        def on_step_end(self, args, state, control, **kw):
            if a.stop_after is not None and state.global_step >= a.stop_after and state.global_step < total:
                control.should_training_stop = True
                control.should_save = True

        def on_train_end(self, args, state, control, **kw):
            reporter.finish()

    with staged as dest:
        resume_from = None
        if a.resume:
            last = max(int(p.name.split("-")[-1]) for p in (dest / "trainer").glob("checkpoint-*"))
            history = _jsonl_keep(dest / "metrics.jsonl", last)
            resume_from = str(dest / "trainer" / f"checkpoint-{last}")
            say(f"resuming from step {last} of {total} in {dest}")
        else:
            (dest / "metrics.jsonl").write_text("", encoding="utf-8")
        cfg = Config(output_dir=str(dest / "trainer"), **common)
        say(f"{a.algo}: policy {plan.policy}, reward {plan.reward}; {precision}, {threads} threads, lr {lr:g}, "
            f"{total} steps x {a.batch_size} responses ({a.batch_size // a.group_size} prompts x {a.group_size}), "
            f"beta {a.kl_coef:g}")
        trainer = Trainer(model=policy, reward_funcs=reward_model, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in plan.rows]),
                          peft_config=lora_config(a, "CAUSAL_LM", policy) if a.lora else None,
                          callbacks=[_Log()])
        drop_printer(trainer)
        t0 = time.time()
        trainer.train(resume_from_checkpoint=resume_from)
        if a.stop_after is not None and trainer.state.global_step < total:
            raise _Stopped()
        shutil.rmtree(dest / "trainer", ignore_errors=True)
        tok.padding_side = "right"
        save_model(trainer, tok, dest, a)
        dump_yaml(a, dest / "rlhf_config.yaml", header="# rlhf ppo --config rlhf_config.yaml\n")
        first, last_row = (history[0], history[-1]) if history else ({}, {})
        metrics = {"updates": trainer.state.global_step, "episodes": trainer.state.global_step * a.batch_size,
                   "initial_score_mean": first.get("score_mean"), "final_score_mean": last_row.get("score_mean"),
                   "final_kl": last_row.get("kl"), "final_entropy": last_row.get("entropy"),
                   "final_response_length": last_row.get("response_length"),
                   "seconds_per_update": (time.time() - t0) / max(1, trainer.state.global_step),
                   "threads": threads, "precision": precision, "lr": lr}
        _write_ppo_manifest(dest, a, plan, metrics, started, lr=lr, ppo_epochs=iterations)
    return staged.out
