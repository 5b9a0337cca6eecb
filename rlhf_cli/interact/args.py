"""Flags of `rlhf chat`, `rlhf generate` and `rlhf label` (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import (
    DEFAULT_MODEL,
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

# When neither a flag nor the model's generation_config.json says: `rlhf generate` samples K answers to rank, which
# must differ from one another, so it samples hotter than the chat (at 0.2, SmolLM2-135M-Instruct repeated an answer
# for a quarter of the example prompts at -k 4); at 1.0 a small model's answers lose the thread.
GENERATE_SAMPLING = SAMPLING_DEFAULTS | {"temperature": 0.7}


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
    temperature: float | None = temperature_field()
    top_p: float | None = top_p_field()
    top_k: int | None = top_k_field()
    repetition_penalty: float | None = repetition_penalty_field()
    max_new_tokens: int = opt(256, "Longest answer, in tokens.", min=1)
    seed: int | None = opt(None, "Random seed, for repeatable answers.")
    precision: str = precision_field()
    threads: int | None = threads_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class GenerateArgs:
    model: str = opt(DEFAULT_MODEL, "Model to sample from: a stage folder (sft, ppo), a model folder or a hub id.")
    prompts: str | None = opt(None, "Prompts: a prompt file, or any SFT or preference file (its prompts are used).")
    out: str | None = opt(None, "JSONL file to write, one line per prompt; an existing file is resumed.",
                          metavar="FILE")
    num_samples: int = opt(4, "Answers sampled per prompt (K).", short="-k", min=1)
    temperature: float | None = temperature_field(GENERATE_SAMPLING)
    top_p: float | None = top_p_field(GENERATE_SAMPLING)
    top_k: int | None = top_k_field(GENERATE_SAMPLING)
    repetition_penalty: float | None = repetition_penalty_field(GENERATE_SAMPLING)
    max_new_tokens: int = opt(256, "Longest answer, in tokens.", min=1)
    batch_size: int = opt(8, "Prompts per generation batch (each with K answers).", min=1)
    seed: int = opt(42, "Random seed: the same seed, model, prompts and batch size write the same file.")
    max_samples: int | None = max_samples_field()
    overwrite: bool = opt(False, "Start --out afresh instead of resuming it.")
    precision: str = precision_field()
    threads: int | None = threads_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()


LABEL_ORDERS = ("file", "random", "uncertain")


@dataclass
class LabelArgs:
    samples: str | None = opt(None, "Answers to rank: a file written by `rlhf generate` (a prompt and its K "
                                    "responses per line).")
    out: str | None = opt(None, "Rankings file (JSONL) every ranking is appended to the moment it is made; an "
                                "existing file is resumed.", metavar="FILE")
    annotator: str | None = opt(None, "Your name, stored with each ranking (several people may rank into one "
                                      "file) [default: the OS user name].")
    order: str = opt("file", "Order to show items in: file order, random (seeded by --seed), or uncertain (the "
                             "items whose answers --reward separates least first).", choices=LABEL_ORDERS)
    seed: int = opt(0, "Seed of --order random: the same seed shows the same order (and resumes in it).")
    reward: str | None = opt(None, "Reward model (a reward stage folder) for --order uncertain.")
    web: bool = opt(False, "Rank in a browser: serve a local page on --host/--port instead of the terminal.")
    host: str = opt("127.0.0.1", "With --web: the address to listen on (127.0.0.1: this machine only).")
    port: int = opt(0, "With --web: the port (0 picks a free one); the page's address is printed.", min=0,
                    max=65535)
    batch_size: int = opt(16, "With --order uncertain: answers scored per reward model batch.", min=1)
    precision: str = precision_field()
    threads: int | None = threads_field()
    allow_pickle: bool = allow_pickle_field()
    trust_remote_code: bool = trust_remote_code_field()
