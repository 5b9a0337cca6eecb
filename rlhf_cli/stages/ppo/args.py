"""`rlhf ppo` flags (torch-free, so `--help` is instant), and the rules between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_cli.core import launch
from rlhf_cli.core.args import (
    accelerate_config_field,
    allow_pickle_field,
    check_reporting,
    check_vllm_layout,
    dry_run_field,
    freeze_layers_field,
    load_in_4bit_field,
    lora_alpha_field,
    lora_dropout_field,
    lora_field,
    lora_merge_field,
    lora_r_field,
    lora_targets_field,
    lr_field,
    max_length_field,
    max_memory_field,
    max_samples_field,
    num_processes_field,
    overwrite_field,
    precision_field,
    private_field,
    push_to_hub_field,
    report_to_field,
    threads_field,
    trust_remote_code_field,
    use_vllm_field,
    vllm_memory_field,
    warmup_field,
    weight_decay_field,
)
from rlhf_cli.core.config import opt, validate
from rlhf_cli.core.errors import ConfigError

ALGOS = ("ppo", "grpo", "rloo")
DEFAULT_MAX_LENGTH = 512
DEFAULT_LR = 3e-6
DEFAULT_LORA_LR = 5e-5
DEFAULT_PPO_EPOCHS = 4

# Settings that define the run: a resumed run must use the same ones (--max-steps may change).
RESUME_KEYS = ("algo", "policy", "reward", "prompts", "max_samples", "batch_size", "seed", "lora", "value_init",
               "max_new_tokens")
# PPO settings that GRPO/RLOO do not use; given with those, they are named as ignored.
PPO_ONLY = ("minibatch_size", "num_minibatches", "kl_estimator", "adaptive_kl", "kl_target", "kl_horizon", "gamma",
            "lam", "whiten_advantages", "clip_value", "vf_coef", "target_kl", "value_init", "group_by_length",
            "shared_trunk", "value_warmup")


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
    overwrite: bool = overwrite_field()
    resume: bool = opt(False, "Continue the unfinished run whose last checkpoint is in OUT.partial.")
    stop_after: int | None = opt(None, "Stop after this many updates as if interrupted, leaving a checkpoint in "
                                       "OUT.partial for --resume (time-sliced jobs, tests).", min=1)
    algo: str = opt("ppo", "ppo: this toolkit's PPO with a value model; grpo, rloo: TRL's GRPOTrainer or "
                           "RLOOTrainer with the same reward model (group baselines, no value model).",
                    choices=ALGOS)
    max_samples: int | None = max_samples_field()
    max_steps: int | None = opt(None, "Updates to run, each on --batch-size rollouts (default: one pass over "
                                      "the prompts).", min=1)
    batch_size: int = opt(8, "Rollouts (prompt + sampled response) per update and per process, as in the other "
                             "training stages: N processes (--num-processes) take N x this many per update.", min=1)
    ppo_epochs: int | None = opt(None, "Passes over each update's rollouts (default 4; grpo/rloo: 1).", min=1)
    minibatch_size: int | None = opt(None, "Rollouts per optimiser step inside an update, per process (default: "
                                           "all of them); must divide --batch-size.", min=1)
    num_minibatches: int | None = opt(None, "Or: split each update's rollouts into this many minibatches.", min=1)
    grad_accum: int = opt(1, "Split each minibatch into this many micro-batches whose gradients are summed "
                             "(same result, less memory).", min=1)
    max_memory: str | None = max_memory_field()
    micro_batch_size: int | None = opt(None, "Rollouts per forward/backward pass (default: chosen by the memory "
                                             "planner; must divide the minibatch).", min=1)
    lr: float | None = lr_field(f"Peak learning rate (default {DEFAULT_LR:g}; {DEFAULT_LORA_LR:g} with --lora).",
                                example="1e-6")
    lr_scheduler: str = opt("linear", "Learning-rate schedule over the updates.",
                            choices=("linear", "cosine", "constant"))
    warmup_ratio: float = warmup_field(0.0, "updates", "Fraction of the updates spent warming up the learning rate.")
    weight_decay: float = weight_decay_field()
    max_length: int | None = max_length_field("Longest prompt + response in tokens (default: the policy stage's, "
                                              f"else {DEFAULT_MAX_LENGTH}); longer prompts are dropped and counted.")
    max_new_tokens: int = opt(64, "Longest response in tokens.", min=1)
    temperature: float = opt(0.7, "Sampling temperature (log-probabilities use the same temperature).", above=0)
    top_k: int | None = opt(None, "Sample only among the k most likely tokens (default: all).",
                            min=0, expect="a whole number >= 0 (0: no limit)")
    top_p: float = opt(1.0, "Nucleus sampling: the smallest set of tokens with this much probability.",
                       above=0, max=1, expect="a probability, 0 < p <= 1")
    missing_eos_penalty: float | None = opt(None, "Subtract this from the score of a response that hit "
                                                  "--max-new-tokens without EOS (e.g. 1.0).")
    score_clip: float | None = opt(None, "Clip (shaped) scores to [-x, x].", above=0)
    normalize_rewards: bool = opt(False, "Normalise scores with the running mean and std of all scores so far.")
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (initial value with --adaptive-kl; grpo/rloo: beta).",
                         min=0)
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1 = log p - log p_ref (unbiased), "
                                  "k3 = (r - 1) - log r (unbiased, never negative), k2 = squared log ratio / 2.",
                            choices=("k1", "k2", "k3"))
    adaptive_kl: bool = opt(False, "Adapt beta so the KL per response tracks --kl-target (Ziegler et al.).")
    kl_target: float = opt(6.0, "Target KL per response (nats) for --adaptive-kl.", above=0)
    kl_horizon: float = opt(10000.0, "Horizon (rollouts) of the adaptive KL controller.", above=0)
    gamma: float = opt(1.0, "Discount factor.", min=0, max=1, expect="a discount factor, 0 <= gamma <= 1")
    lam: float = opt(0.95, "GAE lambda.", min=0, max=1, expect="0 <= lambda <= 1")
    whiten_advantages: bool = opt(True, "Normalise advantages to mean 0, std 1 per update.")
    clip_eps: float = opt(0.2, "PPO ratio clip range epsilon.", above=0)
    clip_value: float = opt(0.2, "Value clip range around the rollout-time values.", above=0)
    vf_coef: float = opt(0.1, "Weight of the value loss.", min=0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this.", above=0)
    group_by_length: bool = opt(True, "Make each update's minibatches of rollouts of similar length (less padding, "
                                      "faster on prompts of mixed lengths; their order is shuffled every epoch), "
                                      "else random minibatches.")
    shared_trunk: bool = opt(True, "With --freeze-layers: compute the frozen lower layers, which policy, "
                                   "reference and value model share, once per rollout, and run only the layers "
                                   "above them in every other pass (the same results, checked on the first "
                                   "rollout; the full passes when the weights are not shared).")
    max_kl: float = opt(50.0, "Stop the run when the KL to the reference passes this many nats per response "
                              "(runaway optimisation); the last checkpoint is kept.", above=0)
    target_kl: float | None = opt(None, "Stop an update's remaining PPO epochs once the approximate KL to the "
                                        "rollout policy passes this (e.g. 0.1).", above=0)
    value_warmup: int = opt(0, "Train only the value model for the first N updates (the policy does not move "
                               "while the value model learns the returns), then both.", min=0)
    value_init: str = opt("reward", "Start the value model from the reward model, or from the policy with a "
                                    "fresh one-output head.", choices=("reward", "policy"))
    group_size: int = opt(4, "grpo/rloo: responses sampled per prompt (TRL's num_generations).", min=1)
    sample_every: int = opt(10, "Show and keep a few prompt/response/score samples every N updates (0: never).", min=0)
    save_every: int = opt(0, "Checkpoint into OUT.partial every N updates for --resume (0: only at the end).", min=0)
    seed: int = opt(42, "Random seed (prompt order, sampling, minibatches, fresh heads, LoRA).")
    threads: int | None = threads_field()
    num_processes: int | None = num_processes_field()
    accelerate_config: str | None = accelerate_config_field()
    precision: str = precision_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()
    lora: bool = lora_field("Train LoRA adapters on the policy and the value model; the reference is the policy "
                            "with its adapters switched off.")
    lora_r: int = lora_r_field()
    lora_alpha: int = lora_alpha_field()
    lora_dropout: float = lora_dropout_field(0.0, "LoRA dropout (0 keeps rollout and training log-probabilities "
                                                  "identical).")
    lora_targets: str = lora_targets_field()
    lora_merge: bool = lora_merge_field()
    freeze_layers: int = freeze_layers_field("Freeze the embeddings and the lowest N layers of the policy and value "
                                             "model.")
    load_in_4bit: bool = load_in_4bit_field()
    use_vllm: bool = use_vllm_field("Sample the rollouts with vLLM on the GPU (needs `pip install vllm`): ppo runs "
                                    "a colocated engine that takes the policy's weights after every update and "
                                    "only supplies token ids (log-probabilities come from the policy's own "
                                    "forward pass); grpo/rloo use TRL's vLLM integration.")
    vllm_mode: str = opt("colocate", "With --use-vllm: colocate (an engine in the training process) or server "
                                     "(grpo/rloo only: a `trl vllm-serve` server at --vllm-server-url).",
                         choices=("colocate", "server"))
    vllm_gpu_memory_utilization: float = vllm_memory_field()
    vllm_server_url: str | None = opt(None, "With --vllm-mode server: the server's URL (default "
                                            "http://localhost:8000).", metavar="URL")
    report_to: str = report_to_field()
    push_to_hub: str | None = push_to_hub_field()
    private: bool = private_field()
    dry_run: bool = dry_run_field()

    def check_launch(self) -> None:
        """Our PPO keeps whole copies of its models on every process (DDP): a sharding config is refused before
        any process starts."""
        check_vllm_layout(self.use_vllm, launch.processes(self), self.vllm_mode,
                          "rlhf ppo --algo ppo" if self.algo == "ppo" else "")
        kind = sharded(self) if self.algo == "ppo" else None
        if kind:
            raise ConfigError(f"--accelerate-config {self.accelerate_config}: rlhf ppo --algo ppo copies the policy "
                              f"and value model to every process (DDP) and does not shard them with {kind}; "
                              f"expected a DDP config such as examples/accelerate/ddp.yaml, or --algo grpo/rloo")


def check_ppo_args(a: PPOArgs) -> None:
    """Choices and bounds of every field, then the rules between fields, then tracking and the hub."""
    validate(a)
    a.check_launch()
    if a.load_in_4bit and not a.lora:
        raise ConfigError("--load-in-4bit: the 4-bit base weights are frozen, so only adapters can train; expected "
                          "--lora with it (QLoRA)")
    if a.vllm_server_url and a.vllm_mode != "server":
        raise ConfigError(f"--vllm-server-url {a.vllm_server_url}: only used with --vllm-mode server")
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
    check_reporting(a)


def sharded(a: PPOArgs) -> str | None:
    """'DeepSpeed' or 'FSDP' when the run would be launched (or was launched) with sharded weights."""
    import os

    if launch.launched():
        kinds = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}
        return next((name for env, name in kinds.items() if os.environ.get(env, "").lower() == "true"), None)
    if a.accelerate_config:
        from rlhf_cli.core.config import load_yaml

        kind = str(load_yaml(a.accelerate_config).get("distributed_type", "")).upper()
        return {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}.get(kind)
    return None


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


def updates(a: PPOArgs, prompts: int) -> int:
    """Updates (optimiser steps, for grpo/rloo) in the run: --max-steps, else one pass over the prompts (each
    sampled --group-size times with grpo/rloo). Our PPO's update takes --batch-size rollouts on every process."""
    if a.algo == "ppo":
        return a.max_steps or max(1, math.ceil(prompts / global_batch(a)))
    return a.max_steps or max(1, math.ceil(prompts * a.group_size / a.batch_size))


def global_batch(a: PPOArgs) -> int:
    """Our PPO's rollouts per update over every process: --batch-size x processes."""
    return a.batch_size * launch.processes(a)


def ppo_epochs(a: PPOArgs) -> int:
    """Passes over each update's rollouts: --ppo-epochs, else 4 for our PPO and 1 for grpo/rloo."""
    return a.ppo_epochs or (DEFAULT_PPO_EPOCHS if a.algo == "ppo" else 1)
