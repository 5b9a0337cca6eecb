"""`rlhf ppo` against the last PPO TRL shipped (trl==1.12.0, `trl.experimental.ppo.PPOTrainer`, run by
bench/trl112_ppo.py in its own virtualenv bench/.venv-trl112, never a project dependency).

Both sides get the same tiny policy (4-layer, hidden-64 Llama with the real SmolLM2 tokenizer, embeddings scaled
10x as in tests/test_ppo.py so that sampling is peaky enough to learn from in a few updates), the same reward model
(the policy's own backbone plus a hand-set score head: score = w . final hidden state at the last token, w a fixed
unit vector, so a policy raises its score by ending on tokens whose embedding points along w), the value model
started from that reward model, the same prompts (rendered with the chat template + generation prompt), batch 8,
32 response tokens, 2 PPO epochs x 2 minibatches, lr, KL coefficient, temperature, missing-EOS penalty, seed,
fp32, 2 torch threads, no gradient checkpointing. TRL 1.12's PPO does not clip gradients, so ours runs with
--max-grad-norm 1e6 (no clipping) to match.

The machine may be shared: before each pair the script waits until other processes use under 0.1 core, measures
how many cores other processes used during each run (/proc/stat minus the child's own CPU time), and runs a pair
again when that passed --max-foreign.

Runs alternate ours, theirs, ours, theirs (one warm-up pair, then -n pairs; pair i uses seed 42 + i on both
sides). Printed: whole-process wall time and episodes/s, steady-state episodes/s (updates 2..N, from each side's
own per-update times), reward gain (mean shaped RM score of the last update minus the first, and of the last 3
minus the first 3; shaped = raw score minus the missing-EOS penalty, which is what TRL logs as objective/scores),
medians, and the medians of the pairwise ratios ours/theirs (target: episodes/s ratio >= 1.5; reward gain: ours
equal or better). Also our time split per update from metrics.jsonl.

The benchmark virtualenv (git-ignored; torch pinned so pip takes the CPU wheel on local disk, the other versions
the same as the project venv's so both sides run the same model code):

    python3 -m venv bench/.venv-trl112
    bench/.venv-trl112/bin/pip install torch==2.13.0
    bench/.venv-trl112/bin/pip install trl==1.12.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0

then (about 5 minutes on 2 quiet cores with -n 6 --updates 10):

    .venv/bin/python bench/ppo_vs_trl112.py [-n 6] [--updates 10] [--rebuild]

On real models instead of the tiny ones: --policy SFT_DIR --reward RM_DIR (for example the demo's runs/demo/sft and
runs/demo/reward; the same prompts are used). TRL 1.12 takes minutes per update on the 135M default model, so:

    .venv/bin/python bench/ppo_vs_trl112.py --policy runs/demo/sft --reward runs/demo/reward -n 1 --warmup 0 \
        --updates 3 --lr 3e-6

With --freeze-layers N both sides train only the layers above N (ours: `rlhf ppo --freeze-layers N`, which also
runs the frozen layers once per rollout for policy, reference and value model when they share them; TRL 1.12:
the same parameters set to need no gradient, see bench/trl112_ppo.py), as the demo's stage 3 does with 20 of 30:

    .venv/bin/python bench/ppo_vs_trl112.py --policy runs/demo/sft --reward runs/demo/reward -n 2 --warmup 0 \
        --updates 3 --lr 1e-5 --freeze-layers 20

Each run's peak resident memory is read from the kernel's accounting of that child process (wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import BIN, ENV, SHARED, jsonl, measured  # noqa: E402
from ppo_settings import add_settings, setting_flags  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=3, help="measured pairs (after one warm-up pair)")
add_settings(p)
p.add_argument("--n-prompts", type=int, default=64)
p.add_argument("--max-prompt-tokens", type=int, default=128,
               help="keep the first prompts whose rendered length is at most this (0: no limit)")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--rebuild", action="store_true", help="rebuild the models and prompts")
p.add_argument("--policy", help="a real policy folder (an sft stage) instead of the tiny built one")
p.add_argument("--reward", help="a real reward folder (a reward stage) instead of the hand-set one; with --policy")
p.add_argument("--warmup", type=int, default=1, help="warm-up pairs before the measured ones (not counted)")
p.add_argument("--first-seed", type=int, default=42,
               help="pair i (from 0) uses this seed + i: more pairs for a figure without repeating seeds")
p.add_argument("--max-foreign", type=float, default=0.15,
               help="redo a pair when other processes used more than this many cores during either run")
p.add_argument("--retries", type=int, default=4, help="redos allowed per pair")
p.add_argument("--bench-venv", default=str(ROOT / "bench" / ".venv-trl112"))
a = p.parse_args()

if bool(a.policy) != bool(a.reward):
    sys.exit("--policy and --reward go together")
WORK = ROOT / "bench" / "results" / ("ppo_bench_real" if a.policy else "ppo_bench")
POLICY, RM, PROMPTS = WORK / "policy", WORK / "rm", WORK / "prompts.jsonl"
if a.policy:
    POLICY, RM = Path(a.policy).resolve(), Path(a.reward).resolve()
BENCH_PY = Path(a.bench_venv) / "bin" / "python"


def setup() -> None:
    """The tiny policy, the hand-set reward model (a finished reward stage) and the prompts file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny

    from rlhf_cli.core.manifest import write_manifest

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    started = time.time()
    if a.policy:
        tok = AutoTokenizer.from_pretrained(POLICY)
        write_prompts(tok, {"policy": str(POLICY), "reward": str(RM), "policy_parameters": sum(
            x.numel() for x in AutoModelForCausalLM.from_pretrained(POLICY).parameters())})
        return
    build_tiny(POLICY, layers=a.layers, hidden=a.hidden, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(POLICY)
    with torch.no_grad():
        policy.model.embed_tokens.weight.mul_(10.0)  # tied: the LM head too
    policy.save_pretrained(POLICY)
    tok = AutoTokenizer.from_pretrained(POLICY)

    cfg = LlamaConfig(**{k: v for k, v in policy.config.to_dict().items()
                         if k not in ("architectures", "model_type", "transformers_version", "dtype")})
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg)
    missing = rm.model.load_state_dict(policy.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    w = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rm.score.weight.copy_((w / w.norm()).unsqueeze(0))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(RM)
    tok.save_pretrained(RM)
    write_manifest(RM, stage="reward", parents=[str(POLICY)], args={"max_length": 512},
                   data={"note": "hand-set reward model for bench/ppo_vs_trl112.py"}, metrics={}, started=started)
    write_prompts(tok, {"layers": a.layers, "hidden": a.hidden,
                        "policy_parameters": sum(x.numel() for x in policy.parameters())})


def write_prompts(tok, about: dict) -> None:
    """The first --n-prompts training prompts whose rendered length is at most --max-prompt-tokens."""
    src = SHARED / "prompts" / "train.jsonl"
    if not src.is_file():
        src = ROOT / "examples" / "data" / "prompts.jsonl"
    kept = []
    for line in src.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if not a.max_prompt_tokens or n <= a.max_prompt_tokens:
            kept.append((row, n))
        if len(kept) == a.n_prompts:
            break
    PROMPTS.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r, _ in kept), encoding="utf-8")
    lengths = sorted(n for _, n in kept)
    (WORK / "setup.json").write_text(json.dumps({
        "prompts_from": str(src), "prompts": len(kept), "prompt_tokens_median": statistics.median(lengths),
        "prompt_tokens_max": lengths[-1], **about}, indent=2), encoding="utf-8")
    check_both_read()


def check_both_read() -> None:
    """Both virtualenvs must read the folders."""
    check = ("import sys; from transformers import AutoModelForCausalLM as C, AutoModelForSequenceClassification as S;"
             "C.from_pretrained(sys.argv[1]); S.from_pretrained(sys.argv[2], num_labels=1); print('ok')")
    for py in (sys.executable, str(BENCH_PY)):
        subprocess.run([py, "-c", check, str(POLICY), str(RM)], env=ENV, check=True, stdout=subprocess.DEVNULL)


def ours_cmd(out: Path, seed: int) -> list[str]:
    return [str(BIN / "rlhf"), "ppo", "--policy", str(POLICY), "--reward", str(RM), "--prompts", str(PROMPTS),
            "--out", str(out), "--overwrite", "--max-steps", str(a.updates), "--batch-size", str(a.batch_size),
            "--ppo-epochs", str(a.ppo_epochs), "--num-minibatches", str(a.num_minibatches),
            "--max-new-tokens", str(a.response_length), "--lr", str(a.lr), "--kl-coef", str(a.kl_coef),
            "--temperature", str(a.temperature), "--missing-eos-penalty", str(a.missing_eos_penalty),
            "--seed", str(seed), "--threads", "2", "--precision", "fp32", "--sample-every", "0",
            "--max-grad-norm", "1e6", "--value-init", "reward", "--freeze-layers", str(a.freeze_layers)]


def theirs_cmd(out: Path, seed: int) -> list[str]:
    return [str(BENCH_PY), str(ROOT / "bench" / "trl112_ppo.py"), "--policy", str(POLICY), "--reward", str(RM),
            "--prompts", str(PROMPTS), "--out", str(out), *setting_flags(a), "--seed", str(seed), "--threads", "2"]


TICK = os.sysconf("SC_CLK_TCK")


def busy_s() -> float:
    """CPU seconds spent busy on the whole machine so far (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK  # all but idle and iowait


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_idle(limit_s: float = 600, foreign_cores: float = 0.1) -> float:
    """Wait until the machine is quiet (other processes use under `foreign_cores` over 3 s); returns the wait."""
    t0 = time.time()
    while True:
        b0 = busy_s()
        time.sleep(3)
        load = (busy_s() - b0) / 3
        if load < foreign_cores or time.time() - t0 > limit_s:
            return time.time() - t0
        print(f"  (machine busy: {load:.2f} cores used by other processes; waiting)", flush=True)
        time.sleep(10)


def timed(cmd: list[str], out: Path) -> tuple[float, float, float]:
    """Whole-process wall time, the cores other processes used meanwhile (0 on a quiet machine), and the
    process's peak resident memory in GiB."""
    shutil.rmtree(out, ignore_errors=True)
    b0, c0 = busy_s(), children_cpu_s()
    dt, peak = measured(cmd, WORK / "run.log")
    foreign = max(0.0, (busy_s() - b0) - (children_cpu_s() - c0)) / dt
    return dt, foreign, peak


def gains(scores: list[float]) -> dict:
    k = min(3, len(scores) // 2)
    return {"gain_last_first": scores[-1] - scores[0],
            "gain_last3_first3": statistics.mean(scores[-k:]) - statistics.mean(scores[:k]), "scores": scores}


def summarise(side: str, wall: float, out: Path) -> dict:
    bs = a.batch_size
    if side == "ours":
        rows = jsonl(out / "metrics.jsonl")
        scores = [r["reward_mean"] for r in rows]  # raw RM score minus the missing-EOS penalty
        extra = {k: statistics.mean(r[k] for r in rows) for k in
                 ("time/generate", "time/score", "time/forward", "time/train", "time/update")}
        extra |= {"raw_" + k: v for k, v in gains([r["score_mean"] for r in rows]).items() if k != "scores"}
        extra |= {"final_kl": rows[-1]["kl"], "eos_fraction": statistics.mean(r["eos_fraction"] for r in rows)}
    else:
        rows = [r for r in jsonl(out / "log_history.jsonl") if "objective/scores" in r]
        scores = [r["objective/scores"] for r in rows]
        extra = {"final_kl": rows[-1]["objective/kl"],
                 "time/update": statistics.mean(r["time/update"] for r in rows),
                 "startup": json.loads((out / "timing.json").read_text())}
    assert len(rows) == a.updates, (side, len(rows))
    per = [r["time/update"] for r in rows]
    return {"wall_s": wall, "eps_wall": a.updates * bs / wall,
            "eps_steady": (len(per) - 1) * bs / sum(per[1:]), "first_update_s": per[0],
            "outside_updates_s": wall - sum(per),  # interpreter start, imports, loading, saving
            **gains(scores), **extra}


def needs_setup() -> bool:
    if a.rebuild or not PROMPTS.is_file() or not (WORK / "setup.json").is_file():
        return True
    if a.policy:
        return json.loads((WORK / "setup.json").read_text()).get("policy") != str(POLICY)
    return not (RM / "rlhf_manifest.json").exists()


if needs_setup():
    setup()
if not BENCH_PY.exists():
    sys.exit(f"{BENCH_PY}: missing; create the benchmark virtualenv first (python3 -m venv, pip install "
             f"torch==2.13.0, trl==1.12.0 ...)")

load_before = os.getloadavg()
print(f"setup: {json.loads((WORK / 'setup.json').read_text())}", flush=True)
print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
t_bench = time.time()
ours_out, theirs_out = WORK / "ours", WORK / "theirs"
runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
contended = 0
for i in range(-a.warmup, a.n):  # negative: warm-up pairs, not counted
    seed = a.first_seed + i if i >= 0 else a.first_seed - 1 + i + 1
    tag = "warm-up" if i < 0 else f"pair {i + 1}"
    for attempt in range(a.retries + 1):
        wait_idle()
        pair = {}
        for side, cmd, out in (("ours", ours_cmd, ours_out), ("theirs", theirs_cmd, theirs_out)):
            wall, foreign, peak = timed(cmd(out, seed), out)
            res = summarise(side, wall, out) | {"seed": seed, "foreign_cores": foreign, "peak_rss_gib": peak}
            print(f"{tag} {side:6s} seed {seed}: wall {wall:6.2f}s  eps(wall) {res['eps_wall']:.3f}  "
                  f"eps(steady) {res['eps_steady']:.3f}  first update {res['first_update_s']:.2f}s  "
                  f"gain last-first {res['gain_last_first']:+.3f}  last3-first3 {res['gain_last3_first3']:+.3f}  "
                  f"final kl {res['final_kl']:.3f}  peak {peak:.2f} GiB  other load {foreign:.2f} cores", flush=True)
            pair[side] = res
        if max(r["foreign_cores"] for r in pair.values()) <= a.max_foreign or attempt == a.retries:
            break
        contended += 1
        print(f"{tag}: other processes competed for the CPUs; running the pair again", flush=True)
    if i >= 0:
        for side, res in pair.items():
            runs[side].append(res)
load_after = os.getloadavg()


def med(side: str, key: str) -> float:
    return statistics.median(r[key] for r in runs[side])


def ratio(key: str) -> tuple[float, float, float]:
    rs = [o[key] / t[key] for o, t in zip(runs["ours"], runs["theirs"], strict=True)]
    return statistics.median(rs), min(rs), max(rs)


print(f"\n== medians over {a.n} pairs ({a.updates} updates x {a.batch_size} episodes, {a.response_length} tokens, "
      f"{a.ppo_epochs} PPO epochs x {a.num_minibatches} minibatches, lr {a.lr:g}, lowest {a.freeze_layers} layers "
      f"frozen on both sides) ==")
for key, label in (("wall_s", "whole-process wall s"), ("eps_wall", "episodes/s (whole process)"),
                   ("eps_steady", "episodes/s (steady, updates 2..N)"), ("first_update_s", "first update s"),
                   ("outside_updates_s", "s outside the updates (start, save)"),
                   ("gain_last_first", "reward gain last - first"),
                   ("gain_last3_first3", "reward gain last3 - first3"), ("final_kl", "final KL (nats/response)"),
                   ("peak_rss_gib", "peak resident memory GiB")):
    print(f"{label:38s} ours {med('ours', key):8.3f}   trl 1.12 {med('theirs', key):8.3f}")
summary = {}
for key in ("eps_wall", "eps_steady"):
    m, lo, hi = ratio(key)
    summary[f"ratio_{key}"] = {"median": m, "min": lo, "max": hi}
    print(f"ours/trl {key:11s} median {m:.3f} (min {lo:.3f}, max {hi:.3f})  target >= 1.5")
print(f"mean over pairs, reward gain last3-first3: ours "
      f"{statistics.mean(r['gain_last3_first3'] for r in runs['ours']):+.3f}  trl 1.12 "
      f"{statistics.mean(r['gain_last3_first3'] for r in runs['theirs']):+.3f}  (target: ours equal or better)")
print("our time split per update (s, median of run means): " + "  ".join(
    f"{k[5:]} {med('ours', k):.3f}" for k in ("time/generate", "time/score", "time/forward", "time/train",
                                               "time/update")))
print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
      f"benchmark took {time.time() - t_bench:.0f}s; pairs redone for contention: {contended}; most other load "
      f"during a kept run: {max(r['foreign_cores'] for v in runs.values() for r in v):.2f} cores")
(WORK / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary,
                                               "load_before": load_before, "load_after": load_after}, indent=2),
                                   encoding="utf-8")
