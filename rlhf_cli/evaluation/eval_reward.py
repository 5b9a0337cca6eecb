"""Measuring checkpoints.

`rlhf eval reward` scores every pair of a preference file with a reward model and reports pairwise accuracy
(the share of pairs where the chosen answer scores higher) and the mean margin (chosen minus rejected score).
Accuracy is also given per prompt length (`by_prompt_length`): the prompt's tokens as the RM reads them (its chat
template, up to where the answer starts), in fixed power-of-two buckets 0-63, 64-127, 128-255, ... 2048+, so the
same bucket means the same thing across checkpoints and data sets; empty buckets are left out.

    rlhf eval reward --model runs/demo/reward --data examples/data/hh_prefs_test.jsonl --json
"""

from __future__ import annotations

import time
from typing import Any

from rlhf_cli.core import runtime
from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.generation import encode_chat
from rlhf_cli.core.models import LoadOptions
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel, encode_pairs, pair_metrics
from rlhf_cli.data import load_prefs
from rlhf_cli.evaluation.args import EvalRewardArgs

LENGTH_EDGES = (64, 128, 256, 512, 1024, 2048)


def length_bucket(n: int) -> str:
    lo = 0
    for hi in LENGTH_EDGES:
        if n < hi:
            return f"{lo}-{hi - 1}"
        lo = hi
    return f"{lo}+"


def accuracy_by_length(lengths: list[int], correct: list[bool]) -> list[dict[str, Any]]:
    """Pairwise accuracy per prompt-length bucket, shortest first; empty buckets are left out."""
    counts: dict[str, list[int]] = {}
    for n, ok in zip(lengths, correct, strict=True):
        c = counts.setdefault(length_bucket(n), [0, 0])
        c[0] += 1
        c[1] += bool(ok)
    order = [length_bucket(e - 1) for e in LENGTH_EDGES] + [length_bucket(LENGTH_EDGES[-1])]
    return [{"bucket": b, "pairs": counts[b][0], "accuracy": counts[b][1] / counts[b][0]}
            for b in order if b in counts]


def eval_reward(args: EvalRewardArgs, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or Reporter()
    validate(args)
    if args.data is None:
        raise ConfigError("--data: missing; expected a preference file, folder or hub dataset name")
    spec = RewardModel.locate(args.model, args.run, "--model", reporter.info, LoadOptions.of(args))
    ds = load_prefs(args.data, args.format, args.max_samples)
    reporter.info(ds.describe())
    max_length = args.max_length or spec.max_length or 512

    runtime.quiet_libraries()
    runtime.configure_threads(args.threads)
    t0 = time.time()
    rm = RewardModel.load(spec)
    model_name, tok = rm.name, rm.tok
    rows, truncated = encode_pairs(ds, tok, max_length)
    s = pair_metrics(rm.model, rows, tok.pad_token_id, args.batch_size)
    lengths = [len(encode_chat(tok, r["prompt"])) for r in ds.rows]
    by_length = accuracy_by_length(lengths, [c > r for c, r in zip(s.chosen, s.rejected, strict=True)])
    return {"model": model_name, "data": args.data, "accuracy": s.accuracy, "mean_margin": s.mean_margin,
            "pairs": s.pairs, "prompts": ds.prompts, "mean_chosen_score": sum(s.chosen) / s.pairs,
            "mean_rejected_score": sum(s.rejected) / s.pairs, "truncated_sequences": truncated,
            "by_prompt_length": by_length, "seconds": round(time.time() - t0, 2)}
