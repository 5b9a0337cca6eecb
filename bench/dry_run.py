"""`--dry-run`'s time estimate against the real run of the same command: the estimate (in this process, as the CLI
makes it), then the stage itself in a child process, then the training time its manifest records.

    .venv/bin/python bench/dry_run.py sft --config examples/configs/demo_sft.yaml
    .venv/bin/python bench/dry_run.py reward --config examples/configs/demo_reward.yaml --run runs/demo
    .venv/bin/python bench/dry_run.py ppo --config examples/configs/demo_ppo.yaml --run runs/demo

The stage writes into a temporary run folder unless --run or --out is given (then pass a folder whose stage
output does not exist yet, or --overwrite).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from common import BIN, measured

from rlhf_cli.core.config import resolve
from rlhf_cli.core.progress import Quiet

STAGES = {"sft": ("rlhf_cli.stages.sft.args", "SFTArgs", "rlhf_cli.stages.sft.train", "run_sft"),
          "reward": ("rlhf_cli.stages.reward.args", "RewardArgs", "rlhf_cli.stages.reward.train", "run_reward"),
          "ppo": ("rlhf_cli.stages.ppo.args", "PPOArgs", "rlhf_cli.stages.ppo.train", "run_ppo")}


def main() -> None:
    import importlib

    stage, flags = sys.argv[1], sys.argv[2:]
    tmp = Path(tempfile.mkdtemp(prefix="dry_run_bench_"))
    if "--run" not in flags and "--out" not in flags:
        flags += ["--out", str(tmp / stage)]
    args_mod, args_name, run_mod, run_name = STAGES[stage]
    pairs = dict(zip(flags[::2], flags[1::2], strict=False))
    config = pairs.pop("--config", None)
    args = resolve(getattr(importlib.import_module(args_mod), args_name), config,
                   {k.removeprefix("--").replace("-", "_"): v for k, v in pairs.items() if k != "--overwrite"})
    args.dry_run = True
    reporter = Quiet()
    getattr(importlib.import_module(run_mod), run_name)(args, reporter)
    planned = reporter.planned
    wall, _ = measured([str(BIN / "rlhf"), stage, *flags], tmp / "log.txt")
    m = json.loads((planned.out / "rlhf_manifest.json").read_text())["metrics"]
    trained = m.get("train_seconds") or (m.get("seconds_per_update", 0) * m.get("updates", 0))
    print(f"{stage}: estimated {planned.time.seconds:.1f} s; measured {trained:.1f} s of training "
          f"({wall:.1f} s whole command); estimate / training = {planned.time.seconds / trained:.2f}")
    print(f"how: {planned.time.how}")


if __name__ == "__main__":
    main()
