"""The memory planner's estimate against the measured peak resident memory, on the default model.

Each case runs the real `rlhf` command in its own process, 2 optimiser steps on rows that are exactly the given
length in tokens (long real HH-RLHF text, truncated), with the micro-batch fixed by `--micro-batch-size`, and
compares the estimate the stage wrote into its manifest with the process's peak resident set size (wait4).

    .venv/bin/python bench/memory.py                 # sft, reward and ppo at three shapes each (2 optimiser steps:
                                                     # AdamW allocates its states at the first one)
    .venv/bin/python bench/memory.py --only reward   # one stage
    .venv/bin/python bench/memory.py --hh            # default `rlhf reward` on HH-RLHF pairs, with and without
                                                     # the planner (same effective batch), peak and loss curve
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
HH = SHARED / "prefs" / "train.jsonl"
if not HH.is_file():  # a bare clone: the shipped sample
    HH = ROOT / "examples" / "data" / "hh_prefs_train.jsonl"
RLHF = [sys.executable, "-m", "rlhf_cli"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# (stage, micro-batch, tokens per sequence)
CASES = [("sft", 1, 512), ("sft", 4, 256), ("sft", 8, 512),
         ("reward", 1, 512), ("reward", 4, 256), ("reward", 8, 512),
         ("ppo", 4, 64), ("ppo", 8, 128), ("ppo", 16, 192)]


def long_texts() -> list[str]:
    """Real text, long enough for any case: HH dialogues joined."""
    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()[:400]]
    pieces = [m["content"] for r in rows for m in r["prompt"] + r["chosen"]]
    texts, cur = [], []
    for p in pieces:
        cur.append(p)
        if sum(len(c) for c in cur) > 6000:
            texts.append("\n".join(cur))
            cur = []
    return texts


def tokenizer():
    from transformers import AutoTokenizer

    from rlhf_cli.core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MODEL))


def cut(tok, text: str, n: int) -> str:
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n])


def write_data(tmp: Path, stage: str, length: int) -> Path:
    """Rows of about `length` tokens once chat-templated, of two lengths a few tokens apart, so every batch is
    padded as real data is (padding sends attention to the masked kernel)."""
    tok, texts = tokenizer(), long_texts()[:64]
    path = tmp / f"{stage}{length}.jsonl"
    rows = []
    for i, t in enumerate(texts):
        body = cut(tok, t, length - 30 - (8 if i % 2 else 0))
        if stage == "sft":
            rows.append({"messages": [{"role": "user", "content": "Tell me more."},
                                      {"role": "assistant", "content": body}]})
        elif stage == "reward":
            rows.append({"prompt": [{"role": "user", "content": body}],
                         "chosen": [{"role": "assistant", "content": "Yes, gladly, here it is."}],
                         "rejected": [{"role": "assistant", "content": "No."}]})
        else:
            rows.append({"prompt": [{"role": "user", "content": body}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def measure(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Exit code, peak RSS (bytes), seconds, stderr tail of one process."""
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024.0, time.time() - t0, tail


def base_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def stage_cmd(stage: str, micro: int, length: int, out: Path, tmp: Path) -> list[str]:
    common = ["--max-memory", "1000GB", "--micro-batch-size", str(micro), "--threads", "2"]
    data = str(write_data(tmp, stage, length))
    if stage == "sft":
        return RLHF + ["sft", "--model", MODEL, "--data", data, "--max-length", str(length),
                       "--batch-size", str(micro), "--max-steps", "2", "--out", str(out), *common]
    if stage == "reward":
        return RLHF + ["reward", "--model", MODEL, "--data", data, "--max-length", str(length),
                       "--batch-size", str(micro), "--max-steps", "2", "--out", str(out), *common]
    # ppo: tiny sft and reward stages of the default model; prompts of about `length` tokens, 32 new tokens
    return RLHF + ["ppo", "--policy", str(tmp / "ppo_sft"), "--reward", str(tmp / "ppo_rm"), "--prompts", data,
                   "--max-length", str(length + 32), "--max-new-tokens", "32", "--batch-size", str(micro),
                   "--max-steps", "1", "--ppo-epochs", "2", "--out", str(out), *common]


def prepare_ppo_parents(tmp: Path, env: dict[str, str]) -> None:
    for stage, folder in (("sft", "ppo_sft"), ("reward", "ppo_rm")):
        code, _, _, tail = measure(RLHF + [stage, "--model", MODEL, "--data", str(write_data(tmp, stage, 64)),
                                           "--max-length", "64", "--max-steps", "1", "--batch-size", "1",
                                           "--out", str(tmp / folder)], env)
        if code:
            sys.exit(f"preparing the ppo parents failed:\n{tail}")


def observed_ppo_estimate(out: Path, tmp: Path, length: int) -> float:
    """The PPO estimate redone with the longest response actually sampled instead of --max-new-tokens."""
    from rlhf_cli.core import memory

    m = json.loads((out / "rlhf_manifest.json").read_text())
    longest = max(json.loads(x)["response_length_max"] for x in (out / "metrics.jsonl").read_text().splitlines())
    tok = tokenizer()
    prompts = [json.loads(x)["prompt"] for x in (tmp / f"ppo{length}.jsonl").read_text().splitlines()]
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    prompt_len = max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    shape = memory.ModelShape.of(tmp / "ppo_sft")
    work = memory.Workload(causal=True, seq_len=prompt_len + longest, logit_len=longest,
                           frozen_params=shape.params + memory.ModelShape.of(tmp / "ppo_rm").params,
                           value_model=True)
    return memory.total(memory.estimate(shape, work, m["metrics"]["memory"]["micro_batch"])) / 1e9


def cases(only: str | None) -> None:
    env = base_env()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        todo = [c for c in CASES if only in (None, c[0])]
        if any(c[0] == "ppo" for c in todo):
            prepare_ppo_parents(tmp, env)
        print(f"{'stage':7} {'micro':>5} {'tokens':>6} {'estimate GB':>11} {'measured GB':>11} {'ratio':>6} {'s':>5}")
        ratios = []
        for i, (stage, micro, length) in enumerate(todo):
            out = tmp / f"out{i}"
            code, peak, secs, tail = measure(stage_cmd(stage, micro, length, out, tmp), env)
            if code:
                print(f"{stage:7} {micro:5} {length:6}  failed ({code}): {tail.strip().splitlines()[-1:]}")
                continue
            mem = json.loads((out / "rlhf_manifest.json").read_text())["metrics"]["memory"]
            estimate = mem["estimate_gb"]
            note = ""
            if stage == "ppo":  # the planner assumes full-length responses; also check at the lengths sampled
                estimate, note = observed_ppo_estimate(out, tmp, length), f"  (planned for full responses: " \
                                                                          f"{mem['estimate_gb']:.2f} GB)"
            ratio = peak / 1e9 / estimate
            ratios.append(ratio)
            print(f"{stage:7} {micro:5} {length:6} {estimate:11.2f} {peak / 1e9:11.2f} {ratio:6.2f} "
                  f"{secs:5.0f}{note}", flush=True)
        if ratios:
            print(f"measured / estimate: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-"
                  f"{max(ratios):.2f} ({len(ratios)} cases)")


def hh(pairs: int, only: list[str] | None = None) -> None:
    """Default `rlhf reward` on HH-RLHF pairs at max length 512: the planner's micro-batches against one pass of
    the whole batch (same effective batch 8, same seed), peak memory, time and the loss curve."""
    env = base_env()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        runs = {"planner (default)": [], "whole batch of 8 per pass": ["--micro-batch-size", "8", "--max-memory",
                                                                       "1000GB"],
                "--max-memory 4GB": ["--max-memory", "4GB"]}
        for (name, extra), key in zip(runs.items(), ("planner", "whole", "4gb"), strict=True):
            if only and key not in only:
                continue
            out = tmp / key
            cmd = RLHF + ["reward", "--model", MODEL, "--data", str(HH), "--max-samples", str(pairs),
                          "--max-length", "512", "--threads", "2", "--out", str(out), *extra]
            code, peak, secs, tail = measure(cmd, env)
            if code:
                print(f"{name}: failed ({code}) {tail.strip().splitlines()[-1:]}")
                continue
            m = json.loads((out / "rlhf_manifest.json").read_text())["metrics"]
            losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
            mem = m["memory"]
            print(f"{name:28} peak {peak / 1e9:5.2f} GB  estimate {mem['estimate_gb']:5.2f} GB  micro-batch "
                  f"{mem['micro_batch']} x {mem['grad_accum']}  {secs:5.0f} s  train loss {m['train_loss']:.4f}")
            print(f"{'':28} losses: {' '.join(f'{x:.3f}' for x in losses)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["sft", "reward", "ppo"])
    ap.add_argument("--hh", action="store_true")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--runs", default="planner,whole,4gb", help="with --hh: which of planner, whole, 4gb")
    a = ap.parse_args()
    if a.hh:
        hh(a.pairs, a.runs.split(","))
    else:
        cases(a.only)


if __name__ == "__main__":
    main()
