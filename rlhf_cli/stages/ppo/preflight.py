"""PPO's preflight: every check that needs no weights, before any weights load.

It finds the policy and the reward model (refusing stages of the wrong kind), loads both tokenizers, decides
whether the RM can read the policy's token ids directly (same vocabulary and chat template, and a template whose
turn ends with EOS) or must re-encode the text, and encodes the prompts, dropping those that leave no room for a
response. The result is a `Plan` the trainers start from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_cli.core import dry_run as dry
from rlhf_cli.core import launch, memory, runtime, vllm_engine
from rlhf_cli.core.errors import CheckpointError, ConfigError, DataError
from rlhf_cli.core.generation import encode_chat, stop_ids
from rlhf_cli.core.manifest import Manifest, manifest_if_stage, require_stage
from rlhf_cli.core.models import SAFE_LOADING, LoadOptions, resolve_model, set_distinct_pad
from rlhf_cli.core.reward_model import RewardModel, RewardSpec, read_config
from rlhf_cli.core.stages import a_stage, command_for, is_policy
from rlhf_cli.core.training import inherit
from rlhf_cli.data import DataSet, load_prompts
from rlhf_cli.stages.ppo.args import (
    DEFAULT_LORA_LR,
    DEFAULT_LR,
    DEFAULT_MAX_LENGTH,
    PPOArgs,
    global_batch,
    minibatch_size,
    ppo_epochs,
    updates,
)


@dataclass
class Plan:
    """What the preflight found: folders, tokenizers, the encoded prompts, how the RM reads the policy's text."""

    policy: str  # as given (or RUN/sft)
    policy_path: Path
    policy_manifest: Manifest | None
    reward_spec: RewardSpec  # the reward model, found and checked
    tok: PreTrainedTokenizerBase  # the policy's tokenizer, left padding for generation
    rm_tok: PreTrainedTokenizerBase
    same_ids: bool  # the RM reads the policy's token ids directly
    turn_suffix: list[int]  # with same_ids: what the chat template writes after an answer's EOS
    why_reencode: str
    prompts: DataSet
    prompt_ids: list[list[int]]
    rows: list[dict]  # prompt rows kept, aligned with prompt_ids
    too_long: int
    eos_ids: list[int]
    rm_max_length: int
    loading: LoadOptions = SAFE_LOADING  # --allow-pickle, --trust-remote-code

    @property
    def reward(self) -> str:
        return self.reward_spec.name

    @property
    def reward_path(self) -> Path:
        return self.reward_spec.path


def _pick_policy(a: PPOArgs, say: Callable[[str], None]) -> tuple[str, Path, Manifest | None]:
    if a.policy is None:
        if not a.run:
            raise ConfigError("--policy: missing; pass --policy SFT_DIR or --run DIR (uses DIR/sft)")
        a.policy = str(require_stage(Path(a.run) / "sft", "sft", "--run").path)
    m = manifest_if_stage(a.policy)
    if m is not None and not is_policy(m.stage):
        raise CheckpointError(f"--policy {a.policy}: is {a_stage(m.stage)}, expected an sft stage (a causal LM), "
                              f"made by `{command_for('sft')}`")
    path = resolve_model(a.policy, flag="--policy", say=say, loading=LoadOptions.of(a))
    archs = read_config(path, "--policy").get("architectures") or []
    if not any(x.endswith("ForCausalLM") or x.endswith("LMHeadModel") for x in archs):
        raise CheckpointError(f"--policy {a.policy}: not a causal language model (found "
                              f"{', '.join(archs) or 'no architectures'}); expected an sft stage, made by "
                              f"`{command_for('sft')}`")
    return a.policy, path, m


def _pick_reward(a: PPOArgs, say: Callable[[str], None]) -> RewardSpec:
    spec = RewardModel.locate(a.reward, a.run, "--reward", say, LoadOptions.of(a))
    a.reward = spec.name
    return spec


def _load_tok(path: Path, flag: str, name: str, loading: LoadOptions) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path, **loading.code_kwargs())
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise CheckpointError(f"{flag} {name}: no usable tokenizer in {path} ({type(e).__name__}); expected the "
                              f"tokenizer files next to the weights, as every stage saves them") from None
    if tok.eos_token_id is None:
        raise CheckpointError(f"{flag} {name}: the tokenizer defines no EOS token, so responses cannot end; set "
                              f"eos_token in {path / 'tokenizer_config.json'}")
    set_distinct_pad(tok)
    return tok


def template_suffix(tok: PreTrainedTokenizerBase) -> list[int] | None:
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


def eos_ids_of(tok: PreTrainedTokenizerBase, path: Path) -> list[int]:
    """`generation.stop_ids` from the folder's generation_config.json, read before the weights load."""
    try:
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        gen = None
    return stop_ids(tok, gen)


def preflight(a: PPOArgs, say: Callable[[str], None]) -> Plan:
    """Every check that needs no weights: folders, stage kinds, tokenizers, prompts that fit."""
    if a.prompts is None:
        raise ConfigError("--prompts: missing; expected a prompts file (any format `rlhf sft` or `rlhf reward` "
                          "reads), a folder or a hub dataset")
    policy, policy_path, pm = _pick_policy(a, say)
    rm_spec = _pick_reward(a, say)
    reward, reward_path, rm = rm_spec.name, rm_spec.path, rm_spec.manifest
    prompts = load_prompts(a.prompts, a.max_samples)
    say(prompts.describe())
    max_length = inherit(a, pm, "max_length", DEFAULT_MAX_LENGTH, say)
    if a.max_new_tokens >= max_length:
        raise ConfigError(f"--max-new-tokens {a.max_new_tokens}: must be below --max-length {max_length} (prompt + "
                          f"response)")

    runtime.quiet_libraries()
    tok = _load_tok(policy_path, "--policy", policy, LoadOptions.of(a))
    rm_tok = _load_tok(reward_path, "--reward", reward, LoadOptions.of(a))
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
    return Plan(policy=policy, policy_path=policy_path, policy_manifest=pm, reward_spec=rm_spec,
                tok=tok, rm_tok=rm_tok, same_ids=same_ids,
                turn_suffix=suffix if same_ids else [], why_reencode=why, prompts=prompts,
                prompt_ids=ids, rows=rows, too_long=too_long, eos_ids=eos_ids_of(tok, policy_path),
                rm_max_length=int(rm_max), loading=LoadOptions.of(a))


def plan_memory(a: PPOArgs, plan: Plan, precision: str, minibatch: int, say: Callable[[str], None]
                ) -> memory.MemoryPlan:
    """Micro-batches of each minibatch that fit (see `rlhf_cli.core.memory`): the policy and the value model
    train on prompt + response tokens, logits only over the response; reference and RM sit beside them."""
    shape = memory.ModelShape.of(plan.policy_path)
    frozen = (0 if a.lora else shape.params) + memory.ModelShape.of(plan.reward_path).params
    work = memory.Workload(
        causal=True, seq_len=max(len(p) for p in plan.prompt_ids) + a.max_new_tokens, logit_len=a.max_new_tokens,
        trainable=memory.trainable_params(shape, lora=a.lora, lora_r=a.lora_r, freeze_layers=a.freeze_layers),
        frozen_layers=a.freeze_layers, weight_bytes=runtime.weight_dtype(precision).itemsize,
        act_bytes=runtime.compute_dtype(precision).itemsize, frozen_params=frozen,
        value_model=a.algo == "ppo")
    mp = memory.plan(shape, work, minibatch // a.grad_accum, a.grad_accum, max_memory=trl_vllm_budget(a),
                     micro_batch=a.micro_batch_size, cpu=not runtime.has_gpu(),
                     what="the minibatch" if a.algo == "ppo" else "--batch-size / --grad-accum")
    if mp.tight:
        memory.return_freed_memory()
    say(mp.describe())
    return mp


def trl_vllm_budget(a: PPOArgs) -> str | None:
    """--max-memory, else for grpo/rloo with a colocated vLLM engine (which TRL starts after this plan) the free
    GPU memory less the engine's share; else None (the planner measures what is free)."""
    if a.max_memory or not (a.use_vllm and a.algo != "ppo" and a.vllm_mode == "colocate" and runtime.has_gpu()):
        return a.max_memory
    import torch

    free, total = torch.cuda.mem_get_info()
    room = max((free - a.vllm_gpu_memory_utilization * total) * memory.SAFETY, 2**20)
    return f"{room / 2**30:.3f}GiB"


def dry_run(a: PPOArgs, plan: Plan, out: Path, reporter) -> Path:
    """`--dry-run`: the plan of this run (see `rlhf_cli.core.dry_run`). Per update, with B rollouts of P prompt
    and R response tokens: B x R tokens generated, forward passes over B x (P + R) tokens for the old and
    reference log-probabilities, values and RM scores (grpo/rloo: reference when beta > 0, old log-probabilities
    when several epochs, RM), and the PPO epochs' training passes (policy, and the value model for ppo)."""
    threads = runtime.configure_threads(a.threads)
    choice = runtime.precision_choice(a.precision)
    mem = plan_memory(a, plan, choice.precision, minibatch_size(a) if a.algo == "ppo" else a.batch_size, reporter.info)
    total, epochs = updates(a, len(plan.prompt_ids)), ppo_epochs(a)
    shape, rm_shape = memory.ModelShape.of(plan.policy_path), memory.ModelShape.of(plan.reward_path)
    prompt_lens = [len(p) for p in plan.prompt_ids]
    # our PPO: --batch-size per process, so an update is the global batch (the time is for one process doing all)
    batch, response = (global_batch(a) if a.algo == "ppo" else a.batch_size), a.max_new_tokens
    seq = sum(prompt_lens) / len(prompt_lens) + response
    head = response / seq  # PPO's log-probabilities need vocabulary logits over the response only
    lora = {"lora": a.lora, "lora_r": a.lora_r, "freeze_layers": a.freeze_layers}
    trains = dry.train_flops(shape, head=head, **lora)
    if a.algo == "ppo":
        value_shape = rm_shape if a.value_init == "reward" else shape
        trains += dry.train_flops(value_shape, head=0.0, **lora)
        # old and reference log-probabilities, values, scores
        forwards = (2 * dry.forward_flops(shape, head) + dry.forward_flops(value_shape, 0.0)
                    + dry.forward_flops(rm_shape, 0.0))
    else:  # reference when beta > 0, old log-probabilities when several epochs, scores
        forwards = dry.forward_flops(shape, head) * ((a.kl_coef > 0) + (epochs > 1)) + dry.forward_flops(rm_shape, 0)
    per_update = batch * seq
    compute = dry.Compute(train_flops=total * epochs * per_update * trains,
                          forward_flops=total * (per_update * forwards
                                                 + batch * (seq - response) * dry.forward_flops(shape, 0.0)),
                          decode_tokens=total * batch * response, decode_batch=batch)
    t = dry.estimate_time(compute, shape, int(mem.micro_batch * seq), choice.precision)
    per_prompt = 1 if a.algo == "ppo" else a.group_size
    tokens_per_epoch = int(per_prompt * (sum(prompt_lens) + len(prompt_lens) * response))
    procs = launch.processes(a)
    rollouts = (f"{batch} rollouts" + (f" ({procs} processes x --batch-size {a.batch_size})" if procs > 1 else ""))\
        if a.algo == "ppo" else \
        f"{batch} responses ({batch // a.group_size} prompts x --group-size {a.group_size})"
    summary = {
        "algorithm": a.algo,
        "policy": f"{plan.policy} ({plan.policy_path})" + (f", {a_stage(plan.policy_manifest.stage)}"
                                                           if plan.policy_manifest else ""),
        "reward model": f"{plan.reward} ({plan.reward_path})",
        "reward model reads": "the policy's token ids" if plan.same_ids else f"re-encoded text ({plan.why_reencode})",
        "prompts": plan.prompts.describe(),
        "prompts kept": f"{len(plan.prompt_ids)} ({plan.too_long} dropped as longer than --max-length minus "
                        f"--max-new-tokens)",
        "prompt token lengths": dry.length_stats(prompt_lens),
        "optimisation steps": f"{total} updates x {rollouts}, {epochs} epoch{'s' if epochs != 1 else ''} over each"
                              + (f" in minibatches of {minibatch_size(a)}" if a.algo == "ppo" else ""),
        "tokens per epoch": tokens_per_epoch,
        "tokens generated": f"up to {total * batch * response} ({response} per response)",
        "generation": vllm_engine.describe(a.use_vllm, a.vllm_mode, a.vllm_gpu_memory_utilization,
                                           a.vllm_server_url),
    }
    if a.load_in_4bit:
        summary["base weights"] = "4-bit NF4 (QLoRA)" + ("" if runtime.has_gpu() else
                                                         "; not available on this machine: needs a CUDA GPU")
    lr = a.lr or (DEFAULT_LORA_LR if a.lora else DEFAULT_LR)
    resolved = {"lr (used)": lr, "ppo_epochs (used)": epochs, "precision (used)": str(choice),
                "threads (used)": threads}
    return dry.finish(reporter, dry.report("ppo", out, a, summary, total, tokens_per_epoch, mem, t, resolved))
