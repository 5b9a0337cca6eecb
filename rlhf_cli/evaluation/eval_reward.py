"""Measuring checkpoints.

`rlhf eval reward` scores every pair of a preference file with a reward model and reports pairwise accuracy
(the share of pairs where the chosen answer scores higher) and the mean margin (chosen minus rejected score).
Accuracy is also given per prompt length (`by_prompt_length`): the prompt's tokens as the RM reads them (its chat
template, up to where the answer starts), in fixed power-of-two buckets 0-63, 64-127, 128-255, ... 2048+, so the
same bucket means the same thing across checkpoints and data sets; empty buckets are left out.

    rlhf eval reward --model runs/demo/reward --data ../shared/data/prefs/test.jsonl --json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.config import check_choices, opt
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.manifest import STAGE_COMMANDS, a_stage, manifest_if_stage, require_stage
from rlhf_cli.core.models import configure_threads, load_tokenizer, pick_precision, resolve_model, torch_dtype
from rlhf_cli.core.progress import Reporter
from rlhf_cli.data.io import PREF_FORMATS, load_prefs


@dataclass
class EvalRewardArgs:
    model: str | None = opt(None, "Reward model: a reward stage folder (default: RUN/reward) or any model with "
                                  "a one-output sequence-classification head.")
    data: str | None = opt(None, "Preference data (any format `rlhf reward` reads).")
    run: str | None = opt(None, "Run folder: uses RUN/reward when --model is not given.")
    format: str = opt("auto", "Preference format; detected from the fields when auto.", choices=PREF_FORMATS)
    max_samples: int | None = opt(None, "Use at most this many rows of --data.")
    max_length: int | None = opt(None, "Longest sequence in tokens (default: the reward stage's).")
    batch_size: int = opt(16, "Sequences scored per forward pass.")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores this process may use).")


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


def resolve_reward_model(model: str | None, run: str | None, flag: str = "--model") -> tuple[str, Any]:
    if model is None:
        if run is None:
            raise ConfigError(f"{flag}: missing; pass {flag} RM_DIR or --run DIR (uses DIR/reward)")
        m = require_stage(Path(run) / "reward", "reward", "--run")
        return str(m.path), m
    m = manifest_if_stage(model)
    if m is not None and m.stage != "reward":
        raise CheckpointError(f"{flag} {model}: is {a_stage(m.stage)}, expected a reward stage, made by "
                              f"`{STAGE_COMMANDS['reward']}`")
    return model, m


def load_reward_model(path: Path, precision: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "num_labels", None) != 1 or not any("ForSequenceClassification" in a
                                                          for a in (cfg.architectures or [])):
        raise CheckpointError(f"{path}: not a reward model (expected a sequence classifier with one output, found "
                              f"{', '.join(cfg.architectures or ['?'])}); train one with "
                              f"`{STAGE_COMMANDS['reward']}`")
    tok = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(pick_precision(precision)))
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def eval_reward(args: EvalRewardArgs, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or Reporter()
    check_choices(args)
    if args.data is None:
        raise ConfigError("--data: missing; expected a preference file, folder or hub dataset name")
    model_name, manifest = resolve_reward_model(args.model, args.run)
    ds = load_prefs(args.data, args.format, args.max_samples)
    reporter.info(ds.describe())
    max_length = args.max_length or (manifest.args.get("max_length") if manifest else None) or 512
    path = resolve_model(model_name, say=reporter.info)

    from rlhf_cli.core.generation import encode_chat
    from rlhf_cli.core.training import quiet_libraries
    from rlhf_cli.stages.reward.train import encode_pairs, pair_metrics

    quiet_libraries()
    configure_threads(args.threads)
    t0 = time.time()
    model, tok = load_reward_model(path)
    rows, truncated = encode_pairs(ds, tok, max_length)
    s = pair_metrics(model, rows, tok.pad_token_id, args.batch_size)
    lengths = [len(encode_chat(tok, r["prompt"])) for r in ds.rows]
    by_length = accuracy_by_length(lengths, [c > r for c, r in zip(s.chosen, s.rejected, strict=True)])
    return {"model": model_name, "data": args.data, "accuracy": s.accuracy, "mean_margin": s.mean_margin,
            "pairs": s.pairs, "prompts": ds.prompts, "mean_chosen_score": sum(s.chosen) / s.pairs,
            "mean_rejected_score": sum(s.rejected) / s.pairs, "truncated_sequences": truncated,
            "by_prompt_length": by_length, "seconds": round(time.time() - t0, 2)}
