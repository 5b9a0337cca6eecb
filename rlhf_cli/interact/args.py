"""Flags of `rlhf chat` and `rlhf generate` (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import DEFAULT_MODEL, max_samples_field, precision_field, threads_field
from rlhf_cli.core.config import opt


@dataclass
class ChatArgs:
    model: str = opt(DEFAULT_MODEL, "Model to talk to: a stage folder (sft, ppo), a model folder or a hub id.")
    compare: list[str] | None = opt(None, "Another model that answers every turn too (repeat the flag for more); "
                                          "answers are shown side by side.")
    reward: str | None = opt(None, "Reward model (a reward stage folder): its score is shown under each answer.")
    save_preferences: str | None = opt(None, "With --compare: JSONL file that /prefer N appends a ranked "
                                             "preference row to (input for `rlhf reward`).")
    system: str | None = opt(None, "System prompt.")
    prompt: str | None = opt(None, "Answer this one message, print the answer on stdout and exit. Text piped on "
                                   "stdin works the same way (all of it is one message).")
    interactive: bool = opt(False, "Read turns and /commands line by line even when stdin is not a terminal.",
                            short="-i")
    temperature: float = opt(0.7, "Sampling temperature; 0 is greedy decoding.")
    top_p: float = opt(0.9, "Nucleus sampling: sample from the most likely tokens holding this much probability "
                            "(1 = off).")
    top_k: int = opt(0, "Sample from the K most likely tokens only (0 = off).")
    max_new_tokens: int = opt(256, "Longest answer, in tokens.")
    seed: int | None = opt(None, "Random seed, for repeatable answers.")
    precision: str = precision_field()
    threads: int | None = threads_field()


@dataclass
class GenerateArgs:
    model: str = opt(DEFAULT_MODEL, "Model to sample from: a stage folder (sft, ppo), a model folder or a hub id.")
    prompts: str | None = opt(None, "Prompts: a prompt file, or any SFT or preference file (its prompts are used).")
    out: str | None = opt(None, "JSONL file to write, one line per prompt; an existing file is resumed.",
                          metavar="FILE")
    num_samples: int = opt(4, "Answers sampled per prompt (K).", short="-k", min=1)
    temperature: float = opt(1.0, "Sampling temperature; 0 is greedy decoding (only with -k 1).")
    top_p: float = opt(1.0, "Nucleus sampling: sample from the most likely tokens holding this much probability "
                            "(1 = off).")
    top_k: int = opt(0, "Sample from the K most likely tokens only (0 = off).")
    max_new_tokens: int = opt(256, "Longest answer, in tokens.")
    batch_size: int = opt(8, "Prompts per generation batch (each with K answers).", min=1)
    seed: int = opt(42, "Random seed: the same seed, model, prompts and batch size write the same file.")
    max_samples: int | None = max_samples_field()
    overwrite: bool = opt(False, "Start --out afresh instead of resuming it.")
    precision: str = precision_field()
    threads: int | None = threads_field()
