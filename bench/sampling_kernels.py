"""Sampling with the linear layers packed for oneDNN (`rlhf_cli.core.linear_kernels`) against torch's own linear,
measured side by side in one run: the probe that decides, then whole batched `generate` calls of the default model
(or --model) as PPO's rollouts and `rlhf eval policy` make them (`LM.sample_ids`), each way in turn, and whether
both drew the same tokens from the same seed.

    .venv/bin/python bench/sampling_kernels.py [-n 3] [--model runs/demo/sft] [--batch 8] [--new-tokens 32]

Prompts: the first --batch of examples/data/hh_prompts_train.jsonl of at most --max-prompt-tokens rendered tokens
(PPO's benchmark uses the same rule). Ratios are torch's time / packed time: above 1, packing is faster.
`LM.sample_ids` keeps the packed weights between calls (its model only samples), so the warm-up call pays the
packing and the timed ones do not; `rlhf ppo` packs again at every rollout (about 0.3 s for 135M weights here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from rlhf_cli.core import linear_kernels, runtime  # noqa: E402
from rlhf_cli.core.generation import Sampling, load_lm  # noqa: E402
from rlhf_cli.core.models import DEFAULT_MODEL  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=3, help="timed calls each way, after one warm-up call each")
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--batch", type=int, default=8, help="prompts per generate call (one answer each)")
p.add_argument("--new-tokens", type=int, default=32)
p.add_argument("--max-prompt-tokens", type=int, default=128, help="0: no limit")
p.add_argument("--threads", type=int, default=None)
a = p.parse_args()

threads = runtime.configure_threads(a.threads)
found = linear_kernels.probe(refresh=True)
if found is None:
    sys.exit("this torch has no oneDNN packed linear: nothing to compare")
print(f"probe ({linear_kernels.ROWS} rows x {linear_kernels.IN_FEATURES} -> {linear_kernels.OUT_FEATURES}, "
      f"{threads} threads): torch linear {found.default_flops / 1e9:.1f} GFLOP/s, packed oneDNN "
      f"{found.packed_flops / 1e9:.1f} GFLOP/s, ratio {found.ratio:.2f} -> sampling packs: "
      f"{found.ratio >= linear_kernels.MIN_RATIO}", flush=True)

lm = load_lm(a.model)
prompts = []
for line in (ROOT / "examples" / "data" / "hh_prompts_train.jsonl").read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    ids = lm.encode(messages)
    if not a.max_prompt_tokens or len(ids) <= a.max_prompt_tokens:
        prompts.append(ids)
    if len(prompts) == a.batch:
        break
lengths = [len(x) for x in prompts]
print(f"model {a.model}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens (padded to {max(lengths)}), "
      f"{a.new_tokens} new tokens, temperature 0.7", flush=True)
sampling = Sampling(max_new_tokens=a.new_tokens, temperature=0.7)


def timed(env: str) -> tuple[float, list[list[int]]]:
    os.environ[linear_kernels.ENV] = env
    torch.manual_seed(0)
    t = time.perf_counter()
    out = lm.sample_ids(prompts, 1, sampling)
    return time.perf_counter() - t, out


times: dict[str, list[float]] = {"0": [], "1": []}
same = []
for i in range(a.n + 1):
    d0, out0 = timed("0")
    d1, out1 = timed("1")
    same.append(out0 == out1)
    if i:  # the first pair is the warm-up
        times["0"].append(d0)
        times["1"].append(d1)
ratios = [x / y for x, y in zip(times["0"], times["1"], strict=True)]
t0, t1 = statistics.median(times["0"]), statistics.median(times["1"])
print(f"generate, torch linear: {t0:.2f} s (median of {a.n}); packed oneDNN: {t1:.2f} s")
print(f"ratio torch / packed: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
      f"same tokens in {sum(same)} of {len(same)} pairs")
