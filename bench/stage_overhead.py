"""Wall time of `rlhf sft` and `rlhf reward` against the same training written directly against TRL
(bench/direct_trl.py): same model, data, steps, batch size, length, learning rate, seed, fp32, threads.
Runs alternate A B A B ...; printed: medians and the median of the pairwise ratios (target: at most 1.03).

    .venv/bin/python bench/stage_overhead.py [-n 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import shutil

from common import BIN, ROOT, SHARED, ab

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=3)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--max-length", type=int, default=256)
p.add_argument("--stages", default="sft,reward", help="comma list: sft, reward")
a = p.parse_args()

work = ROOT / "bench" / "results" / "overhead"
work.mkdir(parents=True, exist_ok=True)
py = str(BIN / "python")
rlhf = str(BIN / "rlhf")

# Data both sides read as is: conversational rows short enough that no side truncates or drops any.
sft_rows = [json.loads(x) for x in (SHARED / "sft" / "train.jsonl").read_text().splitlines()]
sft_rows = [r for r in sft_rows if sum(len(m["content"]) for m in r["messages"]) < 500][:64]
(work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
pref_rows = [json.loads(x) for x in (SHARED / "prefs" / "train.jsonl").read_text().splitlines()]
pref_rows = [r for r in pref_rows if len(json.dumps(r)) < 900][:64]
(work / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref_rows))

common = ["--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
          "--threads", "2", "--lr", "2e-5", "--warmup-ratio", "0.05"]
# The SFT stage the reward runs start from (also gives the direct SFT run a template with generation markers).
base = work / "base_sft"
if not (base / "rlhf_manifest.json").exists():
    import subprocess

    subprocess.run([rlhf, "sft", "--data", str(work / "sft.jsonl"), "--out", str(base), "--max-steps", "1",
                    "--overwrite"], check=True)


def clean():
    for d in ("ours", "theirs"):
        shutil.rmtree(work / d, ignore_errors=True)


stages = a.stages.split(",")
results = []
if "sft" in stages:
    results.append(ab("sft: rlhf sft / direct TRL SFTTrainer",
       [rlhf, "sft", "--model", str(base), "--data", str(work / "sft.jsonl"), "--out", str(work / "ours"), *common],
       [py, str(ROOT / "bench" / "direct_trl.py"), "sft", str(base), str(work / "sft.jsonl"), str(work / "theirs"),
        "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length)],
       a.n, setup=clean))
if "reward" in stages:
    results.append(ab("reward: rlhf reward / direct TRL RewardTrainer",
       [rlhf, "reward", "--model", str(base), "--data", str(work / "prefs.jsonl"), "--out", str(work / "ours"),
        "--no-group-by-prompt", *common],
       [py, str(ROOT / "bench" / "direct_trl.py"), "reward", str(base), str(work / "prefs.jsonl"),
        str(work / "theirs"), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
        "--max-length", str(a.max_length)],
       a.n, setup=clean))
(work / "results.json").write_text(json.dumps(results, indent=2))
