"""Pure-tensor math for classic RLHF PPO (InstructGPT / Ziegler et al. 2019).

Nothing here knows about models, tokenizers or optimisers, so every function can be unit-tested
with hand-sized tensors.

Conventions
-----------
* Per-token tensors are ``[batch, response_len]`` and cover the *response* only (the prompt is
  never scored, rewarded or trained on).
* ``mask`` is a float or bool tensor of the same shape with 1 for real response tokens (up to and
  including the first EOS) and 0 for everything after. Masks are right-aligned padding: each row
  is a contiguous run of ones followed by zeros, so the last real token sits at
  ``mask.sum(1) - 1``.
* ``logprobs`` are log-probabilities of the sampled tokens, ``ref_logprobs`` those of the frozen
  reference (SFT) model, ``values`` the critic's per-token estimates.
* Statistics are returned as detached 0-dim tensors, so that logging them never forces a
  device sync inside the training step; call ``float()`` when you need a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "compute_gae",
    "entropy_from_logits",
    "first_eos_index",
    "global_masked_moments",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "response_mask_from_ids",
    "value_loss",
]

# Keeps divisions by "number of real tokens" finite when a mask is entirely zero; the numerator
# is then zero as well, so the result is 0 rather than NaN.
_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero.

    With ``dim=None`` the mean is over all real tokens of the batch (a token-level mean, which is
    what the PPO losses use); with ``dim`` it is taken along that dimension only.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(_EPS)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(_EPS)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (a single scalar over the whole batch).

    ``unbiased`` applies Bessel's correction with the number of real tokens as ``n``. With fewer
    than two real tokens the correction is undefined, so the biased value is returned instead.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        # torch.where keeps this branch-free (no host sync on GPU) while avoiding n / 0.
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(_EPS), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  sum_all: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using statistics of the masked positions only.

    Padding must not leak into the statistics (a long tail of zeros would drag the mean down and
    shrink the variance), and masked-out positions are zero in the output so that they cannot
    contribute to anything downstream. ``shift_mean=False`` only rescales, keeping the original
    mean; useful for rewards, where the sign carries meaning.

    ``sum_all``: sums a tensor over every process holding a share of the batch (several
    processes): the statistics are then those of the whole batch, the same on every process.
    """
    mask_f = mask.to(x.dtype)
    if sum_all is None:
        mean = masked_mean(x, mask_f)
        var = masked_var(x, mask_f)
    else:
        mean, var = global_masked_moments(x, mask_f, sum_all)
    whitened = (x - mean) * torch.rsqrt(var + _EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor, sum_all: Callable[[torch.Tensor], torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked positions of a batch split across processes: the sums and
    counts, then the squared deviations from the global mean, each summed over the processes (two passes,
    in float64, so no large sum of squares cancels)."""
    mask = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    total, n = sum_all(torch.stack([(xd * mask).sum(), mask.sum()])).unbind()
    mean = total / n.clamp_min(_EPS)
    sq = sum_all(((xd - mean) ** 2 * mask).sum().reshape(1))[0]
    var = sq / n.clamp_min(_EPS)
    var = torch.where(n > 1, var * n / (n - 1).clamp_min(_EPS), var)
    return mean.to(x.dtype), var.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Response masks
# --------------------------------------------------------------------------------------------


def _is_eos(response_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    # Several chat models stop on more than one token (e.g. <|eot_id|> and <|end_of_text|>).
    if isinstance(eos_token_id, int):
        return response_ids == eos_token_id
    eos = torch.as_tensor(list(eos_token_id), device=response_ids.device, dtype=response_ids.dtype)
    return torch.isin(response_ids, eos)


def first_eos_index(response_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Index of the first EOS token in each row of ``[B, T]`` ids, or -1 where a row has none."""
    is_eos = _is_eos(response_ids, eos_token_id)
    # argmax returns the first maximal index, i.e. the first EOS; rows without any EOS would
    # wrongly report 0, hence the explicit -1.
    idx = is_eos.to(torch.int8).argmax(dim=1)
    return torch.where(is_eos.any(dim=1), idx, torch.full_like(idx, -1))


def response_mask_from_ids(
    response_ids: torch.Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens and whether each row finished with an EOS.

    Returns ``(mask, ends_with_eos)``: ``mask`` is a bool ``[B, T]`` tensor that is True up to and
    including the first EOS and False afterwards; ``ends_with_eos`` is a bool ``[B]`` tensor, False
    for truncated rows (used to penalise responses that hit the length limit).

    The mask is derived from the position of the first EOS, never from ``ids != pad``: many
    tokenizers set ``pad_token_id == eos_token_id``, and then the EOS itself would be masked out
    and the final reward would land on the wrong token.

    A row without EOS is all True, except that when ``pad_token_id`` is given and differs from
    every EOS id, positions from its first pad token onward are excluded. That covers rollouts
    from several ``generate`` calls that were right-padded to a common length after the fact.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be [batch, response_len], got shape {tuple(response_ids.shape)}")
    batch, length = response_ids.shape
    positions = torch.arange(length, device=response_ids.device).expand(batch, length)

    eos_idx = first_eos_index(response_ids, eos_token_id)
    ends_with_eos = eos_idx >= 0
    # Last real position (inclusive): the EOS itself, else the end of the row.
    last = torch.where(ends_with_eos, eos_idx, torch.full_like(eos_idx, length - 1))

    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if pad_token_id is not None and pad_token_id not in eos_ids:
        pad_idx = first_eos_index(response_ids, pad_token_id)
        no_eos_but_padded = (~ends_with_eos) & (pad_idx >= 0)
        last = torch.where(no_eos_but_padded, pad_idx - 1, last)

    mask = positions <= last.unsqueeze(1)
    return mask, ends_with_eos


# --------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``labels`` ``[B, T]`` under ``logits`` ``[B, T, V]``, as float32.

    Computed as ``logit[label] - logsumexp(logits)``: exact and stable for large logits, and it
    never materialises a full ``[B, T, V]`` log-softmax next to the logits. Upcasting matters:
    bf16 logsumexp over a 100k+ vocabulary loses enough precision to bias the PPO ratio.
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position, ``[..., V] -> [...]``.

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)``, which stays finite when some probabilities
    underflow to 0 (where ``p * log p`` would give ``0 * -inf = nan``).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    Schulman's estimators, with samples drawn from the policy:

    * ``"k1"``: ``logp - ref_logp``; unbiased but can be negative for individual tokens.
    * ``"k2"``: ``0.5 * (logp - ref_logp) ** 2``; biased, low variance, always >= 0.
    * ``"k3"``: ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``; unbiased and always >= 0.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # expm1 keeps (r - 1) accurate when the two models barely differ (the common case).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


# --------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------


def per_token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
) -> torch.Tensor:
    """Shaped reward ``[B, T]``: a ``-beta * kl`` penalty on every real token, plus the reward-model
    ``score`` ``[B]`` on the last real token of each row (index ``mask.sum(1) - 1``).

    The score is a sequence-level judgement, so it belongs to the action that completed the
    sequence; the KL term keeps every token close to the reference model. Rows with no real
    token receive nothing rather than having the score wrap around to the last column.
    """
    mask_f = mask.to(kl.dtype)
    rewards = -beta * kl * mask_f
    lengths = mask_f.sum(dim=1).long()
    last = (lengths - 1).clamp_min(0)
    bonus = score.to(rewards.dtype) * (lengths > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over the response tokens.

    Returns ``(advantages, returns)``, both ``[B, T]``, zero at masked positions, with
    ``returns = advantages + values``. The token after each row's last real token is terminal:
    its value is taken as 0 and nothing propagates back from beyond it, so whatever the critic
    predicts on padding never leaks into the targets.

    Inputs are detached: advantages and returns are regression/weighting targets, never
    something to differentiate through.
    """
    mask_f = mask.to(values.dtype)
    rewards = rewards.detach() * mask_f
    values = values.detach() * mask_f
    batch, length = values.shape

    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(batch)
    next_adv = values.new_zeros(batch)
    next_alive = values.new_zeros(batch)
    for t in reversed(range(length)):
        # next_alive is 0 past a row's end, which both zeroes the bootstrap value and cuts the
        # recursion, i.e. makes the last real token terminal.
        delta = rewards[:, t] + gamma * next_value * next_alive - values[:, t]
        adv_t = delta + gamma * lam * next_alive * next_adv
        advantages[:, t] = adv_t
        next_value, next_adv, next_alive = values[:, t], adv_t, mask_f[:, t]

    advantages = advantages * mask_f
    returns = (advantages + values) * mask_f
    return advantages, returns


# --------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), section 2.2.

    ``beta`` is nudged so that the observed KL tracks ``target``. The proportional error is
    clipped to +-0.2 so a single outlier batch cannot swing ``beta`` wildly, and the step is
    scaled by ``n_steps / horizon`` so the adaptation rate does not depend on the batch size.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Adjust ``beta`` after observing mean KL ``current_kl`` over ``n_steps`` samples."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # Only beta is training state; target/horizon come from the (possibly edited) config of
        # the resumed run, so they are stored for inspection but not restored.
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """No-op; present so the trainer can treat both controllers alike."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate objective, as a loss to minimise (token-level masked mean).

    ``old_logprobs`` and ``advantages`` are detached: they are constants of the surrogate, and a
    stray graph through them would silently change the gradient. Stats: ``clipfrac`` (share of
    real tokens where the clipped term was the active one), ``approx_kl``
    (``0.5 * mean((logp - old_logp)^2)``) and ``ratio`` (mean importance ratio).
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * masked_mean(max((v - R)^2, (clip(v, old +- c) - R)^2))``.

    Taking the max makes the clip pessimistic: it only removes gradient when the new prediction
    has moved more than ``clip_value`` away from the rollout-time value. Stats: ``vf_clipfrac``
    (share of real tokens where the clipped term was larger) and ``vpred`` (mean prediction).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)

    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask),
            "vpred": masked_mean(values, mask),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------
# Running statistics
# --------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and standard deviation of a scalar stream (e.g. reward-model scores).

    Batches are merged with the parallel form of Welford's algorithm (Chan et al.), accumulated in
    Python floats (float64), so the result matches statistics over the concatenation of all
    batches without storing them and without the cancellation of a naive sum-of-squares.
    ``std`` is the unbiased (n - 1) standard deviation, like ``torch.std``.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor, sum_all: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold every element of ``xs`` into the running statistics. ``sum_all``: sums a tensor over
        every process holding a share of the batch, so each folds in the whole batch."""
        xs = xs.detach().reshape(-1).to(torch.float64)
        if sum_all is not None:
            n, total = sum_all(torch.stack([xs.new_tensor(float(xs.numel())), xs.sum()])).tolist()
            n_b = int(round(n))
            if n_b == 0:
                return
            mean_b = total / n_b
            m2_b = float(sum_all(((xs - mean_b) ** 2).sum().reshape(1))[0])
        else:
            n_b = xs.numel()
            if n_b == 0:
                return
            mean_b = xs.mean().item()
            m2_b = ((xs - mean_b) ** 2).sum().item()

        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def normalize(self, xs: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Scale ``xs`` by the running std (and centre on the running mean if ``shift_mean``)."""
        centred = xs - self.mean if shift_mean else xs
        return centred / (self.std + _EPS)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = int(state["count"])
