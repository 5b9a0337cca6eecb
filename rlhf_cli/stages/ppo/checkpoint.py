"""PPO's run folder: checkpoints for `--resume`, the logs, and the finished stage.

A checkpoint is the weights (policy on top, value model in `value/`; adapters only with LoRA), then
`state/trainer.pt` (optimiser, scheduler, KL controller, reward statistics, RNG states) and last
`state/state.json`: a checkpoint without state.json is incomplete and never resumed from.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_cli.core import launch
from rlhf_cli.core.config import to_dict
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.files import append_jsonl, atomic_write_text
from rlhf_cli.core.manifest import ResumableOutput, write_manifest
from rlhf_cli.stages.ppo.args import RESUME_KEYS, PPOArgs
from rlhf_cli.stages.ppo.preflight import Plan


class Stopped(Exception):
    """--stop-after reached: leave OUT.partial with its checkpoint, as an interruption would."""


class PPOOutput(ResumableOutput):
    """The PPO stage's output: OUT.partial survives into --resume; our PPO's checkpoint summary is in it."""

    @property
    def checkpoint(self) -> Path:
        return self.partial / "state" / "state.json"


@functools.lru_cache(maxsize=2)
def prompt_order(seed: int, n: int, epoch: int) -> list[int]:
    """The prompts' order in one pass: a function of (seed, pass) alone, so a resumed run needs no state for it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def rollout_seed(seed: int, update: int, rank: int) -> int:
    """The torch seed of one update on one process (sampling, minibatch order): a function of (seed, update,
    rank) alone, so each process samples its own responses, and a resumed run (with the same number of
    processes) draws what the uninterrupted one would have without any saved RNG state."""
    return (seed * 1_000_003 + update) * 8191 + rank


def lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor per update: warm-up, then linear or cosine decay, or constant."""
    def f(u: int) -> float:
        if u < warmup:
            return (u + 1) / (warmup + 1)
        frac = min(1.0, (u - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0
    return f


def jsonl_append(path: Path, row: dict) -> None:
    """One row of a log; under several processes (grpo/rloo) rank 0 writes."""
    if launch.is_main():
        append_jsonl(path, row)


def jsonl_keep(path: Path, upto: int) -> list[dict]:
    """Lines of a log with step <= upto (a resumed run drops what came after its checkpoint)."""
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if r.get("step", 0) <= upto]
    if launch.is_main():
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def save_tokenizer(tok: PreTrainedTokenizerBase, dest: Path) -> None:
    side = tok.padding_side
    tok.padding_side = "right"  # the folder is a normal model folder; generation code sets its own side
    tok.save_pretrained(dest)
    tok.padding_side = side


def save_checkpoint(dest: Path, policy: PreTrainedModel, value: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    a: PPOArgs, state: dict) -> None:
    """Weights, then state.json last: a checkpoint cut short by a crash is never taken for a complete one."""
    sdir = dest / "state"
    sdir.mkdir(exist_ok=True)
    (sdir / "state.json").unlink(missing_ok=True)
    if a.lora:
        policy.save_pretrained(dest / "adapter")
        save_tokenizer(tok, dest / "adapter")
        value.save_pretrained(dest / "value" / "adapter")
    else:
        policy.save_pretrained(dest, safe_serialization=True)
        save_tokenizer(tok, dest)
        value.save_pretrained(dest / "value", safe_serialization=True)
        save_tokenizer(tok, dest / "value")
    torch.save({k: v for k, v in state.items() if k != "summary"}, sdir / "trainer.pt")
    atomic_write_text(sdir / "state.json", json.dumps(state["summary"], indent=2, default=str) + "\n")


def check_resume(a: PPOArgs, summary: dict, where: Path, processes: int = 1) -> None:
    for k in RESUME_KEYS:
        then, now = summary["args"].get(k), getattr(a, k)
        if then != now:
            raise ConfigError(f"--resume: the checkpoint in {where} was made with --{k.replace('_', '-')} {then}, "
                              f"not {now}; resume with the same settings, or start afresh without --resume")
    then = summary.get("processes", 1)
    if then != processes:  # --batch-size is per process: another count changes every update's prompts
        raise ConfigError(f"--resume: the checkpoint in {where} was made by {then} process{'es' if then != 1 else ''}"
                          f", not {processes}; resume with --num-processes {then}, or start afresh without --resume")


def write_ppo_manifest(dest: Path, a: PPOArgs, plan: Plan, metrics: dict, started: float,
                       **resolved: Any) -> None:
    """The stage's manifest, written last: parents = the policy and RM, args with what was resolved from them."""
    data = {"prompts": plan.prompts.summary() | {"too_long": plan.too_long, "used": len(plan.prompt_ids)}}
    write_manifest(dest, stage="ppo", parents=[plan.policy, plan.reward],
                   args=to_dict(a) | {"resolved_policy": str(plan.policy_path),
                                      "resolved_reward": str(plan.reward_path), **resolved},
                   data=data, metrics=metrics, started=started)


def finish_lora(dest: Path, policy: PreTrainedModel, value: PreTrainedModel, tok: PreTrainedTokenizerBase,
                a: PPOArgs) -> None:
    """The final LoRA checkpoint as a normal folder: merged weights on top (adapter kept in OUT/adapter)."""
    if a.lora_merge:
        policy.merge_and_unload().save_pretrained(dest, safe_serialization=True)
    else:
        policy.save_pretrained(dest)
    save_tokenizer(tok, dest)
    value.merge_and_unload().save_pretrained(dest / "value", safe_serialization=True)
    save_tokenizer(tok, dest / "value")
