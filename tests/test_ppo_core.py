"""Unit tests for rlhf_cli.stages.ppo.core, checked against values worked out by hand.

Every expected number below is a literal with the arithmetic that produced it in a comment, so a
regression in the implementation cannot silently move the expectation along with it.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_cli.stages.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    entropy_from_logits,
    first_eos_index,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    response_mask_from_ids,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------

# Real tokens are 1, 2, 3 (row 0) and 4 (row 1); 100 and -50 are padding that must be ignored.
X = t([1.0, 2.0, 3.0], [4.0, 100.0, -50.0])
XMASK = t([1, 1, 1], [1, 0, 0])


def test_masked_mean_all_and_per_row():
    # (1 + 2 + 3 + 4) / 4 = 2.5
    assert_close(masked_mean(X, XMASK), torch.tensor(2.5))
    # row 0: 6 / 3 = 2; row 1: 4 / 1 = 4
    assert_close(masked_mean(X, XMASK, dim=1), torch.tensor([2.0, 4.0]))
    # bool masks behave like float masks
    assert_close(masked_mean(X, XMASK.bool()), torch.tensor(2.5))


def test_masked_mean_empty_mask_is_zero_not_nan():
    assert masked_mean(X, torch.zeros_like(X)).item() == 0.0


def test_masked_var():
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert_close(masked_var(X, XMASK, unbiased=False), torch.tensor(5.0 / 4))  # 1.25
    assert_close(masked_var(X, XMASK, unbiased=True), torch.tensor(5.0 / 3))  # 1.6667


def test_masked_whiten_hand_values():
    out = masked_whiten(X, XMASK)
    # (x - 2.5) / sqrt(5/3), sqrt(5/3) = 1.2909944: 1.5 / 1.29099 = 1.161895, 0.5 / 1.29099 = 0.387298
    expected = t([-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0])
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_masked_whiten_moments_and_zero_padding():
    out = masked_whiten(X, XMASK)
    assert_close(masked_mean(out, XMASK), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(out, XMASK), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    assert out[1, 1].item() == 0.0 and out[1, 2].item() == 0.0


def test_masked_whiten_without_mean_shift():
    out = masked_whiten(X, XMASK, shift_mean=False)
    # each real value is (x - 2.5) / 1.2909944 + 2.5; padding stays 0
    expected = t([-1.161895 + 2.5, -0.387298 + 2.5, 0.387298 + 2.5], [1.161895 + 2.5, 0.0, 0.0])
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# response masks
# --------------------------------------------------------------------------------------------


def test_mask_distinct_pad_and_eos():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 6, 2, 0, 0],  # EOS at 2
            [7, 2, 0, 0, 0],  # EOS at 1
            [5, 6, 7, 8, 9],  # truncated, no EOS
        ]
    )
    mask, ends = response_mask_from_ids(ids, eos, pad)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    assert ends.tolist() == [True, True, False]


def test_mask_pad_equals_eos():
    # With pad == eos a "!= pad" mask would drop the EOS itself; the first EOS must stay in.
    eos = pad = 2
    ids = torch.tensor(
        [
            [5, 6, 2, 2, 2],  # EOS at 2, then pads that are also "EOS"
            [5, 2, 2, 2, 2],  # EOS at 1
            [2, 2, 2, 2, 2],  # immediate EOS: only position 0 is real
            [5, 2, 6, 2, 2],  # tokens after the first EOS do not count, even if not pad
            [5, 6, 7, 8, 9],  # no EOS at all
        ]
    )
    mask, ends = response_mask_from_ids(ids, eos, pad)
    assert mask.long().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert ends.tolist() == [True, True, True, True, False]
    assert first_eos_index(ids, eos).tolist() == [2, 1, 0, 1, -1]


def test_mask_multiple_eos_ids():
    ids = torch.tensor([[5, 9, 3, 3], [5, 3, 9, 9], [5, 6, 7, 8]])
    mask, ends = response_mask_from_ids(ids, [9, 3], pad_token_id=3)
    assert mask.long().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ends.tolist() == [True, True, False]


def test_mask_no_eos_but_padded_after_the_fact():
    # A truncated row right-padded to a longer batch: pads (!= eos) are not real tokens.
    ids = torch.tensor([[5, 6, 0, 0], [5, 2, 0, 0]])
    mask, ends = response_mask_from_ids(ids, eos_token_id=2, pad_token_id=0)
    assert mask.long().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert ends.tolist() == [False, True]


# --------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL
# --------------------------------------------------------------------------------------------


def test_logprobs_from_logits():
    log3 = math.log(3.0)
    # position 0: softmax([0, log 3]) = [1/4, 3/4]; label 1 -> log 0.75 = -0.287682
    # position 1: same distribution shifted by +1000 (must not overflow); label 0 -> log 0.25 = -1.386294
    logits = torch.tensor([[[0.0, log3], [1000.0, 1000.0 + log3]]])
    labels = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[-0.287682, -1.386294]]), atol=1e-5, rtol=1e-5)


def test_entropy_from_logits():
    log3 = math.log(3.0)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, log3, -1e4, -1e4]])
    # uniform over 4: ln 4 = 1.386294
    # [1/4, 3/4, ~0, ~0]: 0.25 * ln 4 + 0.75 * ln(4/3) = 0.346574 + 0.215762 = 0.562335
    assert_close(entropy_from_logits(logits), torch.tensor([1.386294, 0.562335]), atol=1e-5, rtol=1e-5)


LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])


def test_kl_k1():
    # logp - ref: -1.0 - (-1.5) = 0.5; -2.0 - (-1.0) = -1.0
    assert_close(kl_estimate(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0]]))


def test_kl_k2():
    # 0.5 * 0.5^2 = 0.125; 0.5 * (-1)^2 = 0.5
    assert_close(kl_estimate(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5]]))


def test_kl_k3():
    # log r = ref - logp = -0.5 and 1.0
    # (e^-0.5 - 1) + 0.5 = (0.606531 - 1) + 0.5 = 0.106531
    # (e^1 - 1) - 1 = 1.718282 - 1 = 0.718282
    assert_close(kl_estimate(LOGP, REF, "k3"), torch.tensor([[0.106531, 0.718282]]), atol=1e-5, rtol=1e-5)
    # identical models -> exactly zero
    assert kl_estimate(REF, REF, "k3").abs().max().item() == 0.0


def test_kl_k3_nonnegative():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 8, generator=gen) * 5
    ref = -torch.rand(4, 8, generator=gen) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # k1 alone can go negative per token


def test_kl_unknown_kind():
    with pytest.raises(ValueError):
        kl_estimate(LOGP, REF, "k4")


# --------------------------------------------------------------------------------------------
# rewards and GAE
# --------------------------------------------------------------------------------------------


def test_per_token_rewards_placement():
    score = torch.tensor([1.0, 2.0])
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mask = t([1, 1, 1], [1, 1, 0])
    out = per_token_rewards(score, kl, mask, beta=0.5)
    # row 0: -0.5*[0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15]; score 1 on index 2 -> 0.85
    # row 1: -0.5*[0.4, 0.5] = [-0.2, -0.25]; score 2 on index 1 -> 1.75; index 2 masked -> 0
    assert_close(out, t([-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]))


def test_compute_gae_hand_values():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    # Row 1 has one padded position whose reward (7) and value (9) are garbage and must be ignored.
    rewards = t([1.0, 0.0, 2.0], [0.0, 3.0, 7.0])
    values = t([0.5, 1.0, 1.5], [1.0, 2.0, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    # row 0:
    #   t=2: delta = 2 + 0.9*0 - 1.5 = 0.5                       A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35                    A1 = 0.35 + 0.45*0.5 = 0.575
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                     A0 = 1.4 + 0.45*0.575 = 1.65875
    # row 1 (t=1 is terminal):
    #   t=1: delta = 3 + 0.9*0 - 2.0 = 1.0                       A1 = 1.0
    #   t=0: delta = 0 + 0.9*2.0 - 1.0 = 0.8                     A0 = 0.8 + 0.45*1.0 = 1.25
    assert_close(adv, t([1.65875, 0.575, 0.5], [1.25, 1.0, 0.0]))
    # returns = A + V: [2.15875, 1.575, 2.0], [2.25, 3.0, 0 (masked)]
    assert_close(ret, t([2.15875, 1.575, 2.0], [2.25, 3.0, 0.0]))


def test_compute_gae_detaches_inputs():
    values = torch.tensor([[0.5, 1.0]], requires_grad=True)
    adv, ret = compute_gae(t([1.0, 1.0]), values, t([1, 1]), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_updates_and_clipping():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # kl 9: 9/6 - 1 = 0.5, clipped to +0.2; beta = 0.1 * (1 + 0.2*1000/10000) = 0.1 * 1.02 = 0.102
    assert ctl.update(9.0, n_steps=1000) == pytest.approx(0.102)
    # kl 6.6: 6.6/6 - 1 = 0.1 (inside the clip); beta = 0.102 * (1 + 0.1*500/10000) = 0.102*1.005 = 0.10251
    ctl.update(6.6, n_steps=500)
    assert ctl.value == pytest.approx(0.10251)
    # kl 0: 0/6 - 1 = -1, clipped to -0.2; beta = 0.10251 * (1 - 0.2*2000/10000) = 0.10251*0.96 = 0.0984096
    ctl.update(torch.tensor(0.0), n_steps=2000)
    assert ctl.value == pytest.approx(0.0984096)
    # kl equal to target: no change
    ctl.update(6.0, n_steps=5000)
    assert ctl.value == pytest.approx(0.0984096)


def test_adaptive_kl_controller_state_roundtrip():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(100.0, 10000)  # error clipped to 0.2 -> 0.2 * 1.2 = 0.24
    assert ctl.value == pytest.approx(0.24)
    resumed = AdaptiveKLController(0.2, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == pytest.approx(0.24)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(123.0, 1000) == 0.05
    assert ctl.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------


def test_policy_loss_with_clipping():
    ratios = torch.tensor([[1.5, 0.9, 0.5, 1.1, 3.0]])
    old = torch.zeros(1, 5)
    logp = torch.log(ratios).requires_grad_(True)
    adv = t([1.0, 1.0, -1.0, -2.0, 100.0])
    mask = t([1, 1, 1, 1, 0])  # the wild last token is padding
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token  ratio  A    -A*r   -A*clip(r)  max     clipped term active?
    #   0    1.5    1   -1.5   -1.2        -1.2    yes
    #   1    0.9    1   -0.9   -0.9        -0.9    no (inside [0.8, 1.2])
    #   2    0.5   -1    0.5    0.8         0.8    yes
    #   3    1.1   -2    2.2    2.2         2.2    no
    # loss = (-1.2 - 0.9 + 0.8 + 2.2) / 4 = 0.9 / 4 = 0.225; clipfrac = 2 / 4 = 0.5
    assert_close(loss, torch.tensor(0.225))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    # approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (0.164402 + 0.011101 + 0.480453 + 0.009084) / 4 = 0.083130
    assert_close(stats["approx_kl"], torch.tensor(0.083130), atol=1e-5, rtol=1e-5)

    loss.backward()
    # d/dlogp of -A*r is -A*r / 4 where unclipped; clipped tokens and padding get no gradient:
    #   token 1: -1*0.9/4 = -0.225; token 3: 2*1.1/4 = 0.55
    assert_close(logp.grad, t([0.0, -0.225, 0.0, 0.55, 0.0]))


def test_policy_loss_without_clipping():
    logp = torch.log(torch.tensor([[1.0, 1.1]]))
    adv = t([2.0, -1.0])
    loss, stats = policy_loss(logp, torch.zeros(1, 2), adv, t([1, 1]), clip_eps=0.2)
    # -(1.0*2) and -(1.1*-1) = -2 and 1.1 -> mean -0.45; nothing clipped
    assert_close(loss, torch.tensor(-0.45))
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_pessimistic_side_is_not_clipped():
    # ratio 0.5 with positive advantage: the unclipped term (-0.5) is larger than the clipped one
    # (-0.8), so the max keeps the unclipped term and the token is not counted as clipped.
    logp = torch.log(torch.tensor([[0.5]]))
    loss, stats = policy_loss(logp, torch.zeros(1, 1), t([1.0]), t([1]), clip_eps=0.2)
    assert_close(loss, torch.tensor(-0.5))
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipped():
    values = t([1.5, 0.9, 2.0, 100.0])
    old = t([1.0, 1.0, 1.0, 0.0])
    returns = t([2.0, 0.0, 1.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, stats = value_loss(values, old, returns, mask, clip_value=0.2)
    # token  v    clip(v, 0.8, 1.2)  (v-R)^2          (vc-R)^2          max   clipped larger?
    #   0    1.5  1.2                (1.5-2)^2 = 0.25  (1.2-2)^2 = 0.64   0.64  yes
    #   1    0.9  0.9                (0.9-0)^2 = 0.81  0.81               0.81  no
    #   2    2.0  1.2                (2-1)^2 = 1.0     (1.2-1)^2 = 0.04   1.0   no
    # loss = 0.5 * (0.64 + 0.81 + 1.0) / 3 = 0.5 * 2.45 / 3 = 0.408333; vf_clipfrac = 1/3
    assert_close(loss, torch.tensor(0.408333), atol=1e-5, rtol=1e-5)
    assert_close(stats["vf_clipfrac"], torch.tensor(1.0 / 3))


def test_value_loss_without_clipping():
    values = t([1.1, 0.9])
    loss, stats = value_loss(values, t([1.0, 1.0]), t([2.0, 1.0]), t([1, 1]), clip_value=0.2)
    # 0.5 * ((1.1-2)^2 + (0.9-1)^2) / 2 = 0.5 * (0.81 + 0.01) / 2 = 0.205
    assert_close(loss, torch.tensor(0.205))
    assert stats["vf_clipfrac"].item() == 0.0


# --------------------------------------------------------------------------------------------
# running moments
# --------------------------------------------------------------------------------------------


def test_running_moments_matches_concatenation():
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0]), torch.tensor([10.0])]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    # all values: 1, 2, 3, 4, 5, 10 -> mean 25/6 = 4.166667
    # sum of squared deviations = 155 - 6*(25/6)^2 = 155 - 104.166667 = 50.833333
    # unbiased var = 50.833333 / 5 = 10.166667, std = 3.188521
    assert rm.count == 6
    assert rm.mean == pytest.approx(25.0 / 6)
    assert rm.var == pytest.approx(10.166667)
    assert rm.std == pytest.approx(3.188521)
    allx = torch.cat(batches).double()
    assert rm.mean == pytest.approx(allx.mean().item())
    assert rm.std == pytest.approx(allx.std().item())


def test_running_moments_state_roundtrip_and_normalize():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, unbiased std 1
    resumed = RunningMoments()
    resumed.load_state_dict(rm.state_dict())
    resumed.update(torch.tensor([4.0, 5.0, 10.0]))
    rm.update(torch.tensor([4.0, 5.0, 10.0]))
    assert (resumed.mean, resumed.m2, resumed.count) == (rm.mean, rm.m2, rm.count)
    fresh = RunningMoments()
    fresh.update(torch.tensor([1.0, 2.0, 3.0]))
    # (x - 2) / 1
    assert_close(fresh.normalize(torch.tensor([0.0, 4.0])), torch.tensor([-2.0, 2.0]))
