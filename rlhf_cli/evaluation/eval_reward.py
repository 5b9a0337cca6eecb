"""Measuring checkpoints.

`rlhf eval reward` scores every pair of a preference file with a reward model and reports pairwise accuracy
(the share of pairs where the chosen answer scores higher) and the mean margin (chosen minus rejected score).
Accuracy is also given per prompt length (`by_prompt_length`): the prompt's tokens as the RM reads them (its chat
template, up to where the answer starts), in fixed power-of-two buckets 0-63, 64-127, 128-255, ... 2048+, so the
same bucket means the same thing across checkpoints and data sets; empty buckets are left out.

Does the RM reward length rather than quality? Every scored answer (chosen and rejected) gives one point (its
length in tokens of the RM's tokenizer, the text of its assistant turns only; its score): `length_pearson` and
`length_spearman` (Pearson on average ranks, ties sharing their mean rank) are their correlations, None when either
side is constant. Accuracy is then split by which answer of the pair is shorter: `chosen_shorter_accuracy` over the
`chosen_shorter_pairs` pairs whose chosen answer has fewer tokens, `chosen_longer_accuracy` over those where it has
more (pairs of equal length are counted in `chosen_same_length_pairs`); an RM that learned "longer is better" is
right on the second and wrong on the first.

Calibration (`by_margin`): the pairs sorted by |chosen score - rejected score| and cut into MARGIN_BUCKETS groups
of (nearly) equal size, each with its margin range, pair count and accuracy (equal margins stay in one group, so
there may be fewer). A calibrated RM is right more often
where it is surer: accuracy should rise from the first bucket to the last.

When --model is a reward stage folder, the figures also go to its `eval_reward.json` (for `rlhf report`).

    rlhf eval reward --model runs/demo/reward --data examples/data/hh_prefs_test.jsonl --json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rlhf_cli.core import runtime
from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.generation import encode_chat
from rlhf_cli.core.models import LoadOptions
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel, encode_pairs, pair_metrics
from rlhf_cli.core.stages import EVAL_REWARD_FILE
from rlhf_cli.data import load_prefs
from rlhf_cli.evaluation.args import EvalRewardArgs

LENGTH_EDGES = (64, 128, 256, 512, 1024, 2048)
MARGIN_BUCKETS = 5


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


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's correlation; None with fewer than two points or when either side is constant."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on the ranks."""
    return pearson(ranks(xs), ranks(ys))


def accuracy_by_chosen_length(chosen_len: list[int], rejected_len: list[int],
                              correct: list[bool]) -> dict[str, Any]:
    """Pair counts and accuracy where the chosen answer is shorter / longer than the rejected one (the module doc);
    an accuracy is None when no pair falls in its group."""
    groups: dict[str, list[bool]] = {"shorter": [], "longer": [], "same_length": []}
    for c, r, ok in zip(chosen_len, rejected_len, correct, strict=True):
        groups["shorter" if c < r else "longer" if c > r else "same_length"].append(bool(ok))
    out: dict[str, Any] = {}
    for name in ("shorter", "longer"):
        g = groups[name]
        out |= {f"chosen_{name}_pairs": len(g), f"chosen_{name}_accuracy": sum(g) / len(g) if g else None}
    out["chosen_same_length_pairs"] = len(groups["same_length"])
    return out


def accuracy_by_margin(chosen: list[float], rejected: list[float], buckets: int = MARGIN_BUCKETS) -> list[dict]:
    """Calibration: pairs sorted by |chosen - rejected| and cut into `buckets` groups of (nearly) equal size,
    smallest margins first. Equal margins stay in one group (a cut moves past them), so there may be fewer groups,
    of less equal sizes, but their ranges never overlap; the counts add up to the number of pairs."""
    pairs = sorted(((abs(c - r), c > r) for c, r in zip(chosen, rejected, strict=True)), key=lambda p: p[0])
    n = len(pairs)
    cuts = [0]
    for b in range(1, min(buckets, n)):
        cut = max(b * n // min(buckets, n), cuts[-1])
        while 0 < cut < n and pairs[cut][0] == pairs[cut - 1][0]:
            cut += 1
        if cuts[-1] < cut < n:
            cuts.append(cut)
    cuts.append(n)
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        part = pairs[lo:hi]
        if part:
            out.append({"margin_from": part[0][0], "margin_to": part[-1][0], "pairs": len(part),
                        "accuracy": sum(ok for _, ok in part) / len(part)})
    return out


def answer_tokens(tok: Any, messages: list[dict]) -> int:
    """An answer's length: the tokens of its assistant turns' text, without the chat template's markers."""
    return sum(len(tok(str(m.get("content") or ""), add_special_tokens=False)["input_ids"]) for m in messages
               if m.get("role") == "assistant")


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
    correct = [c > r for c, r in zip(s.chosen, s.rejected, strict=True)]
    by_length = accuracy_by_length(lengths, correct)
    chosen_len = [answer_tokens(tok, r["chosen"]) for r in ds.rows]
    rejected_len = [answer_tokens(tok, r["rejected"]) for r in ds.rows]
    all_len, all_scores = [float(n) for n in chosen_len + rejected_len], s.chosen + s.rejected
    res = {"model": model_name, "data": args.data, "accuracy": s.accuracy, "mean_margin": s.mean_margin,
           "pairs": s.pairs, "prompts": ds.prompts, "mean_chosen_score": sum(s.chosen) / s.pairs,
           "mean_rejected_score": sum(s.rejected) / s.pairs, "truncated_sequences": truncated,
           "length_pearson": pearson(all_len, all_scores), "length_spearman": spearman(all_len, all_scores),
           "mean_chosen_length": sum(chosen_len) / s.pairs, "mean_rejected_length": sum(rejected_len) / s.pairs}
    res |= accuracy_by_chosen_length(chosen_len, rejected_len, correct)
    res |= {"by_prompt_length": by_length, "by_margin": accuracy_by_margin(s.chosen, s.rejected),
            "seconds": round(time.time() - t0, 2)}
    if spec.manifest is not None:  # a reward stage folder: `rlhf report` finds the figures there
        dest = Path(spec.manifest.path) / EVAL_REWARD_FILE
        atomic_write_text(dest, json.dumps(res, ensure_ascii=False, indent=1) + "\n")
        res["eval_file"] = str(dest)
    return res
