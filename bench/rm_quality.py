"""Reward-model quality on real data: `make demo`'s reward settings (examples/configs/demo_reward.yaml), trained on
HH-RLHF harmless-base (../shared/data/prefs/train.jsonl) and scored on its test split. Prints accuracy, mean
margin and the wall time. Starts from the demo's SFT stage (run `make demo` first).

    .venv/bin/python bench/rm_quality.py [--max-samples 600] [--sft runs/demo/sft]
"""

from __future__ import annotations

import argparse
import json
import time

from common import BIN, ROOT, SHARED, run

p = argparse.ArgumentParser()
p.add_argument("--max-samples", type=int, default=None, help="train on the first N pairs only")
p.add_argument("--sft", default=str(ROOT / "runs" / "demo" / "sft"))
p.add_argument("--extra", nargs="*", default=[], help="more rlhf reward flags")
a = p.parse_args()

out = ROOT / "bench" / "results" / "hh_rm"
cmd = [str(BIN / "rlhf"), "reward", "--config", str(ROOT / "examples" / "configs" / "demo_reward.yaml"),
       "--model", a.sft, "--data", str(SHARED / "prefs" / "train.jsonl"),
       "--eval-data", str(SHARED / "prefs" / "test.jsonl"), "--out", str(out), "--overwrite", *a.extra]
if a.max_samples:
    cmd += ["--max-samples", str(a.max_samples)]
t = time.perf_counter()
run(cmd)
wall = time.perf_counter() - t
m = json.loads((out / "rlhf_manifest.json").read_text())
res = {"train_pairs": m["metrics"]["pairs"], "eval_pairs": m["metrics"]["eval_pairs"],
       "accuracy_before": m["metrics"]["eval_accuracy_before"], "accuracy": m["metrics"]["eval_accuracy"],
       "mean_margin": m["metrics"]["eval_mean_margin"], "train_seconds": m["metrics"]["train_seconds"],
       "wall_seconds": round(wall, 1), "command": " ".join(cmd)}
print(json.dumps(res, indent=2))
