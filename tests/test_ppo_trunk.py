"""PPO's shared frozen trunk (`stages/ppo/trunk.py`): with `--freeze-layers N`, the policy, reference and value
model share their embeddings and lowest N layers, so their output is computed once per rollout and every other
pass runs only the layers above. These tests hold it to the full forward passes: the same log-probabilities,
values and training run, and the full passes whenever the weights are not really shared.

`--threads 1` throughout (see test_ppo.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny, invoke, ok, stage, write_jsonl

from rlhf_cli.core.manifest import MANIFEST


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-layer tiny policy, a second copy as the reference, and a value model from the policy with a fresh
    head; the lowest 2 layers frozen in policy and value model, as the trainer freezes them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core.training import freeze_lower_layers

    path = build_tiny(tmp_path_factory.mktemp("trunk") / "policy", layers=3)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    ref = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    value.config.pad_token_id = tok.pad_token_id
    for m in (policy, value):
        freeze_lower_layers(m, 2)
    return path, tok, policy, ref, value


def rollout(tok, policy):
    from transformers import GenerationConfig

    from rlhf_cli.core.generation import encode_chat
    from rlhf_cli.stages.ppo.rollout import generate_rollouts

    prompts = [encode_chat(tok, [{"role": "user", "content": "Hi" + " there" * k}]) for k in (0, 5, 2, 7, 1, 3)]
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6,
                           eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    return generate_rollouts(policy, prompts, gen, tok.pad_token_id, [tok.eos_token_id], torch.device("cpu"))


def test_the_trunk_gives_the_full_passes_results(models):
    from rlhf_cli.stages.ppo.rollout import check_trunk, rollout_forward
    from rlhf_cli.stages.ppo.trunk import find_trunk

    _, tok, policy, ref, value = models
    trunk, why = find_trunk(policy, [ref, value], 2, same_files=(ref,))
    assert trunk is not None, why
    # one copy of the frozen layers: the reference's and value model's lowest 2 are now the policy's modules
    assert all(m.model.layers[i] is policy.model.layers[i] for m in (ref, value) for i in range(2))
    assert value.model.layers[2] is not policy.model.layers[2]
    ro = rollout(tok, policy)
    assert len(set(ro.attn[:, :ro.prompt_len].sum(1).tolist())) > 1  # prompts of several lengths: left padding

    full = rollout_forward(policy, ref, value, ro, 0.7, 2, lora=False)
    short = rollout_forward(policy, ref, value, ro, 0.7, 2, lora=False, trunk=trunk)
    assert full[4] is None
    for a, b, name in zip(full[:4], short[:4], ("logprobs", "ref logprobs", "values", "entropy"), strict=True):
        torch.testing.assert_close(b * ro.mask, a * ro.mask, rtol=1e-5, atol=1e-5, msg=name)
    # the first-rollout check: the shortcut's old log-probabilities against the full pass on the shortest and
    # the longest row; it finds a difference where there is one
    assert check_trunk(policy, ro, 0.7, short[0]) < 1e-5
    longest = int(ro.attn.sum(1).argmax())
    off = short[0].clone()
    off[longest] += 0.01 * ro.mask[longest]
    assert check_trunk(policy, ro, 0.7, off) == pytest.approx(0.01, abs=1e-4)

    # the cached states are layer 2's hidden states at every real token (what the training passes start from)
    states = short[4]
    assert states.shape == (*ro.seq.shape, policy.config.hidden_size)
    from rlhf_cli.core.generation import position_ids

    with torch.no_grad():
        hs = policy(input_ids=ro.seq, attention_mask=ro.attn, position_ids=position_ids(ro.attn),
                    output_hidden_states=True).hidden_states[2]
    real = ro.attn.bool()
    torch.testing.assert_close(states[real], hs[real], rtol=1e-5, atol=1e-5)


def test_no_trunk_unless_the_weights_are_the_same_and_frozen(models):
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.core.training import freeze_lower_layers
    from rlhf_cli.stages.ppo.trunk import find_trunk

    path, _, policy, ref, value = models
    assert find_trunk(policy, [ref, value], 0) == (None, "no frozen layers")
    trunk, why = find_trunk(policy, [ref, value], 3)  # every layer: nothing left above the trunk
    assert trunk is None and "layer stacks" in why

    other = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    freeze_lower_layers(other, 2)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # a value model trained from another start
    trunk, why = find_trunk(policy, [ref, other], 2)
    assert trunk is None and "not the policy's" in why

    trained = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    freeze_lower_layers(trained, 1)  # layer 1 trains in this one
    trunk, why = find_trunk(policy, [ref, trained], 2)
    assert trunk is None and why == "a lower layer is trained"
    # a model from the policy's own folder skips the value comparison, not the checks of layout and freezing
    trunk, why = find_trunk(policy, [ref, trained], 2, same_files=(trained,))
    assert trunk is None and why == "a lower layer is trained"
    assert trained.model.layers[0] is not policy.model.layers[0]  # nothing shared when there is no trunk


def test_ppo_with_the_trunk_trains_as_the_full_passes_do(tmp_path, monkeypatch):
    """The same run with and without the shortcut: the same figures at every update and the same weights; a
    shortcut that fails its first-rollout check is turned off and the run goes on with the full passes."""
    policy = stage(build_tiny(tmp_path / "sft", layers=3), "sft", max_length=128)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    # the reward model: the policy as a classifier (any scorer will do; it is frozen)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(policy).pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(policy).save_pretrained(tmp_path / "rm")
    stage(tmp_path / "rm", "reward", max_length=256)

    common = ["--policy", policy, "--reward", tmp_path / "rm", "--prompts", prompts, "--max-steps", 3,
              "--batch-size", 4, "--num-minibatches", 2, "--ppo-epochs", 2, "--lr", "1e-3", "--freeze-layers", 2,
              "--value-init", "policy", "--threads", 1, "--max-new-tokens", 5, "--sample-every", 0]
    shared = ok(invoke("ppo", *common, "--out", tmp_path / "shared"))
    assert "frozen layers: embeddings and lowest 2 layers computed once per rollout" in shared.stderr
    m = json.loads((tmp_path / "shared" / MANIFEST).read_text())["metrics"]
    assert m["shared_trunk_layers"] == 2

    full = ok(invoke("ppo", *common, "--out", tmp_path / "full", "--no-shared-trunk"))
    assert "frozen layers run in every pass (--no-shared-trunk)" in full.stderr
    m = json.loads((tmp_path / "full" / MANIFEST).read_text())["metrics"]
    assert m["shared_trunk_layers"] == 0 and m["shared_trunk"] == "--no-shared-trunk"

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    import rlhf_cli.stages.ppo.trainer as trainer

    monkeypatch.setattr(trainer, "check_trunk", lambda *args: 0.5)  # as a model whose layers the trunk misreads
    off = ok(invoke("ppo", *common, "--out", tmp_path / "off"))
    assert "the shared-trunk shortcut differs from the full pass by 0.5; running full forward passes" in off.stderr
    m = json.loads((tmp_path / "off" / MANIFEST).read_text())["metrics"]
    assert m["shared_trunk_layers"] == 0

    a, b, c = rows("full"), rows("shared"), rows("off")
    assert len(a) == len(b) == 3
    for ra, rc in zip(a, c, strict=True):  # the same run as the full passes' from the first rollout on
        assert rc["score_mean"] == ra["score_mean"] and rc["kl"] == pytest.approx(ra["kl"], rel=1e-5, abs=1e-6)
    for ra, rb in zip(a, b, strict=True):
        for k in ("score_mean", "kl", "policy_loss", "value_loss", "approx_kl", "response_length"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
    assert abs(a[-1]["kl"]) > 1e-3  # the policy moved: the comparison is about training, not a frozen model
    from safetensors.torch import load_file

    for sub in ("", "value"):
        wa = load_file(tmp_path / "full" / sub / "model.safetensors")
        wb = load_file(tmp_path / "shared" / sub / "model.safetensors")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
