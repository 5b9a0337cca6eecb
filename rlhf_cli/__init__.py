"""rlhf-cli: the InstructGPT recipe (SFT, reward model, PPO) on Hugging Face TRL.

Library API (the CLI is a thin layer over it)::

    from rlhf_cli import SFTArgs, run_sft, RewardArgs, run_reward
    sft_dir = run_sft(SFTArgs(data="examples/data/sft_messages.jsonl", out="runs/x/sft", max_steps=10))
    rm_dir = run_reward(RewardArgs(model=str(sft_dir), data="examples/data/prefs_ranked.jsonl", out="runs/x/reward"))

Names are imported on first use, so `import rlhf_cli` (and `rlhf --help`) loads no heavy library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "SFTArgs": "rlhf_cli.stages.sft.args", "run_sft": "rlhf_cli.stages.sft.train",
    "RewardArgs": "rlhf_cli.stages.reward.args", "run_reward": "rlhf_cli.stages.reward.train",
    "PPOArgs": "rlhf_cli.stages.ppo.args", "run_ppo": "rlhf_cli.stages.ppo.train",
    "DPOArgs": "rlhf_cli.stages.dpo.args", "run_dpo": "rlhf_cli.stages.dpo.train",
    "BestOfNArgs": "rlhf_cli.stages.best_of_n.args", "run_best_of_n": "rlhf_cli.stages.best_of_n.train",
    "EvalRewardArgs": "rlhf_cli.evaluation.args", "eval_reward": "rlhf_cli.evaluation.eval_reward",
    "EvalPolicyArgs": "rlhf_cli.evaluation.args", "eval_policy": "rlhf_cli.evaluation.eval_policy",
    "ReportArgs": "rlhf_cli.evaluation.args", "make_report": "rlhf_cli.evaluation.report",
    "GenerateArgs": "rlhf_cli.interact.args", "run_generate": "rlhf_cli.interact.generate",
    "ChatArgs": "rlhf_cli.interact.args", "ChatSession": "rlhf_cli.interact.chat",
    "LabelArgs": "rlhf_cli.interact.args", "LabelSession": "rlhf_cli.interact.label",
    "label_stats": "rlhf_cli.interact.label",
    "load_recipe": "rlhf_cli.pipeline.recipe", "run_pipeline": "rlhf_cli.pipeline.run",
    "RLHFError": "rlhf_cli.core.errors", "ConfigError": "rlhf_cli.core.errors", "DataError": "rlhf_cli.core.errors",
    "CheckpointError": "rlhf_cli.core.errors",
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'rlhf_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
