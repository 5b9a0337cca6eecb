"""Model-FLOPs utilisation of SFT and reward-model training steps of the default model, in fp32 and under CPU bf16
autocast (fp32 master weights), against the matmul peak measured in the same run for each precision.

    .venv/bin/python bench/mfu.py [-n 1] [--seq 64] [--batch 1] [--threads N]

Model FLOPs of a step = non-padding tokens x (6N + 12 L T d): N are the parameters the tokens pass through
*excluding the input embedding* (a lookup): the transformer body, plus, for SFT, the output projection (SmolLM2
ties it to the embedding, and every token gets vocabulary logits), and for the reward model its one-output score
head; 12 L T d is attention's QK^T and AV (2 x 2 T d FLOPs per token and layer forward, x3 with backward) at
sequence length T. Gradient clipping, the optimiser and the casts count as time but not as FLOPs, as usual. The
peak is the best FLOP/s of square linear-layer matmuls (x @ W^T, the kernel the layers run; 256 to 1024, the
largest that takes under half a second per matmul) in the same dtype and thread count. No padding here: every
row is a full window of text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_steps import default_models, interleaved, reward_run, sft_run, token_batch  # noqa: E402

from rlhf_cli.core import precision, runtime  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=1, help="timed steps per precision, after one warm-up step each")
p.add_argument("--seq", type=int, default=64)
p.add_argument("--batch", type=int, default=1, help="sequences (sft) or pairs (reward) per step")
p.add_argument("--threads", type=int, default=None)
a = p.parse_args()

threads = runtime.configure_threads(a.threads)


def peak(dtype: str) -> tuple[float, int]:
    """The best FLOP/s of square matmuls in `dtype` over the sizes that take at most ~0.5 s each."""
    best, size = 0.0, 0
    for n in sorted(precision.SIZES):
        if best and 2.0 * n ** 3 / best > 0.5:  # one matmul of this size would take over half a second
            break
        speed = precision.matmul_flops(dtype, n, windows=3, window=0.1)
        if speed > best:
            best, size = speed, n
    return best, size


cpu, flags = precision.cpu_info()
peaks = {d: peak(d) for d in ("fp32", "bf16")}
print(f"CPU: {cpu}; flags: {', '.join(flags) or 'none'}; {threads} threads; torch {torch.__version__}")
for d, (speed, n) in peaks.items():
    print(f"{d} matmul peak: {speed / 1e9:.2f} GFLOP/s ({n}x{n})", flush=True)

lm, classifier = default_models()
cfg = lm.config
d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
embedding = vocab * d
body = sum(p.numel() for p in lm.parameters()) - embedding  # tied: the projection is the embedding matrix
n_sft = body + embedding  # + the output projection, used by every token
n_reward = sum(p.numel() for p in classifier.parameters()) - embedding  # body + the score head
attention = 12 * layers * a.seq * d
print(f"N (excluding the input embedding): sft {n_sft / 1e6:.1f}M (body {body / 1e6:.1f}M + output projection "
      f"{embedding / 1e6:.1f}M), reward {n_reward / 1e6:.1f}M; attention {attention / 1e6:.1f}M FLOPs/token at "
      f"T={a.seq}")

batch = token_batch(a.batch, a.seq)
chosen, rejected = token_batch(a.batch, a.seq, offset=3), token_batch(a.batch, a.seq, offset=5)
stages = {
    "sft": (lambda prec: sft_run(lm, prec, batch), a.batch * a.seq * (6 * n_sft + attention)),
    "reward": (lambda prec: reward_run(classifier, prec, chosen, rejected),
               2 * a.batch * a.seq * (6 * n_reward + attention)),
}
for name, (make, flops) in stages.items():
    runs = [make("fp32"), make("bf16")]
    interleaved(runs, a.n)
    parts = []
    for run in runs:
        achieved = flops / run.median
        parts.append(f"{run.precision} {run.median:.2f}s/step, {achieved / 1e9:.2f} GFLOP/s, "
                     f"MFU {achieved / peaks[run.precision][0]:.1%}")
    print(f"{name} ({flops / 1e9:.1f} GFLOP per step, n={a.n}): " + "; ".join(parts), flush=True)
    del runs
