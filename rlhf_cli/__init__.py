"""rlhf-cli: the InstructGPT recipe (SFT, reward model, PPO) on Hugging Face TRL.

Library API (the CLI is a thin layer over it)::

    from rlhf_cli import SFTArgs, run_sft, RewardArgs, run_reward
    sft_dir = run_sft(SFTArgs(data="examples/data/sft_messages.jsonl", out="runs/x/sft", max_steps=10))
    rm_dir = run_reward(RewardArgs(model=str(sft_dir), data="examples/data/prefs_ranked.jsonl", out="runs/x/reward"))
"""

from rlhf_cli.core.errors import CheckpointError, ConfigError, DataError, RLHFError
from rlhf_cli.evaluation.eval_policy import EvalPolicyArgs, eval_policy
from rlhf_cli.evaluation.eval_reward import EvalRewardArgs, eval_reward
from rlhf_cli.evaluation.report import ReportArgs, make_report
from rlhf_cli.interact.chat import ChatArgs, ChatSession
from rlhf_cli.interact.generate import GenerateArgs, run_generate
from rlhf_cli.stages.ppo.trainer import PPOArgs, run_ppo
from rlhf_cli.stages.reward.train import RewardArgs, run_reward
from rlhf_cli.stages.sft.train import SFTArgs, run_sft

__version__ = "0.1.0"
__all__ = ["SFTArgs", "run_sft", "RewardArgs", "run_reward", "EvalRewardArgs", "eval_reward",
           "GenerateArgs", "run_generate", "ChatArgs", "ChatSession", "PPOArgs", "run_ppo",
           "EvalPolicyArgs", "eval_policy", "ReportArgs", "make_report",
           "RLHFError", "ConfigError", "DataError", "CheckpointError"]
