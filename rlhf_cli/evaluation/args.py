"""Flags of `rlhf eval reward`, `rlhf eval policy` and `rlhf report` (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import (
    SAMPLING_DEFAULTS,
    allow_pickle_field,
    max_samples_field,
    precision_field,
    repetition_penalty_field,
    temperature_field,
    threads_field,
    top_k_field,
    top_p_field,
    trust_remote_code_field,
)
from rlhf_cli.core.config import opt
from rlhf_cli.data.prefs import PREF_FORMATS

# Longest answer of `rlhf eval policy` when neither the flag nor the ppo stage says; the sampling settings follow
# the flags, else the ppo stage, else MODEL's generation_config.json, else SAMPLING_DEFAULTS.
POLICY_MAX_NEW_TOKENS = 64
PPO_FIRST = "the ppo stage's"


@dataclass
class EvalRewardArgs:
    model: str | None = opt(None, "Reward model: a reward stage folder (default: RUN/reward) or any model with "
                                  "a one-output sequence-classification head.")
    data: str | None = opt(None, "Preference data (any format `rlhf reward` reads).")
    run: str | None = opt(None, "Run folder: uses RUN/reward when --model is not given.")
    format: str = opt("auto", "Preference format; detected from the fields when auto.", choices=PREF_FORMATS)
    max_samples: int | None = max_samples_field("Use at most this many rows of --data.")
    max_length: int | None = opt(None, "Longest sequence in tokens (default: the reward stage's).")
    batch_size: int = opt(16, "Sequences scored per forward pass.", min=1)
    threads: int | None = threads_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class EvalPolicyArgs:
    model: str | None = opt(None, "Policy to measure: a ppo or best-of-n stage (default: the newest finished "
                                  "policy stage in RUN other than sft, such as RUN/ppo), any stage that generates, "
                                  "a model folder or a hub id.")
    baseline: str | None = opt(None, "Model to compare it with (default: RUN/sft).")
    reward: str | None = opt(None, "Reward model that judges both (default: RUN/reward).")
    judges: list[str] | None = opt(None, "Another reward model that judges both too (repeat the flag for more): "
                                         "win rate and mean scores under each, and a warning when a gain holds "
                                         "only under the RM the policy was trained on.", flag="--judge",
                                   metavar="RM")
    prompts: str | None = opt(None, "Prompts: a prompt file, or any SFT or preference file (its prompts are "
                                    "used).")
    run: str | None = opt(None, "Run folder: uses RUN/ppo (or the newest other policy stage), RUN/sft and "
                                "RUN/reward for what is not given.")
    save: str | None = opt(None, "JSONL file for the per-prompt results (both answers, scores, outcome, KL).")
    tie_margin: float = opt(0.0, "Scores closer than this (inclusive) are a tie; 0 = only equal scores.", min=0)
    temperature: float | None = temperature_field(SAMPLING_DEFAULTS, PPO_FIRST)
    top_p: float | None = top_p_field(SAMPLING_DEFAULTS, PPO_FIRST)
    top_k: int | None = top_k_field(SAMPLING_DEFAULTS, PPO_FIRST)
    repetition_penalty: float | None = repetition_penalty_field()
    max_new_tokens: int | None = opt(None, f"Longest answer in tokens (default: the ppo stage's, else "
                                           f"{POLICY_MAX_NEW_TOKENS}).", min=1)
    seed: int = opt(42, "Random seed: each batch of prompts is seeded from it, the same for both models.")
    baseline_seed: int | None = opt(None, "Another seed for BASE's answers, to draw them independently of "
                                          "MODEL's (default: --seed, the same random numbers for both).")
    cache: bool = opt(True, "Keep both models' answers (RLHF_CLI_CACHE/eval_answers, keyed by their files, the "
                            "prompts, sampling settings, seed, batch size and numerics) and reuse them: another "
                            "model measured against the same baseline the same way samples only its own answers; "
                            "the same model again (another --judge, say) samples none. The same answers either way.")
    batch_size: int = opt(8, "Prompts per generation and scoring batch.", min=1)
    max_samples: int | None = max_samples_field()
    precision: str = precision_field()
    threads: int | None = threads_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class ReportArgs:
    run: str | None = opt(None, "Run folder holding stage folders (sft, reward, ppo, ...), or a single stage "
                                "folder.")
    out: str | None = opt(None, "Report file: .html (self-contained, plots embedded) or .md (plots beside it) "
                                "(default: RUN/report.html).", metavar="FILE")
    title: str | None = opt(None, "Title of the report (default: rlhf report: RUN).")
