"""Training steps of the default model for the precision and MFU benchmarks: one SFT step, one reward-model step
and one PPO update minibatch, each in fp32 or under CPU bf16 autocast with fp32 master weights (what the stages
do, through `rlhf_cli.core.runtime.autocast`), on fixed batches of real text."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_cli.core import runtime
from rlhf_cli.core.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from rlhf_cli.core.reward_model import token_scores
from rlhf_cli.stages.ppo.core import logprobs_from_logits, policy_loss, value_loss
from rlhf_cli.stages.ppo.rollout import response_logits

TEXT = ("The recipe has three stages. First the model imitates written demonstrations; then a reward model learns "
        "which of two answers people prefer; then the policy samples answers, the reward model scores them, and "
        "PPO raises the score while a KL penalty keeps the policy near where it started. ") * 40


def token_batch(rows: int, seq: int, offset: int = 0) -> torch.Tensor:
    """`rows` windows of `seq` tokens of English text (real tokens: losses of a realistic size)."""
    tok = load_tokenizer(resolve_model(DEFAULT_MODEL))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[offset + 7 * i: offset + 7 * i + seq] for i in range(rows)])


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


@dataclass
class Run:
    """One precision's copy of the models, its optimiser, its step times and losses."""

    precision: str
    step: Callable[[], float]
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def once(self, keep: bool) -> None:
        t0 = time.perf_counter()
        loss = self.step()
        if keep:
            self.times.append(time.perf_counter() - t0)
        self.losses.append(loss)  # warm-up included: every run starts from the same weights

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleaved(runs: list[Run], n: int) -> None:
    """A warm-up step each, then `n` steps each, alternating, so load on the machine hits both alike."""
    for r in runs:
        r.once(False)
    for _ in range(n):
        for r in runs:
            r.once(True)


def sft_run(model: torch.nn.Module, precision: str, batch: torch.Tensor) -> Run:
    model = copy.deepcopy(model).train()
    opt = adam(model)

    def step() -> float:
        with runtime.autocast(precision):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Run(precision, step)


def reward_run(model: torch.nn.Module, precision: str, chosen: torch.Tensor, rejected: torch.Tensor) -> Run:
    model = copy.deepcopy(model).train()
    opt = adam(model)

    def step() -> float:
        with runtime.autocast(precision):
            scores = model(input_ids=torch.cat([chosen, rejected])).logits.squeeze(-1).float()
        n = chosen.shape[0]
        loss = -F.logsigmoid(scores[:n] - scores[n:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Run(precision, step)


def ppo_run(policy: torch.nn.Module, value: torch.nn.Module, precision: str, seq: torch.Tensor, prompt_len: int
            ) -> Run:
    """One PPO update minibatch as `stages.ppo.trainer.PPOTrainer.minibatch_step` computes it: response logits
    and values under autocast, clipped policy and value losses, backward, gradient clipping, AdamW; the "rollout"
    is fixed text, its old log-probabilities and values taken once, in the same precision, before training."""
    policy, value = copy.deepcopy(policy).eval(), copy.deepcopy(value).eval()
    params = [p for m in (policy, value) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6, eps=1e-5, fused=True)
    attn = torch.ones_like(seq)
    response = seq[:, prompt_len:]
    mask = torch.ones_like(response, dtype=torch.float32)
    with torch.no_grad(), runtime.autocast(precision):
        old_logp = logprobs_from_logits(response_logits(policy, seq, attn, prompt_len, 1.0), response)
        old_values = token_scores(value, seq, attn)[:, prompt_len - 1:-1]
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(response.shape, generator=gen)
    returns = old_values + 0.5 * torch.randn(response.shape, generator=gen)

    def step() -> float:
        with runtime.autocast(precision):
            logp = logprobs_from_logits(response_logits(policy, seq, attn, prompt_len, 1.0), response)
            vpred = token_scores(value, seq, attn)[:, prompt_len - 1:-1]
        pg, _ = policy_loss(logp, old_logp, advantages, mask, 0.2)
        vf, _ = value_loss(vpred, old_values, returns, mask, 0.2)
        loss = pg + 0.1 * vf
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Run(precision, step)


def default_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The default model as a causal LM and as a one-output classifier (a fresh score head, seeded), in fp32."""
    path = resolve_model(DEFAULT_MODEL)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = classifier.config.eos_token_id
    return lm, classifier
