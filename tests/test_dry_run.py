"""`--dry-run` on sft, reward and ppo (every --algo): the plan is printed, exit 0, no weight is read, nothing is
written; bad input still gives its one error line; the settings table says where each value came from; the
step count is the one a real run takes. Also shell completion (`--show-completion`, Click's env-var protocol).

The parent stages here are the tiny model with a manifest written next to it (and, for the reward stage, a
one-output sequence classifier built from its config): the checks before weights load need only the folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import EXAMPLES, ROOT, invoke, ok, one_error

from rlhf_cli.core.manifest import MANIFEST, write_manifest
from rlhf_cli.core.progress import Quiet

SFT_DATA = EXAMPLES / "sft_messages.jsonl"
PREFS = EXAMPLES / "prefs_ranked.jsonl"
PROMPTS = EXAMPLES / "prompts.jsonl"


def rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.fixture
def no_weights(monkeypatch):
    """Every model load in transformers goes through PreTrainedModel.from_pretrained: record and refuse it."""
    from transformers import PreTrainedModel

    calls = []

    def refuse(cls, *a, **kw):
        calls.append((cls.__name__, a))
        raise AssertionError(f"weights loaded during a dry run: {cls.__name__}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    return calls


def as_stage(src: Path, dest: Path, stage: str, **args) -> Path:
    shutil.copytree(src, dest)
    write_manifest(dest, stage=stage, parents=[str(src)], args=args, data={}, metrics={}, started=time.time())
    return dest


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """A run folder with a finished-looking sft stage (the tiny model) and reward stage (a one-output
    classifier of the same shape, random weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("run")
    as_stage(tiny, folder / "sft", "sft", max_length=256)
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg)
    (folder / "reward").mkdir()
    rm.save_pretrained(folder / "reward")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder / "reward")
    write_manifest(folder / "reward", stage="reward", parents=[str(folder / "sft")], args={"max_length": 256},
                   data={}, metrics={}, started=time.time())
    return folder


def cells(stdout: str, settings: bool = False) -> dict[str, list[str]]:
    """The rows of the plan table (or of the settings table): first cell -> the other cells, each cell's wrapped
    lines joined."""
    plan, _, rest = stdout.partition(" settings (defaults < --config < flags)")
    table: dict[str, list[str]] = {}
    key = None
    for line in (rest if settings else plan).splitlines():
        if line.count("│") < 3:
            continue
        parts = [c.strip() for c in line.split("│")[1:-1]]
        if parts[0]:
            key = parts[0]
            table[key] = parts[1:]
        elif key is not None:  # a wrapped cell goes on below its row, with the first cell empty
            table[key] = [" ".join(x for x in (old, new) if x) for old, new in zip(table[key], parts[1:],
                                                                                   strict=True)]
    return table


def assert_plan(result, steps: str) -> dict[str, list[str]]:
    ok(result)
    assert "dry run: the plan" in result.stdout
    plan = {k: v[0] for k, v in cells(result.stdout).items()}
    for row in ("optimisation steps", "tokens per epoch", "memory", "estimated time", "output"):
        assert row in plan, (row, plan)
    assert "estimated peak" in plan["memory"] and "GFLOP" in plan["estimated time"]
    assert plan["estimated time"].startswith("about ") and "an estimate" in plan["estimated time"]
    assert plan["output"].endswith("(not created: dry run, no weights loaded)")
    assert plan["optimisation steps"].startswith(steps), plan["optimisation steps"]
    return plan


def test_sft_dry_run_loads_no_weights_and_writes_nothing(tiny, tmp_path, no_weights):
    plan = assert_plan(invoke("sft", "--model", tiny, "--data", SFT_DATA, "--run", tmp_path / "r", "--batch-size",
                              "4", "--threads", "1", "--dry-run"), steps=f"{math.ceil(rows(SFT_DATA) / 4)} ")
    assert f"{rows(SFT_DATA)} rows kept" in plan["data"] and plan["token lengths"].startswith("min ")
    assert plan["tokens per epoch"].isdigit() and int(plan["tokens per epoch"]) > rows(SFT_DATA) * 10
    assert no_weights == []
    assert not (tmp_path / "r").exists()


def test_corrupt_weights_dry_run_fine_real_run_fails(tiny, tmp_path):
    """The dry run reads no weight file: with model.safetensors replaced by garbage it still plans (the parameter
    count then comes from the config), and the real run of the same command fails at loading."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    flags = ["sft", "--model", broken, "--data", SFT_DATA, "--out", tmp_path / "out", "--max-steps", "1",
             "--batch-size", "2", "--threads", "1"]
    assert_plan(invoke(*flags, "--dry-run"), steps="1 ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    real = invoke(*flags)
    assert real.exit_code != 0 and not (tmp_path / "out").exists()


def test_reward_dry_run_counts_whole_prompt_batches(run, tmp_path, no_weights):
    out = tmp_path / "rm"
    # 52 ranked prompts; each prompt's pairs share a batch, so the steps are the packed batches, not pairs / 8
    result = invoke("reward", "--model", run / "sft", "--data", PREFS, "--out", out, "--threads", "1", "--dry-run")
    plan = assert_plan(result, steps="")
    assert "inherited max_length=256" in result.stderr
    value, source = cells(result.stdout, settings=True)["max_length"]
    assert value == "256" and source.replace(" ", "") == f"parentstage{run / 'sft'}"  # (a wrapped path)
    assert plan["pairs"].endswith("pairs from 52 prompts, grouped by prompt")
    pairs = int(plan["pairs"].split()[0])
    assert int(plan["optimisation steps"].split()[0]) > math.ceil(pairs / 8)  # whole prompts: some batches not full
    assert no_weights == [] and not out.exists()


@pytest.mark.parametrize("algo,extra,steps", [
    ("ppo", [], math.ceil(rows(PROMPTS) / 4)),
    ("grpo", ["--group-size", "2"], math.ceil(rows(PROMPTS) * 2 / 4)),
    ("rloo", ["--group-size", "2"], math.ceil(rows(PROMPTS) * 2 / 4)),
])
def test_ppo_dry_run_every_algo(run, no_weights, algo, extra, steps):
    plan = assert_plan(invoke("ppo", "--run", run, "--prompts", PROMPTS, "--algo", algo, "--batch-size", "4",
                              "--max-new-tokens", "8", "--threads", "1", "--dry-run", *extra), steps=f"{steps} updates")
    assert plan["algorithm"] == algo and "generated tokens" in plan["estimated time"]
    assert plan["tokens generated"].startswith(f"up to {steps * 4 * 8} ")
    assert no_weights == []
    assert not (run / "ppo").exists() and not (run / "ppo.partial").exists()


@pytest.mark.parametrize("method,unit", [("dpo", "pairs"), ("kto", "rows")])
def test_dpo_dry_run(run, tmp_path, no_weights, method, unit):
    out = tmp_path / "dpo"
    plan = assert_plan(invoke("dpo", "--model", run / "sft", "--data", PREFS, "--out", out, "--method", method,
                              "--batch-size", "4", "--threads", "1", "--dry-run"), steps="")
    assert plan["method"].startswith(method) and f"effective batch 4 {unit}" in plan["optimisation steps"]
    assert no_weights == [] and not out.exists() and not out.with_name("dpo.partial").exists()


def test_dpo_dry_run_counts_the_reference_once_when_precomputed(run, tmp_path, no_weights):
    """3 epochs: the reference's forward FLOPs are one epoch's with --precompute-ref (the default) and three
    epochs' with --no-precompute-ref; the training FLOPs are the same."""
    def flops(*flag: str) -> tuple[float, float]:
        plan = assert_plan(invoke("dpo", "--model", run / "sft", "--data", PREFS, "--out", tmp_path / "o",
                                  "--epochs", "3", "--batch-size", "4", "--threads", "1", "--dry-run", *flag), steps="")
        scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
        found = re.findall(r"([\d.]+) ([kMGTP]?)FLOP (of training|forward-only)", plan["estimated time"])
        return tuple(float(x) * scale[unit] for x, unit, _ in found)  # (training, forward-only)

    train_once, forward_once = flops()
    train_every, forward_every = flops("--no-precompute-ref")
    assert train_once == train_every
    assert forward_every == pytest.approx(3 * forward_once, rel=0.02)
    assert no_weights == []


def test_best_of_n_dry_run(run, tmp_path, no_weights):
    out = tmp_path / "bon"
    plan = assert_plan(invoke("best-of-n", "--run", run, "--prompts", PROMPTS, "-k", "3", "--max-new-tokens", "8",
                              "--batch-size", "4", "--out", out, "--threads", "1", "--dry-run"),
                       steps=f"at most {math.ceil(rows(PROMPTS) / 4)} ")
    assert plan["answers sampled"].startswith(f"{rows(PROMPTS) * 3} ")
    assert "generated tokens" in plan["estimated time"]
    assert no_weights == [] and not out.exists() and not out.with_name("bon.partial").exists()
    tokens = int(plan["tokens per epoch"].split()[0])
    # --objective dpo --pairs all: up to K(K-1)/2 = 3 pairs per prompt
    plan = assert_plan(invoke("best-of-n", "--run", run, "--prompts", PROMPTS, "-k", "3", "--max-new-tokens", "8",
                              "--batch-size", "4", "--out", out, "--threads", "1", "--dry-run", "--objective", "dpo",
                              "--pairs", "all"),
                       steps=f"at most {math.ceil(rows(PROMPTS) * 3 / 4)} ")
    assert f"over at most {rows(PROMPTS) * 3} kept pairs" in plan["optimisation steps"]
    assert int(plan["tokens per epoch"].split()[0]) == 3 * tokens
    assert no_weights == [] and not out.exists()


def test_bad_input_is_still_one_error_line(run, tmp_path, no_weights):
    missing = tmp_path / "missing.jsonl"
    one_error(invoke("sft", "--model", run / "sft", "--data", missing, "--out", tmp_path / "o", "--dry-run"), 1,
              str(missing))
    one_error(invoke("dpo", "--model", run / "reward", "--data", PREFS, "--out", tmp_path / "o", "--dry-run"),
              1, "is a reward stage", "rlhf sft")
    one_error(invoke("best-of-n", "--policy", run / "sft", "--reward", run / "sft", "--prompts", PROMPTS, "--out",
                     tmp_path / "o", "--dry-run"), 1, "is an sft stage", "rlhf reward")
    one_error(invoke("ppo", "--policy", run / "reward", "--reward", run / "reward", "--prompts", PROMPTS, "--out",
                     tmp_path / "o", "--dry-run"), 1, "is a reward stage", "rlhf sft")
    one_error(invoke("ppo", "--run", tmp_path / "empty", "--prompts", PROMPTS, "--dry-run"), 1, "no such folder",
              "rlhf sft")
    assert not (tmp_path / "o").exists() and no_weights == []


def test_yaml_and_flag_precedence_in_the_settings_table(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1.0e-4\nbatch_size: 4\nseed: 7\n", encoding="utf-8")
    r = ok(invoke("sft", "--config", cfg, "--model", tiny, "--data", SFT_DATA, "--out", tmp_path / "o",
                  "--batch-size", "2", "--threads", "1", "--dry-run"))
    lines = cells(r.stdout, settings=True)
    assert lines["batch_size"] == ["2", "flag --batch-size"]  # a flag beats the YAML file
    assert lines["lr"] == ["0.0001", "--config c.yaml"]  # the YAML file beats the default
    assert lines["seed"] == ["7", "--config c.yaml"]
    assert lines["epochs"] == ["1.0", "default"]
    assert lines["max_length"] == ["1024", "stage default"]  # no parent stage to inherit from
    assert cells(r.stdout)["optimisation steps"][0].startswith(f"{math.ceil(rows(SFT_DATA) / 2)} ")


def test_dry_run_steps_match_the_real_run(tiny, tmp_path):
    """Through the library: the plan's steps and output folder are the real run's."""
    from rlhf_cli import SFTArgs, run_sft

    args = dict(model=str(tiny), data=str(SFT_DATA), out=str(tmp_path / "sft"), max_samples=10, batch_size=4,
                threads=1, epochs=1.0)
    reporter = Quiet()
    planned = run_sft(SFTArgs(**args, dry_run=True), reporter)
    assert planned == tmp_path / "sft" and not planned.exists()
    assert reporter.planned.steps == math.ceil(10 / 4) and reporter.planned.time.seconds > 0
    done = run_sft(SFTArgs(**args), Quiet())
    m = json.loads((done / MANIFEST).read_text(encoding="utf-8"))
    assert done == planned and m["metrics"]["steps"] == reporter.planned.steps
    assert m["args"]["dry_run"] is False


def test_dry_run_flag_is_in_every_training_help():
    for command in ("sft", "reward", "ppo"):
        assert "--dry-run" in ok(invoke(command, "--help")).stdout


# ---------------------------------------------------------------------------------------------------------
# Shell completion


def rlhf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_show_completion_prints_a_script_for_each_shell():
    r = rlhf("--show-completion", "bash")  # named: detection needs a shell above the test process
    assert r.returncode == 0 and "_RLHF_COMPLETE=complete_" in r.stdout, (r.stdout, r.stderr)
    assert "--install-completion" in ok(invoke("--help")).stdout
    scripts = {shell: rlhf(env={"_RLHF_COMPLETE": f"source_{shell}"}).stdout for shell in ("bash", "zsh", "fish")}
    assert "_RLHF_COMPLETE=complete_bash" in scripts["bash"] and "complete -o default -F _rlhf_completion rlhf" \
        in scripts["bash"]
    assert scripts["zsh"].lstrip().startswith("#compdef rlhf") and "complete_zsh" in scripts["zsh"]
    assert scripts["fish"].startswith("complete --command rlhf") and "complete_fish" in scripts["fish"]


def test_completion_protocol_completes_commands_and_flags():
    r = rlhf(env={"_RLHF_COMPLETE": "complete_bash", "COMP_WORDS": "rlhf s", "COMP_CWORD": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["sft"], (r.stdout, r.stderr)
    r = rlhf(env={"_RLHF_COMPLETE": "complete_bash", "COMP_WORDS": "rlhf ppo --dry", "COMP_CWORD": "2"})
    assert r.stdout.split() == ["--dry-run"], (r.stdout, r.stderr)
    r = rlhf(env={"_RLHF_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "rlhf eval p"})
    assert '"policy"' in r.stdout and '"reward"' not in r.stdout, r.stdout
