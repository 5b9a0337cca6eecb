"""`--precision auto` by measurement: the decision from injected timings, the probe's cache, overrides, the real
probe on this machine, bf16 autocast training that matches fp32 and keeps fp32 master weights, and `rlhf env`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, build_tiny, invoke, ok, one_error, stage, token_rm, write_jsonl

from rlhf_cli.core import linear_kernels, precision, runtime
from rlhf_cli.core.errors import ConfigError


@pytest.fixture(autouse=True)
def no_forced_precision(monkeypatch):
    monkeypatch.delenv(precision.ENV_PRECISION, raising=False)


def probe_of(fp32: float, bf16: float) -> precision.Probe:
    return precision.Probe(cpu="Test CPU", flags=["avx2"], threads=2, torch=torch.__version__, fp32_flops=fp32,
                           bf16_flops=bf16)


def fixed(fp32: float, bf16: float):
    return lambda threads=None: probe_of(fp32, bf16)


# ---------------------------------------------------------------------------------------------------------
# the decision


def test_auto_picks_bf16_only_at_or_above_the_threshold():
    fast = precision.choose("auto", gpu=False, probe_fn=fixed(10e9, 31e9))
    assert (fast.precision, fast.reason) == ("bf16", "auto: bf16 measured 3.1x fp32 here")
    slow = precision.choose("auto", gpu=False, probe_fn=fixed(10e9, 2e9))
    assert (slow.precision, slow.reason) == ("fp32", "auto: fp32, bf16 0.2x fp32 here")
    at = precision.BF16_MIN_RATIO
    assert precision.choose("auto", gpu=False, probe_fn=fixed(10e9, 10e9 * at)).precision == "bf16"
    assert precision.choose("auto", gpu=False, probe_fn=fixed(10e9, 10e9 * at * 0.99)).precision == "fp32"


def test_explicit_flag_and_environment_override_auto(monkeypatch):
    def never(threads=None):
        raise AssertionError("an explicit precision must not measure")

    assert precision.choose("fp32", gpu=False, probe_fn=never) == precision.Choice("fp32", "--precision fp32")
    assert precision.choose("bf16", gpu=False, probe_fn=never).precision == "bf16"
    assert precision.choose("fp16", gpu=True, probe_fn=never).precision == "fp16"
    monkeypatch.setenv(precision.ENV_PRECISION, "bf16")
    env = precision.choose("auto", gpu=False, probe_fn=never)
    assert (env.precision, env.reason) == ("bf16", "RLHF_PRECISION=bf16")
    assert precision.choose("fp32", gpu=False, probe_fn=never).precision == "fp32"  # the flag beats the variable
    monkeypatch.setenv(precision.ENV_PRECISION, "half")
    with pytest.raises(ConfigError, match="RLHF_PRECISION=half: not a precision; expected one of fp32, bf16, fp16"):
        precision.choose("auto", gpu=False, probe_fn=never)


def test_gpu_keeps_its_rule_without_measuring():
    def never(threads=None):
        raise AssertionError("a GPU must not run the CPU probe")

    assert precision.choose("auto", gpu=True, bf16_supported=lambda: True, probe_fn=never).precision == "bf16"
    assert precision.choose("auto", gpu=True, bf16_supported=lambda: False, probe_fn=never).precision == "fp16"


# ---------------------------------------------------------------------------------------------------------
# the probe and its cache


class Timer:
    def __init__(self, fp32: float, bf16: float):
        self.speeds, self.calls = {"fp32": fp32, "bf16": bf16}, []

    def __call__(self, dtype: str) -> float:
        self.calls.append(dtype)
        return self.speeds[dtype]


def test_probe_is_cached_per_cpu_torch_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    timer = Timer(20e9, 50e9)
    first = precision.probe(2, measure=timer)
    assert timer.calls == ["fp32", "bf16"] and not first.cached
    assert first.ratio == pytest.approx(2.5) and first.bf16_fast
    again = precision.probe(2, measure=timer)
    assert timer.calls == ["fp32", "bf16"] and again.cached  # read, not timed
    assert (again.fp32_flops, again.bf16_flops) == (20e9, 50e9)
    saved = json.loads((tmp_path / "precision_probe.json").read_text())
    cpu, _ = precision.cpu_info()
    assert list(saved) == [precision.cache_key(cpu, torch.__version__, 2)]
    precision.probe(1, measure=timer)  # another thread count is another measurement
    assert timer.calls == ["fp32", "bf16"] * 2
    precision.probe(2, measure=timer, refresh=True)
    assert len(timer.calls) == 6


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": 3}', ""])
def test_a_corrupt_cache_is_measured_again(tmp_path, monkeypatch, content):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    (tmp_path / "precision_probe.json").write_text(content)
    cpu, _ = precision.cpu_info()
    if content.startswith('{"k"'):  # an entry under this machine's key, of the wrong shape
        (tmp_path / "precision_probe.json").write_text(
            json.dumps({precision.cache_key(cpu, torch.__version__, 2): {"cpu": cpu, "fp32": 1}}))
    timer = Timer(10e9, 2e9)
    found = precision.probe(2, measure=timer)
    assert timer.calls == ["fp32", "bf16"] and found.ratio == pytest.approx(0.2)
    assert precision.probe(2, measure=timer).cached  # and the file is sound again


def test_this_machine_auto_agrees_with_its_measured_ratio():
    """Whatever this CPU is, `auto` picks bf16 exactly when its own measured ratio reaches the threshold (on an
    AVX2-only CPU bf16 is emulated: a ratio far below 1, so fp32)."""
    found = precision.probe(torch.get_num_threads())
    assert found.fp32_flops > 0 and found.bf16_flops > 0
    choice = runtime.precision_choice("auto")
    if not runtime.has_gpu():
        assert choice.precision == ("bf16" if found.ratio >= precision.BF16_MIN_RATIO else "fp32")
        assert f"{found.ratio:.2g}x" in choice.reason or f"{found.ratio:.1f}x" in choice.reason
    if "avx512_bf16" not in found.flags and "amx_bf16" not in found.flags:
        assert found.ratio < 1.0  # emulated bf16 is slower than fp32


def test_probe_takes_well_under_two_seconds(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    precision.probe(torch.get_num_threads())
    assert time.perf_counter() - t0 < 5.0  # ~1 s alone; a shared machine gets some slack


def test_weight_and_compute_dtypes_on_the_cpu():
    if runtime.has_gpu():
        pytest.skip("the CPU split")
    assert runtime.weight_dtype("bf16") == torch.float32  # master weights
    assert runtime.weight_dtype("bf16", trained=False) == torch.bfloat16  # run-only models
    assert runtime.compute_dtype("bf16") == torch.bfloat16
    layer = torch.nn.Linear(4, 4)
    with runtime.autocast("bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with runtime.autocast("fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# training under bf16 autocast


def losses(folder: Path) -> list[float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "rlhf_manifest.json").read_text())


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(folder / "model.safetensors").values()}


def test_sft_bf16_autocast_matches_fp32_and_keeps_fp32_weights(tiny, tmp_path):
    """Four steps of SFT on the tiny model: the bf16-autocast loss curve stays within 2% of fp32's at every
    step (bf16 keeps 8 bits of mantissa: ~0.4% per rounding, and the loss here is ~10 nats), and the weights the
    optimiser updated, and that are saved, are fp32."""
    common = ["sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--max-length", 48,
              "--max-steps", 4, "--batch-size", 2, "--logging-steps", 1, "--threads", 1, "--lr", "1e-3"]
    ok(invoke(*common, "--precision", "fp32", "--out", tmp_path / "fp32"))
    result = ok(invoke(*common, "--precision", "bf16", "--out", tmp_path / "bf16"))
    assert "bf16 (--precision bf16)" in result.stderr  # the setup line says what and why
    full, mixed = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(full) == len(mixed) == 4
    assert full[-1] < full[0]  # it learns
    for a, b in zip(full, mixed, strict=True):
        assert abs(a - b) <= 0.02 * abs(a), (full, mixed)
    assert full != mixed  # autocast did compute in bf16
    m = manifest(tmp_path / "bf16")["metrics"]
    assert (m["precision"], m["precision_reason"]) == ("bf16", "--precision bf16")
    if not runtime.has_gpu():
        assert stored_dtypes(tmp_path / "bf16") == {torch.float32}


def test_ppo_under_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    root = tmp_path / "run"
    policy = stage(build_tiny(root / "sft"), "sft", max_length=128)
    token_rm(root / "reward", policy, lambda tok: tok.convert_tokens_to_ids("ĠThe"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    out = tmp_path / "ppo"
    result = ok(invoke("ppo", "--run", root, "--prompts", prompts, "--out", out, "--max-steps", 1, "--batch-size",
                       4, "--num-minibatches", 2, "--threads", 1, "--max-new-tokens", 4, "--sample-every", 0,
                       "--precision", "bf16"))
    assert "bf16 (--precision bf16)" in result.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 1 and math.isfinite(rows[0]["policy_loss"])
    # rollout and training passes both under autocast: the first minibatch sees exactly the rollout policy
    assert rows[0]["check/first_logratio_max"] < 1e-5
    m = manifest(out)["metrics"]
    assert (m["precision"], m["precision_reason"]) == ("bf16", "--precision bf16")
    if not runtime.has_gpu():
        assert stored_dtypes(out) == {torch.float32}
        assert stored_dtypes(out / "value") == {torch.float32}


@pytest.mark.parametrize("forced", [None, "bf16"])
def test_dry_run_shows_the_choice_its_reason_and_times_that_dtype(tiny, tmp_path, monkeypatch, forced):
    from rlhf_cli.core.progress import Quiet
    from rlhf_cli.stages.sft.args import SFTArgs
    from rlhf_cli.stages.sft.train import run_sft

    if forced:
        monkeypatch.setenv(precision.ENV_PRECISION, forced)
    reporter = Quiet()
    run_sft(SFTArgs(model=str(tiny), data=str(EXAMPLES / "sft_messages.jsonl"), out=str(tmp_path / "o"), threads=1,
                    dry_run=True), reporter)
    choice = runtime.precision_choice("auto")  # now with the stage's 1 thread: the probe is kept per thread count
    used = {name: value for name, value, _ in reporter.planned.settings}["precision (used)"]
    assert used == str(choice) == f"{choice.precision} ({choice.reason})"
    if forced:
        assert used == "bf16 (RLHF_PRECISION=bf16)"
    if not runtime.has_gpu():  # the time estimate measured the matmul speed of the dtype that will compute
        assert f"the {choice.precision} (1 thread) matmul speed" in reporter.planned.time.how


def test_bad_environment_precision_is_one_error_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV_PRECISION, "fp8")
    one_error(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--out", tmp_path / "o",
                     "--dry-run"), 2, "RLHF_PRECISION=fp8: not a precision")


# ---------------------------------------------------------------------------------------------------------
# rlhf env


def test_env_prints_a_paste_ready_list_and_json():
    import transformers

    text = ok(invoke("env")).stdout
    lines = text.strip().splitlines()
    assert all(line.startswith("- ") for line in lines), text
    for field in ("- rlhf-cli: ", "- Python: ", "- OS: ", "- CPU: ", "- CPU flags: ", "- bf16 on this CPU: ",
                  "- --precision auto: ", "- GPUs: ", "- default model: "):
        assert any(line.startswith(field) for line in lines), (field, text)
    assert f"transformers {transformers.__version__}" in text and f"torch {torch.__version__}" in text
    found = precision.probe(torch.get_num_threads())
    assert f"matmul {round(found.ratio, 3):.2g}x fp32" in text
    if not runtime.has_gpu():
        assert "- GPUs: none" in lines

    data = json.loads(ok(invoke("env", "--json")).stdout)
    assert set(data["libraries"]) == {"torch", "transformers", "trl", "accelerate", "peft", "datasets"}
    assert data["libraries"]["torch"] == torch.__version__
    assert data["bf16_cpu"]["ratio"] == pytest.approx(found.ratio, abs=1e-3)
    assert data["bf16_cpu"]["fast"] == (found.ratio >= precision.BF16_MIN_RATIO)
    assert data["precision_auto"]["precision"] == runtime.pick_precision("auto")
    assert data["cpu"]["torch_threads"] >= 1 and data["default_model"]["model"]
    packs, why = linear_kernels.decision()
    assert data["sampling_linear"]["packed"] == packs and data["sampling_linear"]["reason"] == why
    assert any(line.startswith("- sampling's linear layers on the CPU: ") and why in line for line in lines), text
