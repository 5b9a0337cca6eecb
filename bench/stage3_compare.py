"""Stage 3 side by side: PPO, GRPO, RLOO and best-of-n (rejection sampling, fine-tuned on the best answers with
SFT, or with DPO on best against worst) from the same SFT model and reward model, on the same training prompts and
about the same number of sampled answers, each then measured against the SFT model on held-out prompts that none
of them trained on.

InstructGPT's authors suggest rejection sampling as the simple alternative to RL; this answers "how much worse is
it?" on the hardware at hand. Each algorithm runs as its own process (the kernel's account of its CPU seconds and
peak memory), then `rlhf eval policy --json` judges it against the SFT model with the same reward model and the
same seeds and the same sampling (temperature 0.7, no top-p or top-k, as the PPO-like stages sample), so every row
is measured on the same prompts the same way; the SFT model's answers are sampled once and reused from the cache
(`rlhf eval policy` keeps them).

Printed: one Markdown table row per algorithm (CPU minutes, wall minutes, answers sampled, peak memory, held-out
win rate with its 95% interval, mean score difference, KL to SFT, mean length, distinct-2, finished rate) and
the SFT figures the rows are compared with.

    .venv/bin/python bench/stage3_compare.py [--run runs/demo] [--algos ppo,grpo,rloo,best-of-n,best-of-n-dpo,...] \
        [--eval-prompts examples/data/hh_prompts_test.jsonl] [--updates 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import BIN, ENV  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="run folder with finished sft and reward stages")
p.add_argument("--algos", default="ppo,grpo,rloo,best-of-n,best-of-n-dpo")
p.add_argument("--prompts", default=str(ROOT / "examples" / "data" / "prompts.jsonl"), help="training prompts")
p.add_argument("--eval-prompts", default=str(ROOT / "examples" / "data" / "hh_prompts_test.jsonl"))
p.add_argument("--eval-samples", type=int, default=None, help="use at most this many held-out prompts")
p.add_argument("--updates", type=int, default=20, help="updates of 8 answers each for ppo/grpo/rloo")
p.add_argument("--max-new-tokens", type=int, default=48)
p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage3"))
p.add_argument("--skip-train", action="store_true", help="only evaluate the folders already in --out")
p.add_argument("--threads", type=int, default=2, help="torch threads per command (1: two copies of this script "
               "with different --algos can share 2 cores)")
p.add_argument("--eval-threads", type=int, default=None, help="torch threads for the evaluations (default: "
               "--threads); the SFT answers are reused from the cache only when this matches the earlier runs")
p.add_argument("--judge", action="append", default=[], help="another reward model that judges every row too "
               "(repeatable), such as one trained on other preferences; its win rate gets a column")
a = p.parse_args()

run, out = Path(a.run), Path(a.out)
out.mkdir(parents=True, exist_ok=True)
for stage in ("sft", "reward"):
    if not (run / stage / "rlhf_manifest.json").is_file():
        sys.exit(f"{run / stage}: no finished {stage} stage; run `make demo` (or pass --run) first")

# The demo's stage-3 budget: 20 updates x 8 answers = 160 sampled answers of up to 48 tokens, the top 10 of 30
# layers trained. GRPO/RLOO sample 4 answers per prompt for 2 prompts per update (8 answers); best-of-n samples
# 4 answers for each of the 40 prompts (160 answers) and fine-tunes on the 40 best.
COMMON = ["--prompts", a.prompts, "--max-new-tokens", str(a.max_new_tokens), "--seed", "42",
          "--threads", str(a.threads)]
PPO_LIKE = COMMON + ["--max-steps", str(a.updates), "--batch-size", "8", "--temperature", "0.7",
                     "--freeze-layers", "20", "--missing-eos-penalty", "1.0"]
# best-of-n with the demo's config; BON_DPO: the same 160 answers (same seed and settings), then 3 epochs of DPO on
# each prompt's best against its worst
BON = ["best-of-n", "--config", str(ROOT / "examples" / "configs" / "demo_best_of_n.yaml"), *COMMON]
BON_DPO = BON + ["--objective", "dpo", "--epochs", "3"]
HH_TRAIN = str(ROOT / "examples" / "data" / "hh_prompts_train.jsonl")
EOS = ["--missing-eos-penalty", "1.0"]  # answers that ran out of tokens ranked 1.0 lower, as PPO's flag does
PPO = ["ppo", "--config", str(ROOT / "examples" / "configs" / "demo_ppo.yaml"), *PPO_LIKE]
COMMANDS = {
    "ppo": PPO,
    "grpo": ["ppo", "--algo", "grpo", "--group-size", "4", "--lr", "1e-5", "--kl-coef", "0.05", *PPO_LIKE],
    "rloo": ["ppo", "--algo", "rloo", "--group-size", "4", "--lr", "1e-5", "--kl-coef", "0.05", *PPO_LIKE],
    "best-of-n": BON,
    "best-of-n-dpo": BON_DPO + ["--lr", "1e-5"],
    # five times the step: the policy moves (KL ~0.8) and wins, but learns the RM's taste for long, cut-off answers
    "best-of-n-dpo-5e-5": BON_DPO + ["--lr", "5e-5"],
    "best-of-n-dpo-eos": BON_DPO + ["--lr", "5e-5", *EOS],
    "best-of-n-dpo-eos-3e-5": BON_DPO + ["--lr", "3e-5", *EOS],
    # the same on 40 HH training prompts (the held-out set's distribution; none of them in it)
    "best-of-n-dpo-hh": BON_DPO + ["--lr", "3e-5", *EOS, "--prompts", HH_TRAIN, "--max-samples", "40"],
    # best against worst of 8 answers per demo prompt (320 sampled), at two steps
    "best-of-n-dpo-k8": BON_DPO + ["-k", "8", "--lr", "3e-5", *EOS],
    "best-of-n-dpo-k8-1e-4": BON_DPO + ["-k", "8", "--lr", "1e-4", *EOS],
    # every two of the 4 answers whose scores differ (up to 6 pairs per prompt), one pass; and only pairs at
    # least 0.5 apart, three passes
    "best-of-n-dpo-all-pairs": BON_DPO + ["--lr", "3e-5", *EOS, "--pairs", "all", "--epochs", "1"],
    "best-of-n-dpo-gap-0.5": BON_DPO + ["--lr", "3e-5", *EOS, "--pairs", "all", "--min-pair-gap", "0.5"],
    # PPO's own levers on the demo settings: running score normalisation; 4 value-only updates before the
    # policy's (4 more updates); LoRA (adapters above the frozen layers) at three learning rates
    "ppo-normalize-rewards": PPO + ["--normalize-rewards"],
    "ppo-value-warmup-4": PPO + ["--value-warmup", "4", "--max-steps", str(a.updates + 4)],
    "ppo-lora-1e-4": PPO + ["--lora", "--lr", "1e-4"],
    "ppo-lora-3e-4": PPO + ["--lora", "--lr", "3e-4"],
    "ppo-lora-1e-3": PPO + ["--lora", "--lr", "1e-3"],
}


def child(cmd: list[str], log: Path) -> dict:
    """One command as a child process: wall seconds, CPU seconds (user + system) and peak memory from wait4."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"benchmark command failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall_s": time.perf_counter() - t, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_gib": usage.ru_maxrss / 2**20}


def episodes(dest: Path) -> int | None:
    """Answers the stage sampled: PPO/GRPO/RLOO count episodes, best-of-n prompts x K."""
    m = json.loads((dest / "rlhf_manifest.json").read_text())["metrics"]
    return m.get("episodes") or (m.get("prompts", 0) * m.get("k", 0)) or None


rows = {}
for algo in a.algos.split(","):
    dest = out / algo
    cost_file = out / f"{algo}.cost.json"
    if not a.skip_train:
        cmd = [str(BIN / "rlhf"), *COMMANDS[algo], "--policy", str(run / "sft"), "--reward", str(run / "reward"),
               "--out", str(dest), "--overwrite"]
        print(f"{algo}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        cost = child(cmd, out / f"{algo}.train.log")
        cost_file.write_text(json.dumps(cost))
    cost = json.loads(cost_file.read_text())
    evaluation = out / f"{algo}.eval.json"
    fresh = evaluation.is_file() and evaluation.stat().st_mtime > (dest / "rlhf_manifest.json").stat().st_mtime
    if a.skip_train and fresh:  # already judged after its training: print it again
        rows[algo] = cost | json.loads(evaluation.read_text().strip().splitlines()[-1])
        rows[algo]["episodes"] = episodes(dest)
        continue
    cmd = [str(BIN / "rlhf"), "eval", "policy", "--model", str(dest), "--baseline", str(run / "sft"), "--reward",
           str(run / "reward"), "--prompts", a.eval_prompts, "--max-new-tokens", str(a.max_new_tokens),
           "--temperature", "0.7", "--top-p", "1.0", "--top-k", "0", "--json",
           "--threads", str(a.eval_threads or a.threads)]
    if a.eval_samples:
        cmd += ["--max-samples", str(a.eval_samples)]
    for judge in a.judge:
        cmd += ["--judge", judge]
    print(f"{algo}: eval policy on {a.eval_prompts}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"eval failed for {algo}:\n{r.stderr[-3000:]}")
    evaluation.write_text(r.stdout)
    rows[algo] = cost | json.loads(r.stdout.strip().splitlines()[-1])
    rows[algo]["episodes"] = episodes(dest)


def f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def other_judges(r: dict) -> str:
    """The win rate (95% CI) under each --judge, in the order given ("-" where a row was judged without it)."""
    by = {j["reward"]: j for j in r.get("judges", [])}
    cells = []
    for judge in a.judge:
        j = by.get(judge)
        cells.append(f"{j['win_rate']:.2f} ({j['win_rate_ci'][0]:.2f}-{j['win_rate_ci'][1]:.2f})" if j else "-")
    return "".join(f" {c} |" for c in cells)


print(f"\nheld-out prompts: {a.eval_prompts}; judge: {run / 'reward'}"
      + "".join(f", also {j}" for j in a.judge) + f"; baseline: {run / 'sft'}\n")
print("| stage 3 | CPU min | wall min | answers sampled | peak GiB | win rate (95% CI) |"
      + "".join(f" win rate under {Path(j).name} |" for j in a.judge)
      + " score diff | KL nats | length (SFT) | distinct-2 (SFT) | finished (SFT) |")
print("|---|---|---|---|---|---|" + "---|" * len(a.judge) + "---|---|---|---|---|")
for algo, r in rows.items():
    lo, hi = r["win_rate_ci"]
    print(f"| {algo} | {r['cpu_s'] / 60:.1f} | {r['wall_s'] / 60:.1f} | {r['episodes'] or '-'} | {r['peak_gib']:.1f} "
          f"| {r['win_rate']:.2f} ({lo:.2f}-{hi:.2f}) |{other_judges(r)} {f(r['mean_score_diff'], '+.3f')} | "
          f"{f(r['kl'], '.2f')} | "
          f"{f(r['mean_length'], '.1f')} ({f(r['baseline_mean_length'], '.1f')}) | {f(r['distinct_2'], '.2f')} "
          f"({f(r['baseline_distinct_2'], '.2f')}) | {f(r['finished_rate'], '.2f')} "
          f"({f(r['baseline_finished_rate'], '.2f')}) |")
(out / "table.json").write_text(json.dumps(rows, indent=2))
