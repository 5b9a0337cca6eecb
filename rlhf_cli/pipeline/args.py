"""`rlhf pipeline` flags (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.config import opt

# What --from names: the round-1 stages in recipe order (stage3 is also accepted under its algorithm's folder name)
FROM_STAGES = ("sft", "reward", "stage3", "eval")
STAGE3_NAMES = ("ppo", "dpo", "best-of-n")  # --from may name stage 3 by its folder too


@dataclass
class PipelineArgs:
    recipe: str | None = opt(None, "Recipe YAML: the run folder, the model, and one section per stage (sft, reward, "
                                   "stage3, eval), each holding what that stage's --config file would.",
                             metavar="RECIPE")
    run: str | None = opt(None, "Run folder, instead of the recipe's `run:` (for example `make demo RUN=runs/x`).")
    from_stage: str | None = opt(None, "Redo this stage and everything after it, replacing what is there (default: "
                                       "run only what is missing or whose settings changed).", flag="--from",
                                 choices=FROM_STAGES + STAGE3_NAMES, metavar="STAGE")
