"""`rlhf --help` and every `rlhf COMMAND --help` against `trl --help`: median wall time, n runs interleaved.

    .venv/bin/python bench/help_latency.py [-n 10]
"""

from __future__ import annotations

import argparse

from common import BIN, ab

p = argparse.ArgumentParser()
p.add_argument("-n", type=int, default=10)
n = p.parse_args().n
trl = [str(BIN / "trl"), "--help"]
for cmd in ([], ["sft"], ["reward"], ["ppo"], ["eval", "reward"], ["eval", "policy"], ["generate"], ["chat"],
            ["report"], ["models"], ["pipeline"]):
    ab(" ".join(["rlhf", *cmd, "--help"]) + " vs trl --help", [str(BIN / "rlhf"), *cmd, "--help"], trl, n)
