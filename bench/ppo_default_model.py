"""`rlhf ppo` on the default model: a short PPO run from a finished SFT and reward stage (by default the demo's,
runs/demo/sft and runs/demo/reward, made by `make demo`), then `rlhf eval policy` of the PPO policy against the SFT
model on held-out prompts (../shared/data/prompts/test.jsonl: HH-RLHF prompts the run never trained on), judged by
the same reward model.

Printed: seconds per update (median over the updates, and its split into generation, scoring, the reference/value/
old-log-prob forwards and the PPO epochs), episodes/s, the PPO process's peak resident memory (the kernel's account
of that child process), the batch-mean RM score of the first and last updates, and on the held-out prompts: mean
RM score of the SFT model (before) and of the PPO policy (after), their difference, win rate with its 95% interval,
KL to the SFT model (nats per response, on the policy's own samples), response lengths and the share of answers
that ended with EOS.

    .venv/bin/python bench/ppo_default_model.py [--run runs/demo] [--config examples/configs/demo_ppo.yaml] \
        [--eval-prompts ../shared/data/prompts/test.jsonl] [-- extra rlhf ppo flags]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import BIN, SHARED, jsonl, measured  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="run folder with sft and reward stages")
p.add_argument("--config", default=str(ROOT / "examples" / "configs" / "demo_ppo.yaml"))
p.add_argument("--eval-prompts", default=str(SHARED / "prompts" / "test.jsonl"))
p.add_argument("--eval-samples", type=int, default=None, help="use at most this many held-out prompts")
p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo_default" / "ppo"))
p.add_argument("--skip-train", action="store_true", help="only evaluate the PPO folder already in --out")
p.add_argument("--skip-eval", action="store_true", help="only summarise the evaluation already made")
p.add_argument("extra", nargs="*", help="more rlhf ppo flags, after --")
a = p.parse_args()

run, out = Path(a.run), Path(a.out)
sft, rm = run / "sft", run / "reward"
for d in (sft, rm):
    if not (d / "rlhf_manifest.json").is_file():
        sys.exit(f"{d}: no finished stage here; run `make demo` first (or pass --run DIR with sft and reward)")


out.parent.mkdir(parents=True, exist_ok=True)
load_before = os.getloadavg()
res: dict = {"command": sys.argv, "load_before": load_before}
if not a.skip_train:
    cmd = [str(BIN / "rlhf"), "ppo", "--config", a.config, "--policy", str(sft), "--reward", str(rm),
           "--out", str(out), "--overwrite", *a.extra]
    print("$ " + " ".join(cmd), flush=True)
    wall, peak = measured(cmd, out.parent / "ppo.log")
    res |= {"ppo_wall_s": wall, "ppo_peak_rss_gib": peak}
rows = jsonl(out / "metrics.jsonl")
per = [r["time/update"] for r in rows]
res |= {"updates": len(rows), "s_per_update_median": statistics.median(per),
        "split_median": {k[5:]: statistics.median(r[k] for r in rows)
                         for k in ("time/generate", "time/score", "time/forward", "time/train")},
        "episodes_per_s": sum(r["episodes_per_second"] for r in rows) / len(rows),
        "train_score_first": rows[0]["score_mean"], "train_score_last": rows[-1]["score_mean"],
        "train_score_first3": statistics.mean(r["score_mean"] for r in rows[:3]),
        "train_score_last3": statistics.mean(r["score_mean"] for r in rows[-3:]),
        "train_kl_last": rows[-1]["kl"]}

rows_file = out.parent / "eval_rows.jsonl"
cmd = [str(BIN / "rlhf"), "eval", "policy", "--model", str(out), "--baseline", str(sft), "--reward", str(rm),
       "--prompts", a.eval_prompts, "--baseline-seed", "7", "--json", "--save", str(rows_file)]
if a.eval_samples:
    cmd += ["--max-samples", str(a.eval_samples)]
if not a.skip_eval:
    print("$ " + " ".join(cmd), flush=True)
    wall, peak = measured(cmd, out.parent / "eval.log")
    res |= {"eval_wall_s": wall, "eval_peak_rss_gib": peak}
text = (out.parent / "eval.log").read_text()
ev = json.loads(text[text.index("{"):])
per_prompt = jsonl(rows_file)
diffs = [r["score"] - r["baseline_score"] for r in per_prompt]
half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5  # normal interval of a mean of paired differences
res |= {"score_diff_ci95": [statistics.mean(diffs) - half, statistics.mean(diffs) + half], "eval": ev,
        "load_after": os.getloadavg()}
(out.parent / "results.json").write_text(json.dumps(res, indent=2), encoding="utf-8")

sp = res["split_median"]
print(f"\nupdates {res['updates']}: {res['s_per_update_median']:.1f} s per update (median; generate "
      f"{sp['generate']:.1f}, score {sp['score']:.1f}, forwards {sp['forward']:.1f}, PPO epochs {sp['train']:.1f}), "
      f"{res['episodes_per_s']:.3f} episodes/s")
if "ppo_peak_rss_gib" in res:
    print(f"ppo process: {res['ppo_wall_s']:.0f} s wall, peak resident memory {res['ppo_peak_rss_gib']:.2f} GiB")
print(f"training batches: mean RM score first {res['train_score_first']:+.3f} -> last {res['train_score_last']:+.3f}"
      f" (first 3 {res['train_score_first3']:+.3f} -> last 3 {res['train_score_last3']:+.3f}); "
      f"KL at the end {res['train_kl_last']:.3f}")
e = res["eval"]
print(f"held-out ({e['prompts']} prompts of {a.eval_prompts}): mean RM score SFT {e['baseline_mean_score']:+.3f} -> "
      f"PPO {e['mean_score']:+.3f} (diff {e['mean_score_diff']:+.3f}, 95% CI {res['score_diff_ci95'][0]:+.3f} to "
      f"{res['score_diff_ci95'][1]:+.3f}); win rate {e['win_rate']:.3f} "
      f"(95% CI {e['win_rate_ci'][0]:.3f}-{e['win_rate_ci'][1]:.3f}); KL to SFT {e['kl']:.3f}; "
      f"length {e['baseline_mean_length']:.1f} -> {e['mean_length']:.1f} tokens; ended with EOS "
      f"{e['baseline_finished_rate']:.2f} -> {e['finished_rate']:.2f}")
print(f"load average before {load_before[0]:.2f}, after {res['load_after'][0]:.2f}")
