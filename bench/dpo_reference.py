"""`rlhf dpo` with the reference's log-probabilities computed once before training (`--precompute-ref`, the
default) against the reference run beside the policy in every step (`--no-precompute-ref`): the same pairs,
seed and steps, the two variants in turn (A B A B ...) so a drifting machine affects both alike.

Printed: per variant the median whole-process seconds (the fair comparison) and training seconds (the manifest's
train_seconds, the Trainer's loop only: the precomputed variant's reference pass runs before it, when the trainer
is built), peak memory, the ratios, and the largest difference in a step's loss between the variants (they train
on the same reference log-probabilities, so the losses should agree to rounding).

    .venv/bin/python bench/dpo_reference.py [--run runs/demo] [--data examples/data/hh_prefs_train.jsonl]
        [--pairs-per-run 16] [--epochs 3] [--runs 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import BIN, jsonl, measured  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="run folder with an sft stage (the start model)")
p.add_argument("--data", default=str(ROOT / "examples" / "data" / "hh_prefs_train.jsonl"))
p.add_argument("--pairs-per-run", type=int, default=16)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--max-length", type=int, default=256)
p.add_argument("--runs", type=int, default=2, help="runs of each variant")
p.add_argument("--threads", type=int, default=None)
p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo_reference"))
a = p.parse_args()

run, out = Path(a.run), Path(a.out)
if not (run / "sft" / "rlhf_manifest.json").is_file():
    sys.exit(f"{run / 'sft'}: no finished sft stage here; run `make demo` first (or pass --run DIR with an sft stage)")
out.mkdir(parents=True, exist_ok=True)

# the shape of best-of-n's DPO in the demo: top 10 of 30 layers trained, batches of 8 pairs, 3 epochs
VARIANTS = {"reference every step": "--no-precompute-ref", "reference once": "--precompute-ref"}
walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
trains: dict[str, list[float]] = {v: [] for v in VARIANTS}
peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
losses: dict[str, list[float]] = {}

for i in range(a.runs):
    for name, flag in VARIANTS.items():
        dest = out / f"{flag.strip('-')}-{i}"
        cmd = [str(BIN / "rlhf"), "dpo", "--model", str(run / "sft"), "--data", a.data, "--out", str(dest),
               "--overwrite", "--max-samples", str(a.pairs_per_run), "--epochs", str(a.epochs), "--batch-size", "8",
               "--lr", "3e-5", "--freeze-layers", "20", "--max-length", str(a.max_length), "--seed", "42", flag,
               *(["--threads", str(a.threads)] if a.threads else [])]
        print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        wall, peak = measured(cmd, out / f"{dest.name}.log")
        walls[name].append(wall)
        peaks[name].append(peak)
        trains[name].append(json.loads((dest / "rlhf_manifest.json").read_text())["metrics"]["train_seconds"])
        losses.setdefault(name, [r["loss"] for r in jsonl(dest / "metrics.jsonl") if "loss" in r])

med = {v: (statistics.median(walls[v]), statistics.median(trains[v]), max(peaks[v])) for v in VARIANTS}
print(f"\n{a.runs} runs of each (in turn), {a.pairs_per_run} pairs x {a.epochs} epochs, medians\n")
print("| variant | whole process s | training s | peak GiB |")
print("|---|---:|---:|---:|")
for v in VARIANTS:
    print(f"| {v} | {med[v][0]:.0f} | {med[v][1]:.0f} | {med[v][2]:.2f} |")
base, new = VARIANTS
print(f"| ratio every step / once | {med[base][0] / med[new][0]:.2f} | {med[base][1] / med[new][1]:.2f} | "
      f"{med[base][2] / med[new][2]:.2f} |")
diff = max(abs(x - y) for x, y in zip(losses[base], losses[new], strict=True))
print(f"\nlargest difference in a step's loss between the variants: {diff:.2g} ({len(losses[new])} steps)")
