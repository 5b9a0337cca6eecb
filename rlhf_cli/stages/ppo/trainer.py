"""This toolkit's PPO trainer: the loop of `rlhf ppo --algo ppo`, one method per phase of the algorithm.

`PPOTrainer.train` reads as the algorithm (see `rlhf_cli.stages.ppo.train` for the whole recipe): collect a batch
(generate rollouts, score them, shape per-token rewards with the KL penalty, estimate advantages), train on it
(PPO epochs over minibatches), log, checkpoint. A `Batch` carries one update's rollouts between the phases;
`state_dict` / `load_state_dict` hold everything `--resume` needs besides the weights.

Under several processes (`--num-processes N`) every process takes its own --batch-size prompts of each update
(N x --batch-size in all), samples them with its own seed, and keeps whole copies of the policy and value model
wrapped in torch's DistributedDataParallel, which averages the gradients. The statistics that span the batch
are summed over the processes (`runtime.all_reduce`): advantage whitening, the running reward statistics, the
KL fed to the adaptive controller, the token count each loss is normalised by, and the logged figures; so every
process takes the same decisions (early stop, divergence, stop request) at the same update. Rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig, PreTrainedModel

from rlhf_cli.core import runtime, vllm_engine
from rlhf_cli.core.config import dump_yaml, to_dict
from rlhf_cli.core.errors import ConfigError, TrainingError
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.models import set_distinct_pad
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel, head_model, token_scores
from rlhf_cli.core.tracking import Tracker
from rlhf_cli.core.training import freeze_lower_layers, lora_config
from rlhf_cli.stages.ppo.args import (
    DEFAULT_LORA_LR,
    DEFAULT_LR,
    PPOArgs,
    global_batch,
    minibatch_size,
    ppo_epochs,
    updates,
)
from rlhf_cli.stages.ppo.checkpoint import (
    PPOOutput,
    Stopped,
    check_resume,
    finish_lora,
    jsonl_append,
    jsonl_keep,
    lr_lambda,
    prompt_order,
    rollout_seed,
    save_checkpoint,
    write_ppo_manifest,
)
from rlhf_cli.stages.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    kl_estimate,
    logprobs_from_logits,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from rlhf_cli.stages.ppo.preflight import Plan, plan_memory
from rlhf_cli.stages.ppo.rollout import (
    Rollout,
    ScoreShaper,
    check_trunk,
    generate_rollouts,
    minibatches,
    response_logits,
    response_texts,
    rollout_forward,
    rollout_from_ids,
    score_rollout,
    trimmed,
)
from rlhf_cli.stages.ppo.trunk import SharedTrunk, find_trunk

# largest log-probability difference between the shared-trunk shortcut and the full pass that is rounding
TRUNK_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}

N_SAMPLES = 3  # rollouts shown and kept in samples.jsonl every --sample-every updates


@dataclass
class Batch:
    """One update's rollouts and what PPO computed from them; [B, R] tensors are per response token."""

    rows: list[dict]  # the prompt rows, aligned with the rollouts
    rollout: Rollout
    raw_scores: torch.Tensor  # [B] the RM's scores
    scores: torch.Tensor  # [B] normalised / penalised / clipped: what is optimised
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # float 1 on real response tokens
    seq_kl: torch.Tensor  # [B] KL to the reference per response
    kl_coef: float
    advantages: torch.Tensor
    returns: torch.Tensor
    started: float  # when collecting began
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: generate, score, forward, train
    figures: dict[str, float] = field(default_factory=dict)  # means over every process's rollouts (`figures`)
    trunk_states: torch.Tensor | None = None  # [B, P + R, H] after the shared frozen layers (`trunk`), if shared
    value_only: bool = False  # --value-warmup: this update trains the value model only


@dataclass
class UpdateStats:
    """What one update's PPO epochs did."""

    means: dict[str, float]  # losses, clip fractions, approx KL, grad norm: means over the optimiser steps
    lr: float
    ppo_epochs_done: int
    optimizer_steps: int
    early_stopped: bool
    first_check: dict[str, float]  # the first micro-batch's log-ratio to the rollout policy (must be ~0)


def load_models(a: PPOArgs, plan: Plan, precision: str, resume_dir: Path | None
                ) -> tuple[PreTrainedModel, PreTrainedModel | None, RewardModel, PreTrainedModel]:
    """Policy, reference (None with LoRA: the policy with its adapters off), reward model, value model; from the
    checkpoint when resuming. Everything in eval mode: dropout off, so rollout and training passes agree.
    Policy, value and reference load in the training weight dtype (fp32 on the CPU, computing under autocast):
    the reference then computes exactly as the policy does, so their KL starts at 0; the RM only scores and
    loads in the compute dtype."""
    tok = plan.tok

    def causal(path: Path, load_in_4bit: bool = False) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(
            path, **runtime.load_kwargs(path, AutoModelForCausalLM, precision, load_in_4bit),
            **plan.loading.model_kwargs())
        set_distinct_pad(tok, model)  # a pad token the tokenizer had to add needs an embedding row
        return model

    def classifier(path: Path) -> PreTrainedModel:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, **runtime.load_kwargs(path, AutoModelForSequenceClassification, precision),
            **plan.loading.model_kwargs())
        set_distinct_pad(tok, model)
        return model

    full_resume = resume_dir is not None and not a.lora
    # --load-in-4bit (QLoRA, with --lora): the policy's frozen base in 4 bits; it is also the reference
    policy = causal(resume_dir if full_resume else plan.policy_path, a.load_in_4bit)
    ref = None if a.lora else causal(plan.policy_path)
    rm = RewardModel.load(plan.reward_spec, precision, tok=plan.rm_tok, max_length=plan.rm_max_length)
    value_base = plan.reward_path if a.value_init == "reward" else plan.policy_path
    value = classifier(resume_dir / "value" if full_resume else value_base)
    if a.freeze_layers:
        freeze_lower_layers(policy, a.freeze_layers)
        freeze_lower_layers(value, a.freeze_layers)
    if a.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    if a.lora and resume_dir is not None:
        policy = PeftModel.from_pretrained(policy, resume_dir / "adapter", is_trainable=True)
        value = PeftModel.from_pretrained(value, resume_dir / "value" / "adapter", is_trainable=True)
    elif a.lora:
        policy = get_peft_model(policy, lora_config(a, "CAUSAL_LM", policy))
        value = get_peft_model(value, lora_config(a, "SEQ_CLS", value))
    policy, value = runtime.to_device(policy).eval(), runtime.to_device(value).eval()
    if ref is not None:
        ref = runtime.to_device(ref).eval().requires_grad_(False)
    head_model(value)  # PPO reads values and RM scores from every hidden state: both need a findable head
    head_model(rm.model)
    return policy, ref, rm, value


def open_engine(a: PPOArgs, plan: Plan, precision: str) -> vllm_engine.Engine:
    """--use-vllm: a vLLM engine colocated with training, on the policy's folder (the trainer then hands it the
    weights it trains on before the first rollout and after every update)."""
    longest = max(len(p) for p in plan.prompt_ids) + a.max_new_tokens
    return vllm_engine.VLLMEngine(plan.policy_path, dtype={"fp32": "float32", "bf16": "bfloat16",
                                                           "fp16": "float16"}[precision],
                                  gpu_memory_utilization=a.vllm_gpu_memory_utilization, max_model_len=longest,
                                  eos_ids=plan.eos_ids, seed=a.seed, trust_remote_code=a.trust_remote_code)


def checkpoint_layers(model: PreTrainedModel) -> int:
    """Gradient checkpointing in a model that stays in eval mode (dropout off, so rollout and training passes
    agree): transformers checkpoints a layer only when that layer's own `training` flag is set and gradients are
    on, so only the layers' flags are set (not their children's, whose dropout stays off) and the no-grad rollout
    passes run as before. Returns the number of checkpointed layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}  # works with frozen embeddings (LoRA, --freeze-layers) and DDP
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer.training = True
    return len(layers)


def check_engine_vocab(policy: PreTrainedModel, plan: Plan) -> None:
    """The engine was built from the folder's config: a policy whose embeddings grew (a pad token the tokenizer
    had to add) cannot hand it its weights."""
    from rlhf_cli.core.reward_model import read_config

    on_disk = read_config(plan.policy_path, "--policy").get("vocab_size")
    rows = policy.get_input_embeddings().num_embeddings
    if on_disk is not None and rows != on_disk:
        raise ConfigError(f"--use-vllm: the policy's tokenizer needed a new pad token, so its embeddings grew from "
                          f"{on_disk} to {rows} rows and no longer match {plan.policy_path}; expected a tokenizer "
                          f"with a pad token other than EOS (an sft stage saves one), or drop --use-vllm")


class Diverged(Exception):
    """A NaN score, loss or gradient norm, or a KL above --max-kl."""


class ValueModel(torch.nn.Module):
    """The value model's per-token values as one forward call, so DistributedDataParallel sees the pass (its
    head is applied to every hidden state, outside the classifier's own forward)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, seq, attn)


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` whose backward averages its gradients over the processes (itself in one process). Every
    trainable weight takes part in each pass (frozen layers and LoRA's frozen base have no gradient and are not
    synchronised), so DDP need not search the graph for unused ones; buffers (rotary tables) never change."""
    if runtime.world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = runtime.device()
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=False)


def figures(batch: Batch) -> dict[str, float]:
    """The logged means of an update's rollouts over every process (sums, then one division), and whether any
    score is not finite."""
    ro, raw, mask = batch.rollout, batch.raw_scores.double(), batch.mask.double()
    lengths = ro.mask.sum(1).double()
    sums = torch.stack([
        torch.tensor(float(raw.numel()), dtype=torch.float64, device=raw.device),
        torch.where(torch.isfinite(raw), raw, 0.0).sum(), (torch.where(torch.isfinite(raw), raw, 0.0) ** 2).sum(),
        (~torch.isfinite(raw)).sum().double(), batch.scores.double().sum(), batch.seq_kl.double().sum(),
        (batch.entropy.double() * mask).sum(), mask.sum(), lengths.sum(), ro.ends.double().sum(),
        (batch.values.double() * mask).sum(), (batch.returns.double() * mask).sum()])
    (n, score, score_sq, not_finite, reward, kl, entropy, tokens, length, ends, value, ret) = \
        runtime.all_reduce(sums).tolist()
    longest = runtime.all_reduce(lengths.max().reshape(1), op="max").item()
    var = (score_sq - score * score / n) / (n - 1) if n > 1 else 0.0
    tokens = max(tokens, 1.0)
    return {"n": n, "score_mean": score / n, "score_std": math.sqrt(max(var, 0.0)), "not_finite": not_finite,
            "reward_mean": reward / n, "kl": kl / n, "entropy": entropy / tokens, "response_length": length / n,
            "response_length_max": int(longest), "eos_fraction": ends / n, "value_mean": value / tokens,
            "return_mean": ret / tokens}


class PPOTrainer:
    """Our PPO: policy and value model trained against a frozen RM with a KL penalty to a frozen reference."""

    def __init__(self, a: PPOArgs, plan: Plan, staged: PPOOutput, reporter: Reporter,
                 started: float):
        self.a, self.plan, self.staged, self.reporter, self.started = a, plan, staged, reporter, started
        runtime.init_distributed()  # several processes: join the group before DDP wraps the models
        self.rank, self.world = runtime.rank(), runtime.world_size()
        self.sum_all = runtime.all_reduce if self.world > 1 else None  # batch statistics over every process
        self.global_batch = global_batch(a)
        self.threads = runtime.configure_threads(a.threads)
        self.choice = runtime.precision_choice(a.precision)
        self.precision = self.choice.precision
        self.device = runtime.device()
        self.lr = a.lr or (DEFAULT_LORA_LR if a.lora else DEFAULT_LR)
        self.epochs = ppo_epochs(a)
        self.minibatch = minibatch_size(a)
        # --use-vllm: the engine takes its share of the GPU first, so the memory planner sees what is left
        self.engine = open_engine(a, plan, self.precision) if a.use_vllm else None
        self.memory = plan_memory(a, plan, self.precision, self.minibatch, reporter.info)
        self.micro = self.memory.micro_batch
        self.total = updates(a, len(plan.prompt_ids))
        if a.value_warmup and a.value_warmup >= self.total:
            raise ConfigError(f"--value-warmup {a.value_warmup}: must be less than the run's {self.total} updates "
                              f"(--max-steps), or the policy never trains; lower it or raise --max-steps")
        self.resume_summary = self._resume_summary() if a.resume else None
        transformers.set_seed(a.seed)  # fresh heads, LoRA initialisation
        self.policy, self.ref, self.rm, self.value = load_models(
            a, plan, self.precision, staged.partial if a.resume else None)
        if self.memory.gradient_checkpointing:  # the planner found no micro-batch that fits without it
            for model in (self.policy, self.value):
                checkpoint_layers(model)
        self.trunk, self.trunk_reason = self._trunk()
        self.trunk_checked = False
        self.params = [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]
        # the training passes go through these (DDP under several processes); generation and the no-grad
        # rollout passes use the plain models
        self.policy_train, self.value_train = data_parallel(self.policy), data_parallel(ValueModel(self.value))
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(a.lr_scheduler, self.total, round(a.warmup_ratio * self.total)))
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl
                       else FixedKLController(a.kl_coef))
        self.shaper = ScoreShaper(a)
        self.gen_config = GenerationConfig(
            do_sample=True, temperature=a.temperature, top_k=a.top_k or 0, top_p=a.top_p,
            max_new_tokens=a.max_new_tokens, eos_token_id=plan.eos_ids, pad_token_id=plan.tok.pad_token_id,
            bos_token_id=plan.tok.bos_token_id, use_cache=True)
        self.sampling = vllm_engine.SampleSettings(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                                   top_p=a.top_p, top_k=a.top_k or 0)
        self.history: list[dict] = []
        self.tracker = Tracker(None, staged.partial)  # --report-to opens the real one when training starts
        self.report_to = a.report_to if self.rank == 0 else None  # one run in the dashboard, from rank 0
        self.elapsed_before, self.t_start = 0.0, time.time()  # t_start is set again when training begins

    def _resume_summary(self) -> dict:
        summary = json.loads(self.staged.checkpoint.read_text(encoding="utf-8"))
        check_resume(self.a, summary, self.staged.partial, self.world)
        if summary["step"] >= self.total:
            raise ConfigError(f"--resume: the checkpoint is already at update {summary['step']} of "
                              f"--max-steps {self.total}; raise --max-steps to continue")
        return summary

    def _trunk(self) -> tuple[SharedTrunk | None, str]:
        """With --freeze-layers, the frozen lower layers that policy, reference and value model share: computed
        once per rollout instead of in every pass (`trunk`). Not with LoRA (the reference is the policy with its
        adapters off) or several processes (DDP must see each training pass whole)."""
        a = self.a
        if not a.freeze_layers:
            return None, "no frozen layers"
        if not a.shared_trunk:
            return None, "--no-shared-trunk"
        if a.lora or a.load_in_4bit:
            return None, "not with LoRA"
        if self.world > 1:
            return None, "not with several processes"
        # unless resuming, the reference (and a value model started from the policy) loads from the policy's own
        # folder: the same weights by construction
        same = () if a.resume else (self.ref, self.value) if a.value_init == "policy" else (self.ref,)
        return find_trunk(self.policy, [self.ref, self.value], a.freeze_layers, same_files=same)

    def _optimizer(self) -> torch.optim.Optimizer:
        kw = dict(lr=self.lr, eps=1e-5, weight_decay=self.a.weight_decay)
        try:  # the fused kernel is several times faster, on CPU too
            return torch.optim.AdamW(self.params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(self.params, **kw)

    def describe(self) -> str:
        a = self.a
        n_policy = sum(p.numel() for p in self.policy.parameters())
        how = f"LoRA r={a.lora_r}" if a.lora else "full fine-tune"
        procs = f" ({self.world} processes x {a.batch_size})" if self.world > 1 else ""
        return (f"ppo: policy {self.plan.policy} ({n_policy / 1e6:.0f}M parameters, {how}), reward "
                f"{self.plan.reward}, value model from the {a.value_init} model; {self.choice}, {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}, lr {self.lr:g}, {self.total} updates x "
                f"{self.global_batch} rollouts{procs}, "
                f"{self.epochs} PPO epochs x {a.batch_size // self.minibatch} minibatches"
                + (f"; the first {a.value_warmup} train the value model only" if a.value_warmup else "")
                + (f"; frozen layers: {self.trunk_reason}" if self.trunk is not None else
                   f"; frozen layers run in every pass ({self.trunk_reason})" if a.freeze_layers else ""))

    # ------------------------------------------------------------------------------------------- the loop

    def train(self) -> Path:
        """Run the updates; returns the finished stage folder (raises `Stopped` at --stop-after)."""
        self.reporter.info(self.describe())
        with StopSignals(self.reporter.info, "update") as signals, self.staged as dest, \
                Tracker(self.report_to, dest, to_dict(self.a)) as self.tracker:
            step = self.begin(dest)
            self.reporter.start(self.total)
            while step < self.total:
                try:
                    batch = self.collect(step)  # rollouts, scores, KL-shaped rewards, advantages
                    self.guard(batch, step)  # NaN scores, runaway KL to the reference
                    stats = self.train_on(batch)  # PPO epochs over minibatches, then the KL controller
                    self.sync_engine()  # --use-vllm: the next rollouts sample from the updated policy
                except Diverged as e:
                    self.reporter.finish()
                    raise self.diverged(str(e), step + 1, dest) from None
                step += 1
                self.log(step, batch, stats)  # metrics.jsonl, samples, the live display
                self.checkpoint_if_due(dest, step, signals)  # --save-every; --stop-after, signals stop here
            self.reporter.finish()
            self.tracker.close()  # its last events before the manifest, which is written last
            self.finish(dest, step)
        return self.staged.out

    def begin(self, dest: Path) -> int:
        """Fresh logs, or the state of the checkpoint being resumed; returns the update to start from."""
        metrics, samples = dest / "metrics.jsonl", dest / "samples.jsonl"
        step = 0
        if self.resume_summary is None:
            for p in (metrics, samples):
                if self.rank == 0:
                    p.write_text("", encoding="utf-8")
        else:
            self.load_state_dict(torch.load(dest / "state" / "trainer.pt", weights_only=True, map_location="cpu"))
            step = self.resume_summary["step"]
            self.history = jsonl_keep(metrics, step)
            jsonl_keep(samples, step)
            self.reporter.info(f"resuming from update {step} of {self.total} in {dest}")
        if self.engine is not None:
            check_engine_vocab(self.policy, self.plan)
        self.sync_engine()  # the engine loaded the policy's folder: it takes the weights actually trained on
        self.t_start = time.time()  # training time: loading models and state does not count
        return step

    def sync_engine(self) -> None:
        """--use-vllm: hand the policy's current weights to the generation engine (LoRA merged, Hugging Face
        names). Without it the policy samples itself and there is nothing to hand over."""
        if self.engine is not None:
            self.engine.load_weights(vllm_engine.engine_weights(self.policy))

    # ------------------------------------------------------------------------------------------- phases

    def collect(self, step: int) -> Batch:
        """Steps 1-4: sample one response per prompt, score it, shape per-token rewards, estimate advantages."""
        a, plan = self.a, self.plan
        t0 = time.time()
        runtime.seed_all(rollout_seed(a.seed, step, self.rank))  # this process's sampling and minibatch order
        # prompt order: a fresh seeded permutation per pass, a function of (seed, update) alone; each process
        # takes its own --batch-size of the update's global batch
        n, first = len(plan.prompt_ids), step * self.global_batch + self.rank * a.batch_size
        idx = [prompt_order(a.seed, n, k // n)[k % n] for k in range(first, first + a.batch_size)]
        rows = [plan.rows[i] for i in idx]
        prompt_ids = [plan.prompt_ids[i] for i in idx]
        with runtime.autocast(self.precision):  # bf16 on the CPU: fp32 weights, bf16 matmuls
            if self.engine is None:
                rollout = generate_rollouts(self.policy, prompt_ids, self.gen_config, plan.tok.pad_token_id,
                                            plan.eos_ids, self.device)
            else:  # token ids only: every log-probability comes from the policy's own forward pass below
                seed = rollout_seed(a.seed, step, self.rank)
                responses = self.engine.generate(prompt_ids, dataclasses.replace(self.sampling, seed=seed))
                rollout = rollout_from_ids(prompt_ids, responses, plan.tok.pad_token_id, plan.eos_ids, self.device)
            t1 = time.time()
            raw = score_rollout(self.rm, plan, rollout, rows, self.micro)
            scores = self.shaper(raw, rollout.ends, self.sum_all)
            t2 = time.time()
            old_logp, ref_logp, old_values, entropy, states = self.rollout_passes(rollout)
        mask = rollout.mask.to(old_logp.dtype)
        kl_tok = kl_estimate(old_logp, ref_logp, a.kl_estimator) * mask
        beta = self.kl_ctl.value
        rewards = per_token_rewards(scores, kl_tok, mask, beta)
        advantages, returns = compute_gae(rewards, old_values, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = masked_whiten(advantages, mask, sum_all=self.sum_all)
        t3 = time.time()
        batch = Batch(rows=rows, rollout=rollout, raw_scores=raw, scores=scores, old_logprobs=old_logp,
                      ref_logprobs=ref_logp, values=old_values, entropy=entropy, mask=mask, seq_kl=kl_tok.sum(1),
                      kl_coef=beta, advantages=advantages, returns=returns, started=t0,
                      seconds={"generate": t1 - t0, "score": t2 - t1, "forward": t3 - t2}, trunk_states=states,
                      value_only=step < a.value_warmup)
        batch.figures = figures(batch)
        return batch

    def rollout_passes(self, rollout: Rollout) -> tuple[torch.Tensor, ...]:
        """`rollout_forward` of the policy, reference and value model; on the first rollout with a shared trunk,
        its log-probabilities are checked against the policy's full forward pass (`check_trunk`). Any difference
        beyond rounding, or an error (a model whose layers are called otherwise), turns the shortcut off, and
        the passes run again in full."""
        a = self.a

        def passes() -> tuple[torch.Tensor, ...]:  # through the trunk while there is one
            return rollout_forward(self.policy, self.policy if a.lora else self.ref, self.value, rollout,
                                   a.temperature, self.micro, a.lora, self.trunk)

        if self.trunk is not None and not self.trunk_checked:
            self.trunk_checked = True
            try:
                out = passes()
                diff = check_trunk(self.policy, rollout, a.temperature, out[0])
                ok, why = diff <= TRUNK_TOLERANCE[self.precision], f"differs from the full pass by {diff:.2g}"
            except Exception as e:  # noqa: BLE001 - any failure of the shortcut means the full passes
                ok, why = False, f"failed ({type(e).__name__}: {e})"
            if ok:
                return out
            self.trunk, self.trunk_reason = None, f"the shared-trunk shortcut {why}"
            self.reporter.info(f"frozen layers: {self.trunk_reason}; running full forward passes")
        return passes()

    def train_on(self, batch: Batch) -> UpdateStats:
        """Step 5: PPO epochs over minibatches (clipped policy and value losses, gradient clipping), stopping
        early once the approximate KL to the rollout policy passes --target-kl; then the LR schedule and the KL
        controller advance."""
        t3 = time.time()
        stats: dict[str, list[float]] = {}
        first_check: dict[str, float] = {}
        epochs_done, steps_done, stopped = 0, 0, False
        for _ in range(self.epochs):
            for minibatch in minibatches(batch.rollout, self.minibatch, self.a.group_by_length):
                mb_stats = self.minibatch_step(batch, minibatch.to(self.device), first_check)
                stopped = self.a.target_kl is not None and mb_stats["approx_kl"] > self.a.target_kl
                if not stopped:  # else the policy has drifted too far: drop this step and the rest
                    mb_stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.a.max_grad_norm))
                    for k in ("policy_loss", "value_loss", "grad_norm"):
                        if not math.isfinite(mb_stats[k]):  # before the step: the weights stay as they were
                            raise Diverged(f"{k.replace('_', ' ')} is {mb_stats[k]}")
                    self.optimizer.step()
                    steps_done += 1
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
                if stopped:
                    break
            epochs_done += 1
            if stopped:
                break
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.kl_ctl.update(batch.figures["kl"], self.global_batch)  # the mean KL over every process
        batch.seconds["train"] = time.time() - t3
        return UpdateStats(means={k: sum(v) / len(v) for k, v in stats.items()}, lr=lr, ppo_epochs_done=epochs_done,
                           optimizer_steps=steps_done, early_stopped=stopped, first_check=first_check)

    def minibatch_step(self, batch: Batch, minibatch: torch.Tensor, first_check: dict[str, float]) -> dict[str, float]:
        """The gradients of one minibatch, accumulated over its micro-batches with token weights, so the sum is
        the minibatch's exact token-mean loss. Fills `first_check` on the first call of the update (the ratio
        must start at 1)."""
        a = self.a
        # the minibatch's tokens over every process: DDP averages the processes' gradients, so each process's
        # loss is scaled by the process count to make the average the token mean over the global minibatch
        n_tok = batch.mask[minibatch].sum()
        if self.sum_all is not None:
            n_tok = self.sum_all(n_tok.reshape(1))[0].to(n_tok.dtype)
        n_tok = n_tok.clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        mb_stats: dict[str, float] = {}
        parts = minibatch.split(self.micro)
        for i, part in enumerate(parts):
            seq, attn, prompt_len, width = trimmed(batch.rollout, part)
            mask = batch.mask[part][:, :width]
            old_logp = batch.old_logprobs[part][:, :width]
            with self.no_sync(last=i == len(parts) - 1):  # gradients are averaged once, after the last part
                with runtime.autocast(self.precision):  # forward passes only: backward follows autocast's casts
                    # --value-warmup: the policy's pass without gradients, so the policy stays as it is
                    policy_grad = contextlib.nullcontext() if not batch.value_only else torch.no_grad()
                    if batch.trunk_states is not None:  # the frozen layers' output, computed once per rollout
                        k = batch.rollout.prompt_len - prompt_len
                        h = batch.trunk_states[part][:, k:k + seq.shape[1]]
                        with policy_grad:
                            logits = self.trunk.response_logits(self.policy, h, attn, prompt_len, a.temperature)
                        vpred_all = self.trunk.token_scores(self.value, h, attn)
                    else:
                        with policy_grad:
                            logits = response_logits(self.policy_train, seq, attn, prompt_len, a.temperature)
                        vpred_all = self.value_train(seq, attn)
                    new_logp = logprobs_from_logits(logits, batch.rollout.response[part][:, :width])
                    del logits
                    vpred = vpred_all[:, prompt_len - 1:-1]
                pg, pg_stats = policy_loss(new_logp, old_logp, batch.advantages[part][:, :width], mask, a.clip_eps)
                vf, vf_stats = value_loss(vpred, batch.values[part][:, :width], batch.returns[part][:, :width],
                                          mask, a.clip_value)
                weight = mask.sum() / n_tok
                loss = a.vf_coef * vf if batch.value_only else pg + a.vf_coef * vf
                (loss * weight * self.world).backward()
            if not first_check:
                deviation = (new_logp - old_logp).detach().abs() * mask
                first_check.update({"check/first_logratio_max": float(deviation.max()),
                                    "check/first_approx_kl": float(pg_stats["approx_kl"])})
            for k, v in {"policy_loss": pg, "value_loss": vf, **pg_stats, **vf_stats}.items():
                mb_stats[k] = mb_stats.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * float(weight)
        if self.sum_all is not None:  # token-weighted over every process: the same figures (and early stop) on all
            keys = sorted(mb_stats)
            summed = self.sum_all(torch.tensor([mb_stats[k] for k in keys], dtype=torch.float64)).tolist()
            mb_stats = dict(zip(keys, summed, strict=True))
        return mb_stats

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Inside a minibatch, keep DDP from averaging gradients until its last micro-batch."""
        if self.world <= 1 or last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for model in (self.policy_train, self.value_train):
            stack.enter_context(model.no_sync())
        return stack

    def log(self, step: int, batch: Batch, stats: UpdateStats) -> None:
        """One line of metrics.jsonl, samples every --sample-every updates, the live display."""
        a, fig = self.a, batch.figures  # means over every process's rollouts
        t = batch.seconds
        update_time = time.time() - batch.started
        row = {
            "step": step, "episodes": step * self.global_batch,
            "score_mean": fig["score_mean"], "score_std": fig["score_std"],
            "reward_mean": fig["reward_mean"], "kl": fig["kl"], "kl_coef": batch.kl_coef,
            "entropy": fig["entropy"], "response_length": fig["response_length"],
            "response_length_max": fig["response_length_max"], "eos_fraction": fig["eos_fraction"],
            **stats.means,
            "value_mean": fig["value_mean"], "return_mean": fig["return_mean"],
            "lr": stats.lr, "ppo_epochs_done": stats.ppo_epochs_done, "optimizer_steps": stats.optimizer_steps,
            "early_stopped": stats.early_stopped, "value_only": batch.value_only, **stats.first_check,
            "episodes_per_second": self.global_batch / update_time,
            "time/generate": t["generate"], "time/score": t["score"], "time/forward": t["forward"],
            "time/train": t["train"], "time/update": update_time,
        }
        self.history.append(row)
        jsonl_append(self.staged.partial / "metrics.jsonl", row)
        self.tracker.log(step, row)  # --report-to: the same figures, as train/NAME
        if a.sample_every and (step % a.sample_every == 0 or step == 1) and self.rank == 0:
            self.show_samples(step, batch)
        self.reporter.update(step, self.total, {
            "score": row["score_mean"], "score_std": row["score_std"], "kl": row["kl"], "entropy": row["entropy"],
            "clipfrac": row["clipfrac"], "approx_kl": row["approx_kl"], "vf_loss": row["value_loss"],
            "len": row["response_length"], "eps/s": row["episodes_per_second"],
        }, self.elapsed_before + time.time() - self.t_start)

    def show_samples(self, step: int, batch: Batch) -> None:
        texts = response_texts(self.plan.tok, batch.rollout, N_SAMPLES)
        shown = []
        for r, text, score in zip(batch.rows, texts, batch.raw_scores.tolist(), strict=False):
            jsonl_append(self.staged.partial / "samples.jsonl",
                         {"step": step, "prompt": r["prompt"], "response": text, "score": score})
            shown.append({"prompt": r["prompt"][-1]["content"][:200], "response": text[:400], "score": score})
        self.reporter.samples(f"samples at update {step}", shown)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self, step: int, with_optimizer: bool = True) -> dict:
        """What --resume needs besides the weights. The finished folder keeps everything but the optimiser
        moments (twice the trainable weights' size)."""
        opt_state = {"optimizer": self.optimizer.state_dict()} if with_optimizer else {}
        return {"step": step, **opt_state, "scheduler": self.scheduler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "moments": self.shaper.moments.state_dict(),
                "elapsed": self.elapsed_before + time.time() - self.t_start,
                "summary": {"step": step, "total": self.total, "args": to_dict(self.a), "processes": self.world,
                            "kl_ctl": self.kl_ctl.state_dict(), "moments": self.shaper.moments.state_dict()}}

    def load_state_dict(self, st: dict) -> None:
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.kl_ctl.load_state_dict(st["kl_ctl"])
        self.shaper.moments.load_state_dict(st["moments"])
        self.elapsed_before = st.get("elapsed", 0.0)

    def guard(self, batch: Batch, step: int) -> None:
        """Stop before an update that would learn from NaN scores or from a policy already far from the
        reference (--max-kl)."""
        if batch.figures["not_finite"]:  # on any process: every process stops
            bad = batch.raw_scores[~torch.isfinite(batch.raw_scores)]
            raise Diverged(f"the reward model's score is {float(bad[0]) if len(bad) else 'not finite'} for a "
                           f"response")
        kl = batch.figures["kl"]
        if not math.isfinite(kl) or kl > self.a.max_kl:
            raise Diverged(f"the KL to the reference is {kl:.1f} nats per response, above --max-kl {self.a.max_kl:g} "
                           f"(runaway optimisation)")

    def diverged(self, what: str, update: int, dest: Path) -> TrainingError:
        good = self.staged.checkpoint
        if good.is_file():
            at = json.loads(good.read_text(encoding="utf-8"))["step"]
            keep = f"the last good checkpoint (update {at}) is in {dest}: --resume continues from it"
        else:
            keep = "no checkpoint was saved before it (--save-every N keeps one)"
        return TrainingError(f"{what} at update {update}: training stopped; {keep}; expected a stable run: lower "
                             f"--lr, raise --kl-coef, or check the reward model")

    def checkpoint_if_due(self, dest: Path, step: int, signals: StopSignals | None = None) -> None:
        a = self.a
        # a signal that reached any process stops all of them after this update
        if step < self.total and runtime.any_rank(bool(signals)):
            self.save(dest, step)
            self.reporter.finish()
            raise signals.stop(f"after update {step} of {self.total}", str(dest))
        if a.save_every and step % a.save_every == 0 and step < self.total:
            self.save(dest, step)
        if a.stop_after is not None and step >= a.stop_after and step < self.total:
            self.save(dest, step)
            self.reporter.finish()
            raise Stopped()

    def weights_in_sync(self) -> bool:
        """Under several processes: whether every process ends with rank 0's trained weights (DDP keeps them
        equal; rank 0 alone saves, so a difference would be lost silently). Raises if they differ."""
        if self.world <= 1:
            return True
        mine = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for p in self.params]).reshape(-1).to(self.device)
        theirs = mine.clone()  # on this process's device: the CPU for gloo, the GPU for NCCL
        torch.distributed.broadcast(theirs, src=0)
        differs = runtime.any_rank(not torch.allclose(mine, theirs, rtol=1e-6, atol=1e-9))
        if differs:
            raise TrainingError("the processes' trained weights differ at the end of the run: expected DDP to keep "
                                "them equal; rerun with one process, and report this with the command used")
        return True

    def save(self, dest: Path, step: int, with_optimizer: bool = True) -> None:
        """A checkpoint, written by rank 0 (the weights and optimiser states are the same on every process; the
        RNG is re-seeded from (seed, update, rank) every update); the others wait until it is complete."""
        if self.rank == 0:
            save_checkpoint(dest, self.policy, self.value, self.plan.tok, self.a,
                            self.state_dict(step, with_optimizer))
        runtime.barrier()

    def finish(self, dest: Path, step: int) -> None:
        """The finished folder: final weights (merged with LoRA), the resolved config, the manifest last."""
        a = self.a
        in_sync = self.weights_in_sync()
        self.save(dest, step, with_optimizer=False)
        if a.lora and self.rank == 0:
            finish_lora(dest, self.policy, self.value, self.plan.tok, a)
        dump_yaml(a, dest / "rlhf_config.yaml", header="# rlhf ppo --config rlhf_config.yaml\n")
        first, last, history = self.history[0], self.history[-1], self.history
        times = [h["time/update"] for h in history]
        metrics = {
            "updates": step, "episodes": step * self.global_batch,
            "initial_score_mean": first["score_mean"], "final_score_mean": last["score_mean"],
            "final_kl": last["kl"], "final_kl_coef": self.kl_ctl.value, "final_entropy": last["entropy"],
            "final_response_length": last["response_length"], "final_eos_fraction": last["eos_fraction"],
            "seconds_per_update": sum(times) / len(times),
            **{f"seconds_{k[5:]}_per_update": sum(h[k] for h in history) / len(history)
               for k in ("time/generate", "time/score", "time/forward", "time/train")},
            "reward_input": "token ids" if self.plan.same_ids else "re-encoded text",
            "generation": self.engine.name if self.engine is not None else "hf",
            "threads": self.threads, "precision": self.precision, "precision_reason": self.choice.reason,
            "shared_trunk_layers": self.a.freeze_layers if self.trunk is not None else 0,
            "shared_trunk": self.trunk_reason,
            "lr": self.lr,
            "memory": self.memory.with_peak(),
            **({"weights_in_sync": in_sync} if self.world > 1 else {}),
        }
        write_ppo_manifest(dest, a, self.plan, metrics, self.started, lr=self.lr, ppo_epochs=self.epochs,
                           minibatch_size=self.minibatch)

