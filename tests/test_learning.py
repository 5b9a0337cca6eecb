"""Behaviour, not plumbing: the SFT loss falls, the reward model learns a learnable preference, and the
prompt-grouped batch sampler keeps each prompt's pairs together.

`--threads 1`: on a small shared machine, two torch threads fighting other processes are several times slower
than one.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import invoke, learnable_prefs, write_jsonl

from rlhf_cli.core.manifest import MANIFEST
from rlhf_cli.stages.reward.train import GroupBatchSampler


def metrics(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["metrics"]


FACTS = [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white")]


def test_sft_loss_falls(tiny, tmp_path):
    rows = [{"prompt": f"What colour is the {x}?", "completion": f"The {x} is {c}."} for x, c in FACTS] * 2
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    out = tmp_path / "sft"
    invoke("sft", "--model", tiny, "--data", data, "--eval-data", data, "--out", out, "--max-steps", 30,
           "--batch-size", 4, "--lr", "1e-2", "--max-length", 64, "--threads", 1, check=True)
    m = metrics(out)
    assert m["steps"] == 30
    # a random model starts near ln(vocab) = ln(49152) ~ 10.8 nats per token
    assert m["eval_loss_before"] > 10
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"]
    assert m["last_loss"] < 0.5 * m["first_loss"]
    assert m["train_loss"] < m["first_loss"]


def test_reward_model_learns_a_learnable_preference(tiny, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", learnable_prefs(64))
    out = tmp_path / "rm"
    result = invoke("reward", "--model", tiny, "--data", data, "--eval-split", 0.25, "--out", out,
                    "--max-steps", 24, "--batch-size", 8, "--lr", "1e-3", "--seed", 42, "--threads", 1, check=True)
    m = metrics(out)
    assert (m["pairs"], m["eval_pairs"]) == (48, 16)
    # the fresh head scores both answers alike: near-zero margins, no real preference yet
    assert m["eval_accuracy_before"] <= 0.7
    assert abs(m["eval_mean_margin_before"]) < 0.1
    assert m["eval_accuracy"] >= 0.95
    assert m["eval_mean_margin"] > 0.5
    assert f"held-out pairwise accuracy {m['eval_accuracy_before']:.3f} -> {m['eval_accuracy']:.3f}" in result.stderr

    # the saved model scores the held-out style of pair the same way through `rlhf eval reward`
    fresh = write_jsonl(tmp_path / "fresh.jsonl", learnable_prefs(12, seed=99))
    res = json.loads(invoke("eval", "reward", "--model", out, "--data", fresh, "--json", "--threads", 1,
                            check=True).stdout)
    assert res["pairs"] == 12 and res["accuracy"] >= 0.95 and res["mean_margin"] > 0.5


# ---------------------------------------------------------------------------------------------------------
# GroupBatchSampler


def groups_from_sizes(sizes: list[int]) -> list[int]:
    """Pair index -> group id, with the pairs of each group spread out as a loader would see them."""
    out = [g for g, n in enumerate(sizes) for _ in range(n)]
    return out[::2] + out[1::2]


def check_epoch(batches: list[list[int]], groups: list[int], batch_size: int) -> None:
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(groups)))  # every index exactly once
    assert all(1 <= len(b) <= batch_size for b in batches)


@pytest.mark.parametrize("batch_size", [4, 6, 8])
def test_group_batch_sampler_keeps_small_groups_whole(batch_size):
    sizes = [1, 3, 2, 3, 1, 2, 3, 3, 1, 2, 2, 1, 3]  # every group smaller than the batch
    groups = groups_from_sizes(sizes)
    sampler = GroupBatchSampler(groups, batch_size=batch_size, seed=0)
    for _ in range(3):  # several epochs
        batches = list(sampler)
        check_epoch(batches, groups, batch_size)
        batch_of = {}
        for b, batch in enumerate(batches):
            for i in batch:
                batch_of.setdefault(groups[i], set()).add(b)
        assert all(len(bs) == 1 for bs in batch_of.values()), batch_of


def test_group_batch_sampler_len_holds_for_every_epoch():
    groups = groups_from_sizes([1, 3, 2, 3, 1, 2, 3, 3, 1, 2, 2, 1, 3])
    sampler = GroupBatchSampler(groups, batch_size=4, seed=1)
    for epoch in range(6):
        taken = list(sampler)[:len(sampler)]  # the Trainer takes len() batches per epoch
        assert sorted(i for b in taken for i in b) == list(range(len(groups))), f"epoch {epoch} skips pairs"


def test_group_batch_sampler_large_groups_fill_whole_batches_of_their_own():
    sizes = [10, 2, 7, 1, 4]
    groups = groups_from_sizes(sizes)
    sampler = GroupBatchSampler(groups, batch_size=4, seed=1)
    batches = list(sampler)
    check_epoch(batches, groups, 4)
    for g, n in enumerate(sizes):
        where = [batch for batch in batches if any(groups[i] == g for i in batch)]
        assert len(where) == n // 4 + (1 if n % 4 else 0)  # as few batches as the group needs
        own = [b for b in where if all(groups[i] == g for i in b)]
        assert len(own) >= n // 4  # its full batches hold nothing else


def test_group_batch_sampler_reshuffles_each_epoch_and_is_seeded():
    groups = groups_from_sizes([2] * 20)
    a, b = GroupBatchSampler(groups, 4, seed=5), GroupBatchSampler(groups, 4, seed=5)
    first, second = list(a), list(a)
    assert first != second  # a new prompt order every epoch
    check_epoch(first, groups, 4)
    check_epoch(second, groups, 4)
    assert list(b) == first and list(b) == second  # same seed, same sequence of epochs
    assert list(GroupBatchSampler(groups, 4, seed=6)) != first


def test_group_batch_sampler_one_pair_per_prompt_is_plain_batching():
    groups = list(range(10))
    batches = list(GroupBatchSampler(groups, batch_size=4, seed=0))
    check_epoch(batches, groups, 4)
    assert Counter(len(b) for b in batches) == Counter({4: 2, 2: 1})
