"""PPO's rollouts and the forward passes shared by rollouts and training (one code path, so old and new
log-probabilities match), and the scores the reward model gives them.

Every forward pass runs its rows without the columns that are padding in all of them: with prompts of mixed
lengths, padding is a large part of a batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_cli.core.generation import last_logits, pad_batch
from rlhf_cli.core.linear_kernels import packed_linears
from rlhf_cli.core.reward_model import RewardModel, leading_pad, token_scores
from rlhf_cli.stages.ppo.args import PPOArgs
from rlhf_cli.stages.ppo.core import (
    RunningMoments,
    entropy_from_logits,
    logprobs_from_logits,
    response_mask_from_ids,
)
from rlhf_cli.stages.ppo.preflight import Plan
from rlhf_cli.stages.ppo.trunk import SharedTrunk


def response_logits(model: PreTrainedModel, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int,
                    temperature: float) -> torch.Tensor:
    """Logits [B, R, V] (float32, divided by the temperature) that predict the R response tokens."""
    r = seq.shape[1] - prompt_len
    return last_logits(model, seq, attn, r + 1)[:, :-1].float() / temperature


@dataclass
class Rollout:
    seq: torch.Tensor  # [B, P + R]: left-padded prompt, then the response; tokens after the first EOS are pad
    attn: torch.Tensor  # [B, P + R]: 1 on real prompt and response tokens
    prompt_len: int  # P
    response: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] bool: real response tokens, up to and including the first EOS
    ends: torch.Tensor  # [B] bool: the response ended with EOS


def generate_rollouts(policy: PreTrainedModel, prompt_ids: list[list[int]], gen_config: GenerationConfig, pad_id: int,
                      eos_ids: list[int], device: torch.device) -> Rollout:
    """Sample one response per prompt in one batched generate call."""

    ids, attn = (t.to(device) for t in pad_batch(prompt_ids, pad_id, left=True))
    with torch.no_grad(), packed_linears(policy):
        out = policy.generate(input_ids=ids, attention_mask=attn, generation_config=gen_config)
    p = ids.shape[1]
    response = out[:, p:]
    # One generate call pads only finished rows, so a pad id inside an unfinished row is a real token: no pad here.
    mask, ends = response_mask_from_ids(response, eos_ids, None)
    response = response.masked_fill(~mask, pad_id)
    return Rollout(torch.cat([ids, response], 1), torch.cat([attn, mask.long()], 1), p, response, mask, ends)


def rollout_from_ids(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int, eos_ids: list[int],
                     device: torch.device) -> Rollout:
    """A rollout from token ids sampled elsewhere (a generation engine such as vLLM): each response holds its
    tokens up to and including its first EOS, or all of them when it has none."""
    ids, attn = (t.to(device) for t in pad_batch(prompt_ids, pad_id, left=True))
    width = max(1, max(len(r) for r in responses))
    response = torch.full((len(responses), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(response, dtype=torch.bool)
    ends = torch.zeros(len(responses), dtype=torch.bool, device=device)
    for i, r in enumerate(responses):
        if r:
            response[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
            ends[i] = r[-1] in eos_ids
    return Rollout(torch.cat([ids, response], 1), torch.cat([attn, mask.long()], 1), ids.shape[1], response, mask,
                   ends)


def response_texts(tok: PreTrainedTokenizerBase, ro: Rollout, n: int | None = None) -> list[str]:
    """The responses as text, without EOS and what follows it."""
    rows = range(ro.response.shape[0] if n is None else min(n, ro.response.shape[0]))
    return tok.batch_decode([ro.response[i][ro.mask[i]].tolist() for i in rows], skip_special_tokens=True)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trimmed(ro: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows of a rollout without the columns that are padding in every one of them (the leading prompt padding
    and the response padding after the longest response): (seq, attn, prompt_len, response_len). Those columns
    are masked out everywhere, so results do not change; on prompts of mixed lengths it saves much of the work."""
    attn = ro.attn[rows]
    k = leading_pad(attn[:, :ro.prompt_len])
    r = max(1, int(ro.mask[rows].sum(1).max()))
    end = ro.prompt_len + r
    return ro.seq[rows][:, k:end], attn[:, k:end], ro.prompt_len - k, r


def by_length(ro: Rollout) -> torch.Tensor:
    """Row indices from the shortest to the longest prompt + response (stable)."""
    return torch.argsort(ro.attn.sum(1), stable=True)


def minibatches(ro: Rollout, size: int, group_by_length: bool) -> list[torch.Tensor]:
    """One PPO epoch's minibatches of row indices, in a random order. Grouped by length: consecutive rows of the
    length order (less padding per minibatch); else a random partition."""
    n = ro.seq.shape[0]
    if not group_by_length:
        return list(torch.randperm(n).split(size))
    groups = list(by_length(ro).split(size))
    return [groups[i] for i in torch.randperm(len(groups)).tolist()]


def chunk_passes(trunk: SharedTrunk | None, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int,
                 temperature: float) -> tuple[Callable, Callable, torch.Tensor | None]:
    """For one chunk of rows: a model's response logits and its values (the head on every hidden state), through
    the full forward pass, or with a shared trunk from the trunk's output (also returned)."""
    if trunk is None:
        return (lambda m: response_logits(m, seq, attn, prompt_len, temperature),
                lambda m: token_scores(m, seq, attn), None)
    h = trunk.states(seq, attn)
    return (lambda m: trunk.response_logits(m, h, attn, prompt_len, temperature),
            lambda m: trunk.token_scores(m, h, attn), h)


def rollout_forward(policy: PreTrainedModel, ref: PreTrainedModel, value: PreTrainedModel, ro: Rollout,
                    temperature: float, size: int, lora: bool, trunk: SharedTrunk | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Old log-probabilities, reference log-probabilities, values and entropies of the response tokens (what
    stands after a row's end means nothing and is masked everywhere), and with a shared trunk its hidden states
    [B, P + R, H] for the training passes (zeros in the columns a row's chunk trimmed: padding, masked). Rows go
    through in chunks of similar length, each without its all-padding columns."""
    n, width = ro.response.shape
    logps, refs, values, ents = (torch.zeros(n, width, device=ro.seq.device) for _ in range(4))
    states = None
    order = by_length(ro)
    with torch.no_grad():
        for s in chunks(n, size):
            rows = order[s]
            seq, attn, pl, r = trimmed(ro, rows)
            resp = ro.response[rows][:, :r]
            logits_of, values_of, h = chunk_passes(trunk, seq, attn, pl, temperature)
            if h is not None:  # kept for the training passes
                if states is None:
                    states = h.new_zeros(n, ro.seq.shape[1], h.shape[-1])
                k = ro.prompt_len - pl
                states[rows, k:k + h.shape[1]] = h
            logits = logits_of(policy)
            logps[rows, :r] = logprobs_from_logits(logits, resp)
            ents[rows, :r] = entropy_from_logits(logits)
            del logits
            with policy.disable_adapter() if lora else contextlib.nullcontext():
                ref_logits = logits_of(ref)
            refs[rows, :r] = logprobs_from_logits(ref_logits, resp)
            del ref_logits
            values[rows, :r] = values_of(value)[:, pl - 1:-1]
    return logps, refs, values, ents, states


def check_trunk(policy: PreTrainedModel, ro: Rollout, temperature: float, logps: torch.Tensor) -> float:
    """The largest difference between `logps`, the old log-probabilities `rollout_forward` computed through the
    shared trunk, and the policy's full forward pass on two rows: the shortest and the longest (the one with the
    most left padding among them, so the trunk's attention mask and positions are tried). The shortcut is used
    only when they agree; two rows cost a quarter of a batch of eight, and the shortcut's side costs nothing."""
    order = by_length(ro)
    rows = order[[0, -1]] if len(order) > 1 else order
    seq, attn, pl, r = trimmed(ro, rows)
    resp, mask = ro.response[rows][:, :r], ro.mask[rows][:, :r]
    with torch.no_grad():
        full = logprobs_from_logits(response_logits(policy, seq, attn, pl, temperature), resp)
    return float(((full - logps[rows, :r]).abs() * mask).max()) if mask.any() else 0.0


class ScoreShaper:
    """Raw RM scores -> the scores PPO optimises: normalised with running statistics, penalised without EOS,
    clipped. Its running statistics are part of a checkpoint."""

    def __init__(self, a: PPOArgs):
        self.a = a
        self.moments = RunningMoments()

    def __call__(self, raw: torch.Tensor, ends: torch.Tensor,
                 sum_all: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """`sum_all`: sums over every process (several processes), so the running statistics take in the whole
        batch and stay the same on every process."""
        s = raw.clone()
        if self.a.normalize_rewards:
            self.moments.update(raw, sum_all)
            if self.moments.count > 1:  # one score has no spread to divide by
                s = self.moments.normalize(s)
        if self.a.missing_eos_penalty is not None:
            s = s - self.a.missing_eos_penalty * (~ends.bool()).to(s.dtype)
        if self.a.score_clip is not None:
            s = torch.clamp(s, -self.a.score_clip, self.a.score_clip)
        return s


def score_rollout(rm: RewardModel, plan: Plan, ro: Rollout, rows: list[dict], batch: int) -> torch.Tensor:
    """Raw RM scores [B] of a rollout batch: the policy's token ids directly when the tokenizers and templates
    agree (plus the template's end-of-turn suffix), else the decoded text re-encoded through the RM's template."""
    if not plan.same_ids:
        texts = response_texts(plan.tok, ro)
        scores = rm.score_answers([row["prompt"] for row in rows], texts, batch)
        return torch.tensor(scores, device=ro.seq.device)
    last = ro.prompt_len + ro.mask.sum(1) - 1
    return rm.score_turns(ro.seq, ro.attn, last, ro.ends, plan.turn_suffix, batch)
