"""Helpers for the benchmarks: interleaved wall-clock timing of whole commands, medians and ratios."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared" / "data"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")


def measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run one command with its stdout and stderr in `log` (exit with the log's tail when it fails): its wall
    seconds and its peak resident memory in GiB, from the kernel's account of that child (wait4)."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"benchmark command failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return dt, usage.ru_maxrss / 2**20


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def run(cmd: list[str], quiet: bool = True) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, stdout=subprocess.DEVNULL if quiet else None,
                       stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"benchmark command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dt


def ab(name: str, a: list[str], b: list[str], n: int, warmup: int = 1, setup=None) -> dict:
    """Run A and B alternately n times (after warm-up); report medians and the median of pairwise ratios A/B."""
    for _ in range(warmup):
        if setup:
            setup()
        run(a)
        if setup:
            setup()
        run(b)
    ta, tb = [], []
    for _ in range(n):
        if setup:
            setup()
        ta.append(run(a))
        if setup:
            setup()
        tb.append(run(b))
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    res = {"name": name, "a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "n": n}
    print(f"{name}: A median {res['a_median_s']:.3f}s  B median {res['b_median_s']:.3f}s  "
          f"A/B median {res['ratio_median']:.3f} (min {res['ratio_min']:.3f}, max {res['ratio_max']:.3f}, n={n})",
          flush=True)
    return res
