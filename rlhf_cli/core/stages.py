"""The stage registry: every kind of stage folder the toolkit writes, in recipe order.

Parent checks, "wrong or missing stage" messages and `rlhf report` read this table, so a new stage (DPO,
best-of-n, ...) is added here once: its name (the manifest's `stage`), the kind of checkpoint it holds (a policy
that writes answers, or a reward model that scores them), and the command that makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICY = "policy"  # a causal LM: can start sft, reward, ppo, and answer in chat
REWARD = "reward"  # a one-output sequence classifier


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # POLICY or REWARD
    command: str  # how to make one, quoted in error messages


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", POLICY, "rlhf sft --model MODEL --data DEMOS --out DIR"),
    Stage("reward", REWARD, "rlhf reward --model SFT_DIR --data PREFS --out DIR"),
    Stage("ppo", POLICY, "rlhf ppo --policy SFT_DIR --reward RM_DIR --prompts PROMPTS --out DIR"),
    Stage("dpo", POLICY, "rlhf dpo --model SFT_DIR --data PREFS --out DIR"),
    Stage("best-of-n", POLICY, "rlhf best-of-n --policy SFT_DIR --reward RM_DIR --prompts PROMPTS --out DIR"),
)}
ORDER = tuple(STAGES)  # recipe order, for reports; stages not listed come after, by start time
POLICY_STAGES = tuple(name for name, s in STAGES.items() if s.kind == POLICY)

EVAL_FILE = "eval_policy.json"  # `rlhf eval policy` writes it into a policy stage folder; `rlhf report` reads it
EVAL_REWARD_FILE = "eval_reward.json"  # `rlhf eval reward` writes it into a reward stage folder; `rlhf report` too


def command_for(stage: str) -> str:
    """The command that makes a stage, for error messages."""
    s = STAGES.get(stage)
    return s.command if s else f"rlhf {stage}"


def is_policy(stage: str) -> bool:
    return stage in POLICY_STAGES


def a_stage(stage: str) -> str:
    """'an sft stage', 'a reward stage'."""
    return f"{'an' if stage[:1] in 'aeiou' or stage in ('sft', 'rm') else 'a'} {stage} stage"
