"""Interruption, faults and resume, on real processes: SIGINT, SIGTERM and SIGKILL sent to a running `rlhf`,
then the printed resume command run to the end and compared with an uninterrupted run; a model whose weights
are corrupted (NaN); a KL limit that trips; files written atomically.

Each run is the tiny model with `--threads 1`, started as `python -m rlhf_cli` in its own process.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import EXAMPLES, invoke, write_jsonl

from rlhf_cli.core.manifest import MANIFEST

SFT_DATA = EXAMPLES / "sft_messages.jsonl"
PREFS = EXAMPLES / "prefs_ranked.jsonl"


def rlhf(*args) -> list[str]:
    return [sys.executable, "-m", "rlhf_cli", *map(str, args)]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COLUMNS="400"))


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 180) -> None:
    folder, pattern = path_glob
    t0 = time.time()
    while not list(folder.glob(pattern)):
        if proc.poll() is not None:
            raise AssertionError(f"finished before {pattern} appeared: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{pattern} never appeared")
        time.sleep(0.1)


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` holds `n` lines (a running stage's metrics or output)."""
    t0 = time.time()
    while not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) < n:
        if proc.poll() is not None:
            raise AssertionError(f"finished before {path} had {n} lines: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} never reached {n} lines")
        time.sleep(0.05)


def resume_line(stderr: str) -> list[str]:
    line = " ".join(stderr.split())  # Rich may wrap
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[0] == "rlhf"
    return [sys.executable, "-m", "rlhf_cli", *cmd[1:]]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def interrupted_then_resumed(cmd: list[str], out: Path, sig: int, code: int) -> dict:
    """Start `cmd`, signal it once its second checkpoint exists, check exit code and message, resume it."""
    proc = start(cmd)
    wait_for((out.with_name(out.name + ".partial") / "trainer", "checkpoint-4/trainer_state.json"), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "resume with: rlhf" in stderr, stderr[-1500:]
    assert not out.exists()  # nothing finished yet
    again = subprocess.run(resume_line(stderr), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    return manifest(out)


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sft_signal_saves_resumes_and_matches_an_uninterrupted_run(tiny, tmp_path, sig, code):
    base = ["sft", "--model", tiny, "--data", SFT_DATA, "--max-steps", 40, "--batch-size", 2, "--max-length", 64,
            "--threads", 1, "--save-every", 2, "--eval-split", 0.1, "--lr", 1e-3]
    whole = tmp_path / "whole"
    ref = subprocess.run(rlhf(*base, "--out", whole), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    got = interrupted_then_resumed(rlhf(*base, "--out", out), out, sig, code)
    want = manifest(whole)
    assert got["metrics"]["steps"] == want["metrics"]["steps"] == 40
    for k in ("eval_loss", "last_loss", "train_loss"):
        assert close(got["metrics"][k], want["metrics"][k]), (k, got["metrics"][k], want["metrics"][k])
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 41))  # one log line per step, none lost or repeated across the resume
    assert not (out / "trainer").exists() and not (out / "resume.json").exists()


def test_reward_sigterm_resumes_to_the_same_model(tiny, tmp_path):
    base = ["reward", "--model", tiny, "--data", PREFS, "--max-steps", 24, "--batch-size", 4, "--max-length", 64,
            "--threads", 1, "--save-every", 2, "--eval-split", 0.2, "--lr", 1e-3]
    whole = tmp_path / "whole"
    ref = subprocess.run(rlhf(*base, "--out", whole), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    got = interrupted_then_resumed(rlhf(*base, "--out", out), out, signal.SIGTERM, 143)
    want = manifest(whole)
    for k in ("eval_accuracy", "eval_mean_margin", "train_loss"):
        assert close(got["metrics"][k], want["metrics"][k]), (k, got["metrics"][k], want["metrics"][k])


def test_sigkill_leaves_the_last_periodic_checkpoint_usable(tiny, tmp_path):
    out = tmp_path / "killed"
    cmd = rlhf("sft", "--model", tiny, "--data", SFT_DATA, "--max-steps", 40, "--batch-size", 2, "--max-length", 64,
               "--threads", 1, "--save-every", 3, "--out", out)
    proc = start(cmd)
    wait_for((out.with_name("killed.partial") / "trainer", "checkpoint-6/trainer_state.json"), proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr and manifest(out)["metrics"]["steps"] == 40


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tiny, tmp_path):
    out = tmp_path / "r"
    args = ["sft", "--model", tiny, "--data", SFT_DATA, "--max-length", 64, "--threads", 1, "--out", out]
    r = invoke(*args, "--resume")
    assert r.exit_code == 2 and "--resume: no complete checkpoint" in r.stderr
    proc = start(rlhf(*args, "--max-steps", 30, "--batch-size", 2, "--save-every", 2))
    wait_for((out.with_name("r.partial") / "trainer", "checkpoint-2/trainer_state.json"), proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    r = invoke(*args, "--max-steps", 30, "--batch-size", 4, "--resume")
    assert r.exit_code == 2 and "--batch-size 4: the run being resumed used 2" in r.stderr, r.stderr
    assert (out.with_name("r.partial") / "trainer").is_dir()  # the checkpoint is still there to resume


def ppo_parents(tiny: Path, tmp: Path) -> tuple[Path, Path]:
    run = tmp / "run"
    invoke("sft", "--model", tiny, "--data", SFT_DATA, "--run", run, "--max-steps", 1, "--batch-size", 2,
           "--max-length", 64, "--threads", 1, check=True)
    invoke("reward", "--run", run, "--data", PREFS, "--max-steps", 1, "--batch-size", 2, "--threads", 1,
           check=True)
    return run / "sft", run / "reward"


def test_ppo_sigint_checkpoints_and_resumes(tiny, tmp_path):
    sft, rm = ppo_parents(tiny, tmp_path)
    out = tmp_path / "ppo"
    cmd = rlhf("ppo", "--policy", sft, "--reward", rm, "--prompts", EXAMPLES / "prompts.jsonl", "--out", out,
               "--max-steps", 40, "--batch-size", 2, "--max-new-tokens", 8, "--threads", 1, "--sample-every", 0)
    proc = start(cmd)
    wait_lines(out.with_name("ppo.partial") / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped by SIGINT after update" in " ".join(stderr.split())
    summary = json.loads((out.with_name("ppo.partial") / "state" / "state.json").read_text())
    again = subprocess.run(resume_line(stderr), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from update {summary['step']}" in " ".join(again.stderr.split())
    assert manifest(out)["metrics"]["updates"] == 40


def test_generate_sigint_keeps_whole_lines_and_the_same_command_finishes(tiny, tmp_path):
    out = tmp_path / "samples.jsonl"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about the number {i}."}
                                                 for i in range(60)])
    cmd = rlhf("generate", tiny, "--prompts", prompts, "--out", out, "-k", 2, "--batch-size", 2,
               "--max-new-tokens", 24, "--threads", 1)
    proc = start(cmd)
    wait_lines(out, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) < 60 and all(json.loads(x)["responses"] for x in lines)
    again = subprocess.run(resume_line(stderr), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 60


def test_nan_weights_stop_with_one_clear_line_and_nothing_finished(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan_model"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(bad)
    out = tmp_path / "out"
    r = subprocess.run(rlhf("sft", "--model", bad, "--data", SFT_DATA, "--max-steps", 3, "--batch-size", 2,
                            "--max-length", 64, "--threads", 1, "--out", out), capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, COLUMNS="400"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "is nan at step 1" in errors[0] and "diverged" in errors[0], r.stderr
    assert not out.exists()


def test_max_kl_stops_ppo_as_runaway(tiny, tmp_path):
    sft, rm = ppo_parents(tiny, tmp_path)
    out = tmp_path / "ppo"
    r = invoke("ppo", "--policy", sft, "--reward", rm, "--prompts", EXAMPLES / "prompts.jsonl", "--out", out,
               "--max-steps", 6, "--batch-size", 2, "--max-new-tokens", 8, "--threads", 1, "--lr", 1e-2,
               "--max-kl", 1e-6, "--save-every", 1)
    assert r.exit_code == 1, r.stderr
    msg = " ".join(r.stderr.split())
    assert "above --max-kl 1e-06 (runaway optimisation)" in msg and "training stopped" in msg, msg
    assert not out.exists()


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    """A failure between writing and renaming (a full disk, a crash) leaves the old file whole and no debris."""
    from rlhf_cli.core import files

    target = tmp_path / "rlhf_manifest.json"
    files.atomic_write_text(target, "old\n")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError):
        files.atomic_write_text(target, "new and much longer\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_grpo_sigterm_checkpoints_and_resumes(tiny, tmp_path):
    sft, rm = ppo_parents(tiny, tmp_path)
    out = tmp_path / "grpo"
    cmd = rlhf("ppo", "--algo", "grpo", "--policy", sft, "--reward", rm, "--prompts", EXAMPLES / "prompts.jsonl",
               "--out", out, "--max-steps", 30, "--batch-size", 4, "--group-size", 2, "--max-new-tokens", 8,
               "--threads", 1, "--micro-batch-size", 2)
    proc = start(cmd)
    wait_lines(out.with_name("grpo.partial") / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM at step" in " ".join(stderr.split())
    again = subprocess.run(resume_line(stderr), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step" in " ".join(again.stderr.split()) and manifest(out)["metrics"]["updates"] == 30
    mem = manifest(out)["metrics"]["memory"]  # TRL trained each batch of 4 in accumulated micro-batches of 2
    assert (mem["micro_batch"], mem["grad_accum"]) == (2, 2)
