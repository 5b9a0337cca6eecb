"""The flags several commands share, each declared once (help text, default, bounds), grouped by what they set.

Commands list these fields in their own args dataclass, in the order their `--help` shows them, so a shared flag
has the same name, text and limits everywhere. Nothing here imports torch: the CLI builds `--help` from these
classes without loading any heavy library.

Groups: run folders (`overwrite_field`, `max_samples_field`), optimisation (`TrainArgs` for the Trainer-based
stages; `lr_field`, `warmup_field`, `weight_decay_field`, `max_length_field`, `freeze_layers_field` shared with
PPO), LoRA (`lora_*_field`), runtime (`threads_field`, `precision_field`),
processes (`num_processes_field`, `accelerate_config_field`), loading (`allow_pickle_field`,
`trust_remote_code_field`), sampling for chat, generate and eval policy (`temperature_field`, `top_p_field`,
`top_k_field`, `repetition_penalty_field`, `SAMPLING_DEFAULTS`), tracking and the hub (`report_to_field`,
`push_to_hub_field`, `private_field`, `check_reporting`). Flags whose text differs per command
(seeds, output folders) are declared by each command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_cli.core.config import opt, validate
from rlhf_cli.core.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # also the default of every --model flag
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# ------------------------------------------------------------------------------------------------ run folders


def overwrite_field() -> Any:
    return opt(False, "Replace a finished stage already in --out (only once the new one is complete).")


def max_samples_field(help: str = "Use at most this many prompts.") -> Any:
    return opt(None, help, min=1)


# ------------------------------------------------------------------------------------------------ optimisation


def lr_field(help: str = "Peak learning rate (stage default when not given).",
             example: str = "1e-5") -> Any:
    return opt(None, help, above=0, below=1, expect=f"a small positive number such as {example}")


def warmup_field(default: float, unit: str, help: str) -> Any:
    return opt(default, help, min=0, below=1, expect=f"a fraction of the {unit}, 0 <= x < 1")


def weight_decay_field() -> Any:
    return opt(0.0, "AdamW weight decay.", min=0)


def max_length_field(help: str) -> Any:
    return opt(None, help, min=16, expect="at least 16 tokens")


def freeze_layers_field(help: str) -> Any:
    return opt(0, help, min=0)


# ------------------------------------------------------------------------------------------------ LoRA


def lora_field(help: str = "Train LoRA adapters instead of all weights.") -> Any:
    return opt(False, help)


def lora_r_field() -> Any:
    return opt(16, "LoRA rank.", min=1)


def lora_alpha_field() -> Any:
    return opt(32, "LoRA alpha (scale = alpha / r).")


def lora_dropout_field(default: float = 0.05, help: str = "LoRA dropout.") -> Any:
    return opt(default, help, min=0, below=1, expect="a probability, 0 <= p < 1")


def lora_targets_field() -> Any:
    return opt("all-linear", "Modules that get adapters: all-linear or a comma list (q_proj,v_proj).")


def lora_merge_field() -> Any:
    return opt(True, "Merge adapters into a full checkpoint (the adapter is kept in OUT/adapter).")


# ------------------------------------------------------------------------------------------------ memory


def max_memory_field() -> Any:
    return opt(None, "Memory this run may use, such as 8GB (default: 85% of the free RAM, or of the free GPU "
                     "memory); the micro-batch, accumulation and gradient checkpointing are chosen to fit.")


def micro_batch_field() -> Any:
    return opt(None, "Examples per forward/backward pass (default: chosen by the memory planner; the effective "
                     "batch stays --batch-size x --grad-accum).", min=1)


def save_every_field() -> Any:
    return opt(None, "Also save a resumable checkpoint every N optimiser steps (one is always saved on Ctrl-C "
                     "or SIGTERM).", min=1)


# Every training stage lists it (TrainArgs does for its stages); see rlhf_cli.core.dry_run.
def dry_run_field() -> Any:
    return opt(False, "Check the settings, data, model and parent stages, print the plan (settings, data, steps, "
                      "tokens, memory, an estimated time) and exit, without loading weights or writing anything.")


# ------------------------------------------------------------------------------------------------ runtime


def threads_field() -> Any:
    return opt(None, "CPU threads for torch (default: the cores this process may use).")


def precision_field() -> Any:
    return opt("auto", "Numeric precision: auto = bf16 on GPUs that have it, and on CPUs where a bf16 matmul "
               "measures at least 1.3x fp32 (fp32 weights, bf16 autocast); else fp32. RLHF_PRECISION overrides "
               "auto.", choices=PRECISIONS)


# ------------------------------------------------------------------------------------------------ processes
# Every training stage lists both; the CLI starts `accelerate launch` when either is given (rlhf_cli.core.launch).


def num_processes_field() -> Any:
    return opt(None, "Train in N processes (one per GPU; gloo on the CPU) started by `accelerate launch`: each "
                     "takes its share of every batch, so the global batch is N x the per-process batch.", min=1)


def accelerate_config_field() -> Any:
    return opt(None, "Start the run with `accelerate launch --config_file FILE` (DDP, DeepSpeed ZeRO, FSDP: see "
                     "examples/accelerate/); --num-processes overrides its num_processes.", metavar="FILE")


# ------------------------------------------------------------------------------------------------ GPU
# Generation with vLLM (rlhf_cli.core.vllm_engine) and 4-bit loading (QLoRA); both need a CUDA GPU and a package
# that is not a dependency, and are refused with one line before any weights load where either is missing.


def use_vllm_field(help: str) -> Any:
    return opt(False, help)


def vllm_memory_field() -> Any:
    return opt(0.3, "With --use-vllm (colocated): the fraction of the GPU's memory vLLM may take for its weights "
                    "and KV cache; training gets the rest.", above=0, below=1, expect="a fraction, 0 < x < 1")


def check_vllm_layout(use_vllm: bool, processes: int, mode: str = "colocate", what: str = "") -> None:
    """The rules of --use-vllm that need no GPU (checked before `accelerate launch` starts processes): `what`
    names a command whose own engine runs colocated in one process (TRL's trainers, `what` empty, also run it
    under several processes or as a server)."""
    if not (use_vllm and what):
        return
    if mode != "colocate":
        raise ConfigError(f"--vllm-mode {mode}: {what} runs vLLM colocated in its own process; expected "
                          f"--vllm-mode colocate (a vLLM server is for --algo grpo/rloo)")
    if processes > 1:
        raise ConfigError(f"--use-vllm with {processes} processes: {what} runs one colocated vLLM engine in one "
                          f"process; expected one process (--algo grpo/rloo run vLLM under several)")


def load_in_4bit_field() -> Any:
    return opt(False, "With --lora: load the frozen base weights in 4 bits (QLoRA, NF4 through bitsandbytes; needs "
                      "a CUDA GPU and `pip install bitsandbytes`).")


# ------------------------------------------------------------------------------------------------ loading
# Every command that loads a model lists both (rlhf_cli.core.models.LoadOptions applies them).


def allow_pickle_field() -> Any:
    return opt(False, "Also load pickle weights (pytorch_model.bin, *.pt, *.pth, *.ckpt), which can run code when "
                      "read; only for files you trust (default: safetensors only).")


def trust_remote_code_field() -> Any:
    return opt(False, "Run the Python code a model folder names in its config.json (auto_map); only for models you "
                      "trust (default: never; transformers' built-in classes load it, or it is refused).")


# ------------------------------------------------------------------------------------------------ sampling
# How chat, generate and eval policy sample: a flag, else the model's generation_config.json, else these, the
# settings SmolLM2's model card recommends for its small instruct models (at higher temperatures they wander off
# the question). PPO/GRPO/RLOO rollouts have flags of their own: on-policy RL samples as it was configured.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}


def _sampling_default(name: str, fallbacks: dict[str, float], first: str | None) -> str:
    chain = ([first] if first else []) + ["the model's generation_config.json", f"{fallbacks[name]:g}"]
    return "default: " + ", else ".join(chain)


def temperature_field(fallbacks: dict[str, float] = SAMPLING_DEFAULTS, first: str | None = None) -> Any:
    default = _sampling_default("temperature", fallbacks, first)
    return opt(None, f"Sampling temperature; 0 = greedy decoding ({default}).", min=0,
               expect="a number >= 0 (0 = greedy)")


def top_p_field(fallbacks: dict[str, float] = SAMPLING_DEFAULTS, first: str | None = None) -> Any:
    return opt(None, "Nucleus sampling: sample from the most likely tokens holding this much probability; 1 = off "
                     f"({_sampling_default('top_p', fallbacks, first)}).", above=0, max=1,
               expect="a probability in (0, 1] (1 = off)")


def top_k_field(fallbacks: dict[str, float] = SAMPLING_DEFAULTS, first: str | None = None) -> Any:
    default = _sampling_default("top_k", fallbacks, first)
    return opt(None, f"Sample from the K most likely tokens only; 0 = off ({default}).", min=0,
               expect="a whole number >= 0 (0 = off)")


def repetition_penalty_field(fallbacks: dict[str, float] = SAMPLING_DEFAULTS, first: str | None = None) -> Any:
    return opt(None, "Make tokens already in the prompt or answer less likely, such as 1.1; 1 = off "
                     f"({_sampling_default('repetition_penalty', fallbacks, first)}).", above=0,
               expect="a positive number (1 = off)")


# ------------------------------------------------------------------------------------------------ tracking, hub
# Every training stage lists these three; `check_reporting` checks them before any model loads.


def report_to_field() -> Any:
    return opt("none", "Experiment tracking: none, tensorboard, wandb, trackio or mlflow, or a comma list such as "
                       "tensorboard,mlflow (a list in YAML). TensorBoard writes OUT/runs: `tensorboard --logdir "
                       "RUN` shows every stage.", metavar="NAMES", joins_list=True)


def push_to_hub_field() -> Any:
    return opt(None, "Upload the finished stage folder, with its model card, to this hub repo (USER/NAME); the "
                     "token (`hf auth login` or HF_TOKEN) and the hub are checked before training.", metavar="REPO")


def private_field() -> Any:
    return opt(False, "Make the --push-to-hub repo private when it is created.")


def check_reporting(args: Any) -> None:
    """--report-to (each integration installed) and --push-to-hub (a token, the hub reachable): called at the start
    of every training stage, so a run that could not log or upload fails before it trains."""
    from rlhf_cli.core import hub, tracking

    tracking.check_report_to(getattr(args, "report_to", None))
    hub.check_push(getattr(args, "push_to_hub", None))


# ------------------------------------------------------------------------------------------------ Trainer stages


@dataclass
class TrainArgs:
    """The flags of the stages that train through a transformers Trainer (sft, reward)."""

    model: str = opt(DEFAULT_MODEL, "Model to start from: a stage folder, a local model folder or a hub id.")
    data: str | None = opt(None, "Training data: .jsonl/.json/.csv/.parquet file, folder, or hub dataset "
                                 "(name, name:split, name:config:split).")
    eval_data: str | None = opt(None, "Held-out data in the same format, for eval metrics.")
    eval_split: float = opt(0.0, "Hold out this fraction of --data for eval (when --eval-data is not given).",
                            min=0, below=1, expect="a fraction between 0 and 1 (for example 0.1)")
    out: str | None = opt(None, "Output folder (default: RUN/STAGE when --run is given).")
    run: str | None = opt(None, "Run folder: stages write RUN/sft, RUN/reward, ... and find their parents there.")
    overwrite: bool = overwrite_field()
    format: str = opt("auto", "Data format; detected from the fields when auto.")
    max_samples: int | None = max_samples_field("Use at most this many rows (prompts, for ranked lists) of --data.")
    max_steps: int | None = opt(None, "Stop after this many optimiser steps (overrides --epochs).", min=1)
    epochs: float = opt(1.0, "Passes over the training data.", above=0)
    lr: float | None = lr_field()
    lr_scheduler: str = opt("cosine", "Learning-rate schedule.",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_ratio: float = warmup_field(0.05, "steps", "Fraction of steps spent warming up the learning rate.")
    batch_size: int = opt(8, "Examples (pairs, for reward) per device step.", min=1)
    grad_accum: int = opt(1, "Steps whose gradients are summed before each optimiser step.", min=1)
    max_length: int | None = max_length_field("Longest sequence in tokens (default: the parent stage's, else the "
                                              "stage default).")
    weight_decay: float = weight_decay_field()
    seed: int = opt(42, "Random seed (data order, head initialisation, LoRA).")
    lora: bool = lora_field()
    lora_r: int = lora_r_field()
    lora_alpha: int = lora_alpha_field()
    lora_dropout: float = lora_dropout_field()
    lora_targets: str = lora_targets_field()
    lora_merge: bool = lora_merge_field()
    precision: str = precision_field()
    freeze_layers: int = freeze_layers_field("Freeze the embeddings and the lowest N transformer layers: no "
                                             "backward pass through them, much faster on CPU (LoRA adapters, if "
                                             "any, go in the rest).")
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory (slower; turned on by the "
                                              "memory planner when nothing fits without it).")
    max_memory: str | None = max_memory_field()
    micro_batch_size: int | None = micro_batch_field()
    threads: int | None = threads_field()
    num_processes: int | None = num_processes_field()
    accelerate_config: str | None = accelerate_config_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()
    logging_steps: int = opt(1, "Log metrics every N optimiser steps.", min=1)
    save_every: int | None = save_every_field()
    resume: bool = opt(False, "Continue an interrupted run from the checkpoint in OUT.partial (same data and "
                              "settings).")
    report_to: str = report_to_field()
    push_to_hub: str | None = push_to_hub_field()
    private: bool = private_field()
    dry_run: bool = dry_run_field()


def check_train_args(args: TrainArgs) -> None:
    """The rules that the field bounds cannot say."""
    validate(args)
    if args.data is None:
        raise ConfigError("--data: missing; expected a data file, folder or hub dataset name")
    check_reporting(args)
