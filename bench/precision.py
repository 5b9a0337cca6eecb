"""bf16 autocast against fp32 on this CPU, measured side by side in one run: the probe's matmul speed ratio (what
`--precision auto` decides from), then the step time of an SFT step, a reward-model step and a PPO update
minibatch of the default model in each precision (fp32 master weights and AdamW state in both; bf16 computes
under CPU autocast, as the stages do), with the loss difference between the two from the same start.

    .venv/bin/python bench/precision.py [-n 1] [--seq 32] [--batch 1] [--threads N]

Ratios are fp32 step time / bf16 step time: above 1, bf16 is faster. Short settings: on a CPU that emulates
bf16 (AVX2 only) a bf16 step is many times slower, and the whole run still takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_steps import default_models, interleaved, ppo_run, reward_run, sft_run, token_batch  # noqa: E402

from rlhf_cli.core import precision, runtime  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=1, help="timed steps per precision, after one warm-up step each")
p.add_argument("--seq", type=int, default=32, help="tokens per sequence (PPO: half prompt, half response)")
p.add_argument("--batch", type=int, default=1, help="sequences (sft), pairs (reward); PPO takes twice as many")
p.add_argument("--threads", type=int, default=None)
a = p.parse_args()

threads = runtime.configure_threads(a.threads)
cpu, flags = precision.cpu_info()
probe = precision.probe(threads, refresh=True)
print(f"CPU: {cpu}; flags: {', '.join(flags) or 'none'}; {threads} threads; torch {torch.__version__}; "
      f"{os.cpu_count()} cores")
print(f"probe matmul (linear, {probe.size}x{probe.size}): fp32 {probe.fp32_flops / 1e9:.1f} GFLOP/s, "
      f"bf16 {probe.bf16_flops / 1e9:.2f} "
      f"GFLOP/s, bf16/fp32 {probe.ratio:.3f} -> --precision auto picks {precision.cpu_choice(probe)}", flush=True)

lm, classifier = default_models()
batch = token_batch(a.batch, a.seq)
chosen, rejected = token_batch(a.batch, a.seq, offset=3), token_batch(a.batch, a.seq, offset=5)
ppo_seq = token_batch(2 * a.batch, a.seq, offset=1)
stages = {
    "sft step": lambda prec: sft_run(lm, prec, batch),
    "reward step": lambda prec: reward_run(classifier, prec, chosen, rejected),
    "ppo update minibatch": lambda prec: ppo_run(lm, classifier, prec, ppo_seq, a.seq // 2),
}
for name, make in stages.items():
    full, mixed = make("fp32"), make("bf16")
    interleaved([full, mixed], a.n)
    # the first loss is the same weights computed in each precision; the later ones also carry the updates
    first = abs(full.losses[0] - mixed.losses[0])
    later = max(abs(x - y) for x, y in zip(full.losses[1:], mixed.losses[1:], strict=True))
    print(f"{name}: fp32 median {full.median:.2f}s, bf16 autocast median {mixed.median:.2f}s, "
          f"fp32/bf16 {full.median / mixed.median:.3f} (n={a.n}); loss fp32 "
          f"{' '.join(f'{x:.4f}' for x in full.losses)} vs bf16 {' '.join(f'{x:.4f}' for x in mixed.losses)}: "
          f"|difference| {first:.4f} from the same weights ({first / max(abs(full.losses[0]), 1e-9):.2%}), "
          f"{later:.4f} after the updates", flush=True)
    del full, mixed
