"""Our PPO with and without the shared frozen trunk (`--shared-trunk`, on by default with --freeze-layers): the
demo's stage 3 (examples/configs/demo_ppo.yaml: the lowest 20 of 30 layers frozen) for a few updates, the two
variants in turn (A B A B ...) so a drifting machine affects both alike; or with --parallel both at once, one
thread each, so whatever else runs on the machine slows both alike.

Printed: per variant the median seconds per update and of each phase (generate, score, forward, train) over
every update after the first of each run, and the ratio without/with; then whether both variants reached the
same figures (they run the same seeds: the scores and KL of every update should agree to rounding).

    .venv/bin/python bench/ppo_trunk.py [--run runs/demo] [--updates 3] [--pairs 2] [--threads N] [--parallel]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import BIN, jsonl, measured  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="run folder with sft and reward stages")
p.add_argument("--updates", type=int, default=3)
p.add_argument("--pairs", type=int, default=2)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--parallel", action="store_true", help="run the two variants of a pair at once, 1 thread each")
p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo_trunk"))
a = p.parse_args()

run, out = Path(a.run), Path(a.out)
for d in (run / "sft", run / "reward"):
    if not (d / "rlhf_manifest.json").is_file():
        sys.exit(f"{d}: no finished stage here; run `make demo` first (or pass --run DIR with sft and reward)")
out.mkdir(parents=True, exist_ok=True)

VARIANTS = {"full passes": "--no-shared-trunk", "shared trunk": "--shared-trunk"}
PHASES = ("update", "generate", "score", "forward", "train")
times: dict[str, dict[str, list[float]]] = {v: {k: [] for k in PHASES} for v in VARIANTS}
walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
figures: dict[str, list[dict]] = {}


def command(flag: str, dest: Path, threads: int | None) -> list[str]:
    return [str(BIN / "rlhf"), "ppo", "--config", str(ROOT / "examples" / "configs" / "demo_ppo.yaml"),
            "--policy", str(run / "sft"), "--reward", str(run / "reward"), "--out", str(dest), "--overwrite",
            "--max-steps", str(a.updates), "--sample-every", "0", "--save-every", "0", flag,
            *(["--threads", str(threads)] if threads else [])]


def collect(name: str, dest: Path, wall: float) -> None:
    walls[name].append(wall)
    rows = jsonl(dest / "metrics.jsonl")
    figures.setdefault(name, rows)
    for r in rows[1:]:  # the first update of a run warms up allocators and caches
        for k in PHASES:
            times[name][k].append(r[f"time/{k}"])


for i in range(a.pairs):
    dests = {name: out / f"{flag.strip('-')}-{i}" for name, flag in VARIANTS.items()}
    if a.parallel:
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(measured, command(flag, dests[name], 1), out / f"{dests[name].name}.log")
                       for name, flag in VARIANTS.items()}
            for name, f in futures.items():
                collect(name, dests[name], f.result()[0])
        continue
    for name, flag in VARIANTS.items():
        cmd = command(flag, dests[name], a.threads)
        print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        wall, _ = measured(cmd, out / f"{dests[name].name}.log")
        collect(name, dests[name], wall)

med = {v: {k: statistics.median(t[k]) for k in PHASES} for v, t in times.items()}
how = "both at once, 1 thread each" if a.parallel else "in turn"
print(f"\n{a.pairs} runs of each ({how}), {a.updates} updates per run (medians over updates 2..{a.updates})\n")
print("| seconds | " + " | ".join(PHASES) + " | whole process |")
print("|---|" + "---:|" * (len(PHASES) + 1))
for v in VARIANTS:
    print(f"| {v} | " + " | ".join(f"{med[v][k]:.1f}" for k in PHASES) + f" | {statistics.median(walls[v]):.0f} |")
base, new = "full passes", "shared trunk"
print("| ratio full/shared | " + " | ".join(f"{med[base][k] / med[new][k]:.2f}" for k in PHASES)
      + f" | {statistics.median(walls[base]) / statistics.median(walls[new]):.2f} |")
same = max(abs(x[k] - y[k]) for x, y in zip(figures[base], figures[new], strict=True) for k in ("score_mean", "kl"))
print(f"\nlargest difference in an update's mean score or KL between the variants: {same:.2g}")
