"""Packed oneDNN linear layers for sampling: the same outputs and tokens as torch's own linear, gradients and
autocast untouched, the layers restored afterwards, the decision from the (cached) probe, the environment
override, and the memory and failure guards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_cli.core import linear_kernels
from rlhf_cli.core.generation import Sampling, load_lm

needs_onednn = pytest.mark.skipif(not linear_kernels.supported(), reason="this torch has no oneDNN packed linear")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(linear_kernels.ENV, raising=False)


def linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@needs_onednn
def test_packed_layers_give_the_same_logits_and_are_restored(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    x = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        before = model(x).logits
        with linear_kernels.packed_linears(model, enabled=True) as n:
            assert n == len(linears(model)) > 0
            assert all("forward" in m.__dict__ for m in linears(model))
            calls = []
            real = linear_kernels.packed_linear
            linear_kernels.packed_linear = lambda *a: calls.append(1) or real(*a)
            try:
                inside = model(x).logits
            finally:
                linear_kernels.packed_linear = real
        after = model(x).logits
    assert len(calls) == n  # every layer went through oneDNN
    assert torch.allclose(inside, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, before)
    assert not any("forward" in m.__dict__ for m in linears(model))


@needs_onednn
def test_gradients_and_autocast_take_the_usual_path(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    model(x).logits.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with linear_kernels.packed_linears(model, enabled=True) as n:
        assert n > 0
        model(x).logits.sum().backward()  # oneDNN's packed op has no gradient: this must not go through it
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).logits.dtype == torch.bfloat16  # autocast still applies
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16), linear_kernels.packed_linears(model, enabled=True) as n:
        assert n == 0  # nothing is packed for calls that would all take the usual path


@needs_onednn
def test_sampling_with_packed_layers_draws_the_same_tokens(tiny, monkeypatch):
    lm = load_lm(str(tiny))
    prompts = [lm.encode([{"role": "user", "content": t}]) for t in ("Hello there", "Name a colour, please")]
    got = {}
    for env in ("0", "1"):
        monkeypatch.setenv(linear_kernels.ENV, env)
        torch.manual_seed(3)
        got[env] = lm.sample_ids(prompts, 2, Sampling(max_new_tokens=12, temperature=0.7))
    assert got["0"] == got["1"]
    assert not any("forward" in m.__dict__ for m in linears(lm.model))


def test_the_probe_decides_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(linear_kernels, "supported", lambda: True)
    timings = iter([(10e9, 31e9)])
    monkeypatch.setattr(linear_kernels, "_best_of_windows", lambda: next(timings))
    assert linear_kernels.decision() == (True, "measured 3.1x torch's linear at 8 rows here")
    assert linear_kernels.decision()[0]  # from the cache: a second measurement would exhaust `timings`
    assert linear_kernels.probe().cached
    entries = json.loads((tmp_path / "cache" / "linear_probe.json").read_text())
    [(key, entry)] = entries.items()
    assert f"{torch.get_num_threads()} threads" in key and entry["packed_flops"] == 31e9
    monkeypatch.setattr(linear_kernels, "_best_of_windows", lambda: (10e9, 11e9))
    assert linear_kernels.probe(refresh=True).ratio == pytest.approx(1.1)
    assert linear_kernels.decision() == (False, "measured only 1.10x torch's linear at 8 rows here")
    assert linear_kernels.kernel_name() == "default"


def test_the_environment_overrides_the_probe(monkeypatch):
    monkeypatch.setattr(linear_kernels, "supported", lambda: True)
    monkeypatch.setattr(linear_kernels, "_best_of_windows", lambda: (10e9, 5e9))
    monkeypatch.setenv(linear_kernels.ENV, "1")
    assert linear_kernels.decision() == (True, f"{linear_kernels.ENV}=1")
    monkeypatch.setenv(linear_kernels.ENV, "0")
    assert linear_kernels.decision() == (False, f"{linear_kernels.ENV}=0")
    monkeypatch.setattr(linear_kernels, "supported", lambda: False)
    monkeypatch.setenv(linear_kernels.ENV, "1")
    assert linear_kernels.decision() == (False, "torch has no oneDNN packed linear here")


@needs_onednn
def test_no_packing_without_room_or_when_packing_fails(tiny, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    monkeypatch.setattr("rlhf_cli.core.memory.free_memory", lambda: (1000.0, "test"))
    with linear_kernels.packed_linears(model, enabled=True) as n:
        assert n == 0
    monkeypatch.undo()

    def refuse(w):
        raise RuntimeError("oneDNN: unsupported layout")

    monkeypatch.setattr(linear_kernels, "pack", refuse)
    x = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        want = model(x).logits
        with linear_kernels.packed_linears(model, enabled=True) as n:
            assert n == 0
            assert torch.equal(model(x).logits, want)
    assert not any("forward" in m.__dict__ for m in linears(model))


@needs_onednn
def test_kept_packed_weights_are_reused_until_the_weight_changes(tiny, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    packed = []
    real = linear_kernels.pack
    monkeypatch.setattr(linear_kernels, "pack", lambda w: packed.append(w) or real(w))
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    n = len(linears(model))
    with torch.no_grad():
        for _ in range(2):
            with linear_kernels.packed_linears(model, enabled=True, keep=True):
                model(x)
        assert len(packed) == n  # the second call packed nothing
        layer = linears(model)[0]
        layer.weight.add_(0.5)  # an in-place change, as an optimiser step makes
        want = model(x).logits
        with linear_kernels.packed_linears(model, enabled=True, keep=True):
            got = model(x).logits
        assert len(packed) == n + 1 and packed[-1] is layer.weight  # only the changed layer again
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        fresh = AutoModelForCausalLM.from_pretrained(tiny).eval()
        for _ in range(2):
            with linear_kernels.packed_linears(fresh, enabled=True):  # not kept: packed at every call
                fresh(x)
    assert len(packed) == 3 * n + 1
    assert not any(linear_kernels.KEPT in m.__dict__ for m in linears(fresh))
