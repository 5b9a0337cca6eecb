"""The Python API exactly as README.md shows it: the ```python blocks of its "Library API" section, run in order
in one namespace from a folder that looks like the repository root (its `examples/` linked in), with the tiny
model in place of the default model id in the SFT block. README and this test cannot drift apart: a block that
stops working fails here. Then the files and results the blocks produced are checked.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import EXAMPLES, ROOT

from rlhf_cli.core.args import DEFAULT_MODEL
from rlhf_cli.core.manifest import MANIFEST


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Library API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def test_readme_has_a_block_per_api_function():
    code = "\n".join(readme_blocks())
    for name in ("run_sft", "run_reward", "run_ppo", "eval_reward", "eval_policy", "run_generate", "ChatSession",
                 "make_report", "dry_run=True"):
        assert name in code, name


@pytest.mark.filterwarnings("ignore")
def test_readme_api_blocks_run_the_recipe(tiny, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(EXAMPLES.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    # One torch thread (the default is one per core): on a small shared machine, threads that fight other
    # processes are several times slower.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    blocks = readme_blocks()
    assert len(blocks) >= 6 and DEFAULT_MODEL in blocks[0]
    blocks[0] = blocks[0].replace(DEFAULT_MODEL, str(tiny))
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Library API)", "exec"), ns)

    run = tmp_path / "runs" / "api"
    assert Path(ns["sft_dir"]) == Path("runs/api/sft") and manifest(run / "sft")["metrics"]["steps"] == 4
    rm = manifest(ns["rm_dir"])
    assert rm["stage"] == "reward" and rm["parents"] == [str(Path("runs/api/sft"))] and rm["metrics"]["steps"] == 4
    ppo = manifest(ns["ppo_dir"])
    assert ppo["stage"] == "ppo" and ppo["metrics"]["updates"] == 2
    assert len((run / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2

    plan = ns["plan"]  # the dry run: 64 rows at the default batch of 8, nothing written
    assert plan.steps == 8 and plan.time.seconds > 0 and not (run / "sft-2").exists()

    explicit = sum(1 for line in (EXAMPLES / "prefs_explicit.jsonl").read_text().splitlines() if line.strip())
    assert 0 <= ns["rm_eval"]["accuracy"] <= 1 and ns["rm_eval"]["pairs"] == explicit
    assert ns["policy_eval"]["prompts"] == 4 and 0 <= ns["policy_eval"]["win_rate"] <= 1

    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(x["responses"]) == 2 for x in lines) and ns["samples"].samples == 4
    assert isinstance(ns["answer"].score, float) and ns["answer"].tokens <= 16
    assert Path(ns["report"]["report"]).resolve() == run / "report.html" and (run / "report.html").stat().st_size > 1000
