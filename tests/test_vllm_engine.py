"""The GPU paths, checked on the CPU: `--use-vllm` (with a stand-in engine in place of vLLM), `--load-in-4bit`, the
attention kernel choice, and the settings handed to TRL's trainers.

The stand-in implements `rlhf_cli.core.vllm_engine.Engine`: it answers every prompt with a fixed pattern of token
ids and records every `generate` and `load_weights` call, so the tests can see that rollouts are the engine's
tokens, that the policy's weights reach the engine after every update under the names a Hugging Face checkpoint
uses (LoRA merged), and that best-of-n samples through it. What these tests cannot show is vLLM itself running:
see docs/SCALING.md.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, invoke, ok, one_error, read_jsonl, stage, token_rm, write_jsonl

from rlhf_cli.core import vllm_engine
from rlhf_cli.core.manifest import MANIFEST

FAST = ["--threads", "1", "--max-new-tokens", "4"]
NEEDS = "--use-vllm needs a CUDA GPU and `pip install vllm`"


class StandIn:
    """An engine that answers with fixed tokens: prompt i gets [a, b, EOS] when i is even, [a, b, c, d] (cut at
    the token limit) when odd; it records its calls."""

    instances: list[StandIn] = []

    def __init__(self, path, *, dtype, gpu_memory_utilization, max_model_len, eos_ids, seed=0,
                 trust_remote_code=False):
        self.path, self.eos_ids, self.memory, self.max_model_len = Path(path), eos_ids, gpu_memory_utilization, \
            max_model_len
        self.generated: list[tuple[list[list[int]], vllm_engine.SampleSettings]] = []
        self.loads: list[dict[str, torch.Tensor]] = []
        self.closed = False
        StandIn.instances.append(self)

    name = "vllm"
    TOKENS = (1000, 2000, 3000, 4000)

    def generate(self, prompts, sampling):
        self.generated.append((prompts, sampling))
        rows = []
        for i, _ in enumerate(prompts):
            for _ in range(sampling.n):
                if i % 2 == 0:
                    rows.append([*self.TOKENS[:2], self.eos_ids[0]])
                else:
                    rows.append(list(self.TOKENS[:sampling.max_new_tokens]))
        return rows

    def load_weights(self, named):
        self.loads.append({name: t.detach().clone() for name, t in named})

    def close(self):
        self.closed = True


@pytest.fixture
def stand_in(monkeypatch):
    """vLLM replaced by the stand-in, and the GPU/vllm check passed."""
    StandIn.instances = []
    monkeypatch.setattr(vllm_engine, "VLLMEngine", StandIn)
    monkeypatch.setattr(vllm_engine, "vllm_problem", lambda: None)
    return StandIn


@pytest.fixture(scope="module")
def w(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpupaths")
    run = root / "run"
    stage(Path(shutil.copytree(tiny, run / "sft")), "sft", max_length=64)
    token_rm(run / "reward", tiny, lambda tok: tok("well !", add_special_tokens=False)["input_ids"][-1])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    return SimpleNamespace(root=root, run=run, prompts=prompts, tiny=tiny)


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# weights handed to the engine


def test_engine_weights_are_the_models_under_checkpoint_names(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    got = dict(vllm_engine.engine_weights(model))
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_engine_weights_merge_lora_out_of_place(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    names = set(original)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    got = dict(vllm_engine.engine_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert got.keys() == names == merged.keys()  # names as in the plain model's checkpoint, no adapter tensors
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v)
    changed = [k for k in names if not torch.equal(got[k], original[k])]
    assert any("q_proj" in k for k in changed)
    # the frozen base (also the reference) is untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize(("wrapped", "plain"), [
    ("module.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight", "model.layers.1.self_attn.q_proj.weight"),
    ("model.layers.0._checkpoint_wrapped_module.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
    ("_orig_mod.lm_head.weight", "lm_head.weight"),
])
def test_hf_names(wrapped, plain):
    assert vllm_engine.hf_name(wrapped) == plain


def test_rollout_from_engine_ids_masks_at_the_first_eos():
    from rlhf_cli.stages.ppo.rollout import rollout_from_ids

    pad, eos = 0, 9
    ro = rollout_from_ids([[5, 6, 7], [8]], [[1, 2, eos], [3, 4, 5, 6]], pad, [eos], torch.device("cpu"))
    assert ro.prompt_len == 3 and ro.response.tolist() == [[1, 2, eos, pad], [3, 4, 5, 6]]
    assert ro.mask.tolist() == [[True, True, True, False], [True] * 4]
    assert ro.ends.tolist() == [True, False]
    assert ro.attn.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------
# our PPO with the stand-in engine


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_samples_with_the_engine_and_syncs_after_every_update(w, stand_in, lora):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = w.root / f"ppo_{lora}"
    extra = ["--lora", "--lora-r", 4, "--lr", "1e-2", "--value-init", "policy"] if lora else ["--lr", "1e-3"]
    ok(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", out, "--use-vllm",
              "--vllm-gpu-memory-utilization", 0.5, "--max-steps", 2, "--batch-size", 4, "--sample-every", 1,
              *extra, *FAST))
    (engine,) = stand_in.instances
    assert engine.memory == 0.5 and engine.path == w.run / "sft"
    # rollouts are the engine's tokens, sampled with the run's settings and a fresh seed per update
    assert len(engine.generated) == 2
    assert all(s.max_new_tokens == 4 and s.temperature == 0.7 and s.n == 1 for _, s in engine.generated)
    assert len({s.seed for _, s in engine.generated}) == 2
    tok = AutoTokenizer.from_pretrained(w.run / "sft")
    samples = read_jsonl(out / "samples.jsonl")
    patterns = {tok.decode(list(StandIn.TOKENS[:2]), skip_special_tokens=True),
                tok.decode(list(StandIn.TOKENS), skip_special_tokens=True)}
    assert samples and {s["response"] for s in samples} <= patterns
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["eos_fraction"] for r in rows] == [0.5, 0.5]  # even prompts end with EOS, odd ones are cut
    assert max(r["check/first_logratio_max"] for r in rows) < 1e-5  # the policy's own log-probabilities
    # weights: once before the first rollout, then after each update; the last is the saved policy
    assert len(engine.loads) == 3
    final = load_file(out / "model.safetensors")
    last = engine.loads[-1]
    assert set(final) <= set(last) and not any("lora" in k for k in last)
    for k, v in final.items():
        torch.testing.assert_close(last[k].to(v.dtype), v)
    moved = [k for k in final if not torch.equal(engine.loads[0][k], last[k])]
    assert moved  # the updates changed what the engine samples from
    assert manifest(out)["metrics"]["generation"] == "vllm"


def test_ppo_without_the_flag_never_opens_an_engine(w, stand_in):
    out = w.root / "ppo_hf"
    ok(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", out, "--max-steps", 1, "--batch-size", 2,
              "--sample-every", 0, *FAST))
    assert stand_in.instances == []
    assert manifest(out)["metrics"]["generation"] == "hf"


# ---------------------------------------------------------------------------------------------------------
# best-of-n with the stand-in engine


def test_best_of_n_samples_with_the_engine(w, stand_in):
    from transformers import AutoTokenizer

    out = w.root / "bon"
    ok(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", out, "--use-vllm", "-k", 3,
              "--max-new-tokens", 4, "--sample-batch-size", 4, "--temperature", 1.0, "--max-steps", 1,
              "--batch-size", 4, "--threads", 1, "--max-length", 64))
    (engine,) = stand_in.instances
    assert engine.closed  # freed before the fine-tune
    assert [len(p) for p, _ in engine.generated] == [4, 4] and all(s.n == 3 for _, s in engine.generated)
    assert len({s.seed for _, s in engine.generated}) == 2
    tok = AutoTokenizer.from_pretrained(w.run / "sft")
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 8
    for i, row in enumerate(rows):
        ids = StandIn.TOKENS[:2] if i % 4 % 2 == 0 else StandIn.TOKENS
        assert row["responses"] == [tok.decode(list(ids), skip_special_tokens=True).strip()] * 3
        assert row["finished"] == [i % 4 % 2 == 0] * 3
    assert manifest(out)["metrics"]["generation"] == "vllm"


# ---------------------------------------------------------------------------------------------------------
# refusals: one line, before any weights load


def test_use_vllm_is_refused_here_before_loading(w, monkeypatch):
    import transformers

    def no_loading(*a, **kw):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(vllm_engine, "vllm_problem", lambda: f"{NEEDS}; this machine has no CUDA GPU")
    for algo in ("ppo", "grpo"):
        err = one_error(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", w.root / "refused",
                               "--algo", algo, "--batch-size", 4, "--use-vllm", *FAST), 2, NEEDS)
        assert "no CUDA GPU" in err
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--out", w.root / "refused",
                     "--use-vllm"), 2, NEEDS)


def test_vllm_problem_names_what_is_missing_on_this_machine():
    problem = vllm_engine.vllm_problem()
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: whether vllm is installed decides")
    assert problem.startswith(NEEDS) and "no CUDA GPU" in problem


def test_flag_rules(w, stand_in):
    common = ["--run", w.run, "--prompts", w.prompts, "--out", w.root / "rules", "--batch-size", 4, *FAST]
    one_error(invoke("ppo", *common, "--use-vllm", "--vllm-mode", "server"), 2, "--vllm-mode server",
              "--algo grpo/rloo")
    one_error(invoke("ppo", *common, "--use-vllm", "--num-processes", 2), 2, "--use-vllm with 2 processes")
    one_error(invoke("ppo", *common, "--vllm-server-url", "http://h:8000"), 2, "only used with --vllm-mode server")
    one_error(invoke("ppo", *common, "--load-in-4bit"), 2, "--load-in-4bit", "expected --lora")
    one_error(invoke("ppo", *common, "--load-in-4bit", "--lora", "--use-vllm"), 2, "--use-vllm with --load-in-4bit")
    one_error(invoke("best-of-n", "--run", w.run, "--prompts", w.prompts, "--use-vllm", "--num-processes", 2), 2,
              "--use-vllm with 2 processes")


def test_load_in_4bit_is_refused_without_a_gpu(w):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    one_error(invoke("ppo", "--run", w.run, "--prompts", w.prompts, "--out", w.root / "q", "--lora",
                     "--load-in-4bit", "--batch-size", 4, *FAST), 2,
              "--load-in-4bit needs a CUDA GPU and `pip install bitsandbytes`")


def test_dry_run_shows_the_generation_engine(w):
    from test_dry_run import cells

    def generation(*flags) -> str:
        return cells(ok(invoke(*flags, "--dry-run")).stdout)["generation"][0]

    common = ["--run", w.run, "--prompts", w.prompts, "--out", w.root / "dry"]
    line = generation("ppo", *common, "--use-vllm", "--batch-size", 4, *FAST)
    assert line.startswith("vLLM (colocated, 30% of the GPU's memory)")
    if not torch.cuda.is_available():
        assert line.endswith(f"not available on this machine: {NEEDS}; this machine has no CUDA GPU (drop "
                             f"--use-vllm to sample with transformers)")
    assert generation("ppo", *common, "--batch-size", 4, *FAST).startswith("transformers generate")
    assert generation("best-of-n", *common, "--use-vllm").startswith("vLLM (colocated")


# ---------------------------------------------------------------------------------------------------------
# TRL's trainers: the config they are given


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_config_carries_the_vllm_settings(tmp_path, algo):
    from rlhf_cli.core import memory
    from rlhf_cli.stages.ppo.args import PPOArgs
    from rlhf_cli.stages.ppo.trl_algos import trl_config

    def config(**kw):
        a = PPOArgs(algo=algo, batch_size=4, group_size=2, **kw)
        return trl_config(a, tmp_path, 1e-5, "fp32", 3, max_model_len=96)

    off = config()
    assert off.use_vllm is False and off.gradient_checkpointing is False
    on = config(use_vllm=True, vllm_gpu_memory_utilization=0.45)
    assert (on.use_vllm, on.vllm_mode, on.vllm_gpu_memory_utilization, on.vllm_max_model_length) == \
        (True, "colocate", 0.45, 96)
    server = config(use_vllm=True, vllm_mode="server", vllm_server_url="http://gpu1:8000")
    assert (server.vllm_mode, server.vllm_server_base_url) == ("server", "http://gpu1:8000")
    tight = memory.MemoryPlan(micro_batch=1, grad_accum=4, gradient_checkpointing=True, estimate_gb=2.0,
                              budget_gb=1.0, budget_source="test", parts_gb={}, tight=True)
    a = PPOArgs(algo=algo, batch_size=4, group_size=2)
    assert trl_config(a, tmp_path, 1e-5, "fp32", 3, tight).gradient_checkpointing is True


# ---------------------------------------------------------------------------------------------------------
# loading


def test_load_kwargs_on_the_cpu_leave_attention_to_transformers(tiny):
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core import runtime

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert runtime.load_kwargs(tiny, AutoModelForCausalLM, "fp32") == {"dtype": torch.float32}
    # transformers 5 picks SDPA itself where the model supports it
    model = AutoModelForCausalLM.from_pretrained(tiny, **runtime.load_kwargs(tiny, AutoModelForCausalLM, "fp32"))
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_check.sh


def test_gpu_check_script_parses_and_its_recipe_plans(w, tmp_path):
    """The script cannot run without a GPU: its bash parses, its recipe passes the pipeline's checks, and its
    stage 3 (and the grpo and best-of-n steps beside it) plan with --dry-run."""
    from rlhf_cli.pipeline.recipe import load_recipe

    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert "examples/recipes/gpu_check.yaml" in text and "--use-vllm" in text and "--algo grpo" in text
    recipe = load_recipe(ROOT / "examples" / "recipes" / "gpu_check.yaml", run=str(tmp_path / "run"))
    assert recipe.algo_name == "ppo" and recipe.stage3_values["use_vllm"] is True
    stage3 = [f"--{k.replace('_', '-')}={v}" for k, v in recipe.stage3_values.items()
              if k not in ("algo", "use_vllm", "sample_every")]
    plan = ok(invoke("ppo", "--run", w.run, "--out", tmp_path / "ppo", *stage3, "--use-vllm", "--threads", 1,
                     "--max-length", 512, "--dry-run"))
    assert "vLLM (colocated" in plan.stdout
    ok(invoke("ppo", "--run", w.run, "--out", tmp_path / "grpo", "--algo", "grpo", "--use-vllm", "--prompts",
              ROOT / "examples" / "data" / "hh_prompts_train.jsonl", "--max-steps", 10, "--batch-size", 32,
              "--group-size", 4, "--max-new-tokens", 64, "--max-length", 512, "--threads", 1, "--dry-run"))


# ---------------------------------------------------------------------------------------------------------
# gradient checkpointing in our PPO (the memory planner's choice)


def test_checkpointed_layers_recompute_and_give_the_same_gradients(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from rlhf_cli.stages.ppo.trainer import checkpoint_layers

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    calls = []
    mlp_forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))

    def grads_and_calls(checkpointed: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny).eval()
        if checkpointed:
            assert checkpoint_layers(model) == model.config.num_hidden_layers
        calls.clear()
        with torch.no_grad():  # a rollout pass: no recomputation
            model(input_ids=ids)
        model(input_ids=ids).logits.float().square().mean().backward()
        assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads_and_calls(False)
    ckpt, ckpt_calls = grads_and_calls(True)
    layers = 2
    # two passes through every layer; checkpointed, each layer runs once more in the backward pass
    assert (plain_calls, ckpt_calls) == (2 * layers, 3 * layers)
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g)
