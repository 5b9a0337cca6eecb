"""The memory planner: sizes, the estimate's arithmetic, the batch shape it picks, and the CLI refusing a run that
cannot fit before any weight loads. (How close the estimate is to measured peaks: bench/memory.py.)"""

from __future__ import annotations

import json

import pytest
from helpers import EXAMPLES, invoke, one_error

from rlhf_cli.core import memory
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.manifest import MANIFEST

# SmolLM2-135M's sizes, written out so the planner's rules are tested without the model
SMOL = memory.ModelShape(params=134_515_008, hidden=576, intermediate=1536, layers=30, vocab=49152, heads=9)
PAIRS_512 = memory.Workload(causal=False, seq_len=512, seqs_per_example=2)


@pytest.mark.parametrize("text,want", [("8GB", 8e9), ("512MB", 512e6), ("1.5GiB", 1.5 * 2**30), ("8", 8e9),
                                       ("2 gb", 2e9)])
def test_parse_size(text, want):
    assert memory.parse_size(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "0", "8XB"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ConfigError, match="expected a size such as 8GB"):
        memory.parse_size(text)


def test_shape_reads_the_exact_parameter_count_from_safetensors_headers(tiny):
    from transformers import AutoModelForCausalLM

    shape = memory.ModelShape.of(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert (shape.hidden, shape.layers, shape.heads) == (32, 2, 4)


def test_estimate_grows_with_tokens_and_checkpointing_and_freezing_shrink_it():
    one = memory.total(memory.estimate(SMOL, PAIRS_512, 1))
    four = memory.total(memory.estimate(SMOL, PAIRS_512, 4))
    assert four > one
    ckpt = memory.estimate(SMOL, PAIRS_512, 4, checkpointing=True)
    assert ckpt["activations"] < memory.estimate(SMOL, PAIRS_512, 4)["activations"] / 5
    frozen = memory.Workload(causal=False, seq_len=512, seqs_per_example=2, frozen_layers=20,
                             trainable=memory.trainable_params(SMOL, freeze_layers=20))
    assert memory.total(memory.estimate(SMOL, frozen, 4)) < four
    lora = memory.trainable_params(SMOL, lora=True, lora_r=16)
    assert 0 < lora < SMOL.params / 20
    # a causal LM pays for its vocabulary logits, a reward model does not
    causal = memory.Workload(causal=True, seq_len=512)
    assert memory.estimate(SMOL, causal, 1)["logits"] > 0 == memory.estimate(SMOL, PAIRS_512, 1)["logits"]


def test_plan_keeps_the_batch_when_it_fits_off_cpu():
    p = memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1000GB", cpu=False)
    assert (p.micro_batch, p.grad_accum, p.gradient_checkpointing, p.changed) == (8, 1, False, None)


def test_plan_on_cpu_caps_tokens_per_pass_and_keeps_the_effective_batch():
    p = memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1000GB", cpu=True)
    assert p.micro_batch * 2 * 512 <= memory.CPU_MICRO_TOKENS and p.micro_batch * p.grad_accum == 8
    assert "same effective batch 8" in p.changed and "on CPU" in p.changed


def test_plan_shrinks_the_micro_batch_then_checkpoints_then_refuses():
    need8 = memory.total(memory.estimate(SMOL, PAIRS_512, 8)) / 1e9
    need2 = memory.total(memory.estimate(SMOL, PAIRS_512, 2)) / 1e9
    p = memory.plan(SMOL, PAIRS_512, 8, 2, max_memory=f"{(need2 + 0.01):.2f}GB", cpu=False)
    assert p.micro_batch == 2 and p.grad_accum == 8 and not p.gradient_checkpointing and "to fit" in p.changed
    assert p.estimate_gb <= p.budget_gb < need8
    one = memory.total(memory.estimate(SMOL, PAIRS_512, 1)) / 1e9
    p = memory.plan(SMOL, PAIRS_512, 8, 1, max_memory=f"{one - 0.05:.2f}GB", cpu=False)
    assert p.gradient_checkpointing and "gradient checkpointing on" in p.changed and p.micro_batch * p.grad_accum == 8
    with pytest.raises(ConfigError, match=r"memory: this run needs at least .* GB .* expected a smaller --max-length"):
        memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1GB", cpu=False)


def test_plan_checks_a_given_micro_batch():
    with pytest.raises(ConfigError, match="--micro-batch-size 3: must divide the effective batch 8"):
        memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1000GB", micro_batch=3)
    with pytest.raises(ConfigError, match="--micro-batch-size 8: needs about"):
        memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="4GB", micro_batch=8)
    p = memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1000GB", micro_batch=4)
    assert (p.micro_batch, p.grad_accum) == (4, 2)


def test_group_sampler_keeps_each_prompts_pairs_in_one_optimiser_step():
    from rlhf_cli.stages.reward.train import GroupBatchSampler

    groups = [g for g in range(10) for _ in range(g % 4 + 1)]  # prompts with 1-4 pairs
    s = GroupBatchSampler(groups, batch_size=6, seed=0, micro=2)
    whole = GroupBatchSampler(groups, batch_size=6, seed=0)
    micro = list(iter(s))
    assert len(micro) == len(s) and all(len(m) <= 2 for m in micro)
    assert sorted(i for m in micro for i in m) == list(range(len(groups)))
    # put back together, the micro-batches are exactly the whole batches, in the same order
    batches, k = [], 0
    for b in list(iter(whole)):
        n = min(s.chunks, len(b))
        batches.append(sorted(i for m in micro[k:k + n] for i in m))
        k += n
    assert batches == [sorted(b) for b in GroupBatchSampler(groups, batch_size=6, seed=0)]


def test_cli_refuses_a_run_that_cannot_fit_before_loading(tiny, tmp_path):
    out = tmp_path / "rm"
    r = invoke("reward", "--model", tiny, "--data", EXAMPLES / "prefs_ranked.jsonl", "--out", out,
               "--max-memory", "0.5GB", "--threads", 1)
    line = one_error(r, 2)
    assert "memory: this run needs at least" in line and "--max-memory" in line
    assert not out.exists() and not out.with_name("rm.partial").exists()


def test_manifest_records_the_plan_and_the_measured_peak(tiny, tmp_path):
    out = tmp_path / "rm"
    r = invoke("reward", "--model", tiny, "--data", EXAMPLES / "prefs_ranked.jsonl", "--out", out,
               "--batch-size", 4, "--micro-batch-size", 2, "--max-steps", 2, "--threads", 1, check=True)
    assert "memory: estimated peak" in r.stderr and "micro-batch 2 x 2 accumulation" in r.stderr
    mem = json.loads((out / MANIFEST).read_text())["metrics"]["memory"]
    assert (mem["micro_batch"], mem["grad_accum"]) == (2, 2) and mem["measured_peak_gb"] > 0
    assert mem["estimate_gb"] == pytest.approx(sum(mem["parts_gb"].values()), abs=0.02)


def test_a_tight_budget_returns_freed_memory_to_the_system():
    assert memory.plan(SMOL, PAIRS_512, 8, 1, max_memory="1000GB", cpu=True).tight  # the user set a budget
    free = memory.plan(SMOL, PAIRS_512, 2, 4, cpu=False, max_memory=None)
    assert free.tight == (free.changed is not None)  # only when the budget, not speed, changed the shape
    assert memory.return_freed_memory() is True  # glibc on Linux accepts the fixed mmap threshold
