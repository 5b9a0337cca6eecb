"""Training-step time of the default model by torch thread count (forward + backward + AdamW step).

    .venv/bin/python bench/threads.py [--batch 4] [--seq 128] [-n 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from rlhf_cli.core.models import DEFAULT_MODEL, resolve_model

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("-n", type=int, default=5)
p.add_argument("--threads", default="1,2")
a = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
x = torch.randint(100, 40000, (a.batch, a.seq))
counts = [int(t) for t in a.threads.split(",")]
times: dict[int, list[float]] = {t: [] for t in counts}
for rep in range(a.n + 1):  # first round is warm-up
    for t in counts:
        torch.set_num_threads(t)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rep:
            times[t].append(time.perf_counter() - t0)
base = statistics.median(times[counts[0]])
for t in counts:
    m = statistics.median(times[t])
    print(f"threads={t}: median step {m:.2f}s ({a.batch * a.seq / m:.0f} tokens/s), "
          f"ratio to threads={counts[0]}: {m / base:.3f}  (n={a.n})")
