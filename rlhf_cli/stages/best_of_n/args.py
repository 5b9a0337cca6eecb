"""`rlhf best-of-n` flags (torch-free, so `--help` is instant).

Three groups: what to sample from and where to write (as `rlhf ppo`), how to sample and select (the sampling flags
and fallbacks of `rlhf generate`), and how to fine-tune on the selected answers (the optimisation flags of
`rlhf sft`, passed to it unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import (
    accelerate_config_field,
    allow_pickle_field,
    check_reporting,
    check_vllm_layout,
    dry_run_field,
    freeze_layers_field,
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
    micro_batch_field,
    num_processes_field,
    overwrite_field,
    precision_field,
    private_field,
    push_to_hub_field,
    repetition_penalty_field,
    report_to_field,
    save_every_field,
    temperature_field,
    threads_field,
    top_k_field,
    top_p_field,
    trust_remote_code_field,
    use_vllm_field,
    vllm_memory_field,
    warmup_field,
    weight_decay_field,
)
from rlhf_cli.core.config import opt, validate
from rlhf_cli.core.errors import ConfigError

# The K answers must differ for the best of them to be better than any one: `rlhf generate`'s hotter fallbacks
# (temperature 0.7, top-p 0.9), used when neither a flag nor the policy's generation_config.json says.
from rlhf_cli.interact.args import GENERATE_SAMPLING

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class BestOfNArgs:
    policy: str | None = opt(None, "Policy to sample from and fine-tune: an sft stage (default: RUN/sft) or any "
                                   "causal LM folder or hub id.")
    reward: str | None = opt(None, "Reward model that picks the best answer: a reward stage (default: "
                                   "RUN/reward) or a folder with a one-output sequence classifier.")
    prompts: str | None = opt(None, "Prompts to sample on: a prompts file, any SFT or preference file (their "
                                    "prompts), a folder of them, or a hub dataset.")
    out: str | None = opt(None, "Output folder (default: RUN/best-of-n when --run is given).")
    run: str | None = opt(None, "Run folder: reads RUN/sft and RUN/reward, writes RUN/best-of-n.")
    overwrite: bool = overwrite_field()
    resume: bool = opt(False, "Continue the unfinished run in OUT.partial: the prompts not yet sampled and scored, "
                              "then the fine-tune from its last checkpoint (same settings).")
    k: int = opt(4, "Answers sampled per prompt (K); the best of them is kept.", flag="--num-samples", short="-k",
                 min=1)
    max_samples: int | None = max_samples_field()
    min_score: float | None = opt(None, "Keep a prompt only when its best answer scores at least this (default: "
                                        "keep every prompt).")
    min_margin: float | None = opt(None, "Keep a prompt only when its best score beats the mean of its K scores "
                                         "by at least this (default: keep every prompt).", min=0)
    missing_eos_penalty: float | None = opt(None, "Subtract this from the reward model's score of an answer "
                                                  "that did not finish (no end-of-sequence token within "
                                                  "--max-new-tokens) when choosing the best and the worst answers "
                                                  "(and for --min-score/--min-margin): a cut-off answer is not "
                                                  "preferred for running on. samples.jsonl keeps the RM's scores.",
                                            min=0)
    temperature: float | None = temperature_field(GENERATE_SAMPLING)
    top_p: float | None = top_p_field(GENERATE_SAMPLING)
    top_k: int | None = top_k_field(GENERATE_SAMPLING)
    repetition_penalty: float | None = repetition_penalty_field(GENERATE_SAMPLING)
    max_new_tokens: int = opt(DEFAULT_MAX_NEW_TOKENS, "Longest answer, in tokens.", min=1)
    sample_batch_size: int = opt(8, "Prompts per sampling batch (each with K answers).", min=1)
    use_vllm: bool = use_vllm_field("Sample the K answers with a vLLM engine on the GPU (needs `pip install "
                                    "vllm`), freed before the fine-tune; its draws differ from transformers' for "
                                    "the same --seed.")
    vllm_gpu_memory_utilization: float = vllm_memory_field()
    seed: int = opt(42, "Random seed: each sampling batch is seeded from it and its index (the same answers as "
                        "`rlhf generate` with this seed and batch size), and the fine-tune's data order.")
    objective: str = opt("sft", "What the policy learns from the scored answers: sft = fine-tune on each kept "
                                "prompt's best answer (rejection sampling); dpo = DPO on each kept prompt's best "
                                "answer against its worst (the reward model ranks the policy's own answers: online "
                                "DPO), which also pushes away from what the RM dislikes.", choices=("sft", "dpo"))
    beta: float = opt(0.1, "--objective dpo: DPO's beta, the pull towards the starting policy (the reference).",
                      above=0)
    pairs: str = opt("best-worst", "--objective dpo: which pairs of each kept prompt's K answers DPO learns from: "
                                   "best-worst = its best answer against its worst (one pair per prompt); all = "
                                   "every two answers whose scores differ, the higher-scored one chosen (up to "
                                   "K(K-1)/2 pairs per prompt, as a reward model learns from every pair of a "
                                   "ranking).", choices=("best-worst", "all"))
    min_pair_gap: float | None = opt(None, "--objective dpo: train on a pair only when its chosen answer scores at "
                                           "least this much above its rejected one (the scores that choose, less "
                                           "--missing-eos-penalty): pairs the RM barely tells apart are mostly "
                                           "noise (default: every pair).", min=0)
    # The fine-tune: `rlhf sft` on the kept (prompt, best answer) pairs (or `rlhf dpo` on the kept (best, worst)
    # pairs), with these settings.
    epochs: float = opt(1.0, "Fine-tune: passes over the kept pairs.", above=0)
    max_steps: int | None = opt(None, "Fine-tune: stop after this many optimiser steps (overrides --epochs).",
                                min=1)
    lr: float | None = lr_field("Fine-tune: peak learning rate (default: rlhf sft's, 2e-05, 2e-4 with --lora; with "
                                "--objective dpo, rlhf dpo's, 5e-06, 5e-05 with --lora).")
    lr_scheduler: str = opt("cosine", "Fine-tune: learning-rate schedule.",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_ratio: float = warmup_field(0.05, "steps", "Fine-tune: fraction of steps spent warming up.")
    batch_size: int = opt(8, "Fine-tune: kept pairs per optimiser step (per device).", min=1)
    grad_accum: int = opt(1, "Fine-tune: steps whose gradients are summed before each optimiser step.", min=1)
    max_length: int | None = max_length_field("Fine-tune: longest prompt + answer in tokens (default: the policy "
                                              "stage's, else rlhf sft's).")
    weight_decay: float = weight_decay_field()
    assistant_only_loss: bool = opt(True, "Fine-tune only on the answers' tokens (the prompt is context).")
    lora: bool = lora_field()
    lora_r: int = lora_r_field()
    lora_alpha: int = lora_alpha_field()
    lora_dropout: float = lora_dropout_field()
    lora_targets: str = lora_targets_field()
    lora_merge: bool = lora_merge_field()
    freeze_layers: int = freeze_layers_field("Fine-tune: freeze the embeddings and the lowest N transformer "
                                             "layers (much faster on CPU).")
    gradient_checkpointing: bool = opt(False, "Fine-tune: recompute activations to save memory (turned on by "
                                              "the memory planner when nothing fits without it).")
    max_memory: str | None = max_memory_field()
    micro_batch_size: int | None = micro_batch_field()
    save_every: int | None = save_every_field()
    logging_steps: int = opt(1, "Fine-tune: log metrics every N optimiser steps.", min=1)
    precision: str = precision_field()
    threads: int | None = threads_field()
    num_processes: int | None = num_processes_field()
    accelerate_config: str | None = accelerate_config_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()
    report_to: str = report_to_field()
    push_to_hub: str | None = push_to_hub_field()
    private: bool = private_field()
    dry_run: bool = dry_run_field()

    def check_launch(self) -> None:
        """Said before `accelerate launch` starts the processes."""
        from rlhf_cli.core import launch

        check_vllm_layout(self.use_vllm, launch.processes(self), what="rlhf best-of-n")


def check_best_of_n_args(args: BestOfNArgs) -> None:
    """Choices and bounds of every field, then the rules between fields."""
    validate(args)
    args.check_launch()
    if args.prompts is None:
        raise ConfigError("--prompts: missing; expected a prompts file (any format `rlhf sft` or `rlhf reward` "
                          "reads), a folder or a hub dataset")
    if args.objective == "dpo" and args.k < 2:
        raise ConfigError("--objective dpo: needs at least 2 answers per prompt (a best and a worst); use -k 2 or more")
    if args.objective != "dpo" and (args.pairs != "best-worst" or args.min_pair_gap is not None):
        flag = "--pairs" if args.pairs != "best-worst" else "--min-pair-gap"
        raise ConfigError(f"{flag}: chooses the preference pairs of --objective dpo, but the objective is "
                          f"{args.objective} (fine-tuning on each prompt's best answer); add --objective dpo or "
                          f"leave {flag} out")
    if args.temperature == 0 and args.k > 1:
        raise ConfigError(f"--temperature 0 is greedy decoding: all {args.k} answers would be the same; use a "
                          f"temperature above 0 (such as 0.7)")
    check_reporting(args)
