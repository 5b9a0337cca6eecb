"""`rlhf ppo --algo grpo | rloo`: TRL's GRPOTrainer / RLOOTrainer on the same prompts, reward model and output
layout as our PPO (group baselines instead of a value model; the KL penalty is TRL's `beta`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rlhf_cli.core import memory, runtime, tracking
from rlhf_cli.core.config import dump_yaml
from rlhf_cli.core.errors import TrainingError
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.models import set_distinct_pad
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import RewardModel
from rlhf_cli.core.training import (
    complete_checkpoints,
    drop_checkpoints,
    drop_printer,
    freeze_lower_layers,
    lora_config,
    save_model,
)
from rlhf_cli.stages.ppo.args import DEFAULT_LORA_LR, DEFAULT_LR, PPO_ONLY, PPOArgs, ppo_epochs, updates
from rlhf_cli.stages.ppo.checkpoint import PPOOutput, Stopped, jsonl_append, jsonl_keep, write_ppo_manifest
from rlhf_cli.stages.ppo.preflight import Plan, plan_memory
from rlhf_cli.stages.ppo.rollout import ScoreShaper

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


class RewardFunction:
    """TRL's reward function: the RM's score of each prompt + completion, shaped as our PPO shapes it."""

    __name__ = "reward_model"  # TRL names the logged reward after it

    def __init__(self, rm: RewardModel, a: PPOArgs, eos_ids: list[int]):
        self.rm, self.a, self.eos = rm, a, set(eos_ids)
        self.shaper = ScoreShaper(a)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **kw: Any) -> list[float]:
        convs = [p + c if isinstance(p, list) else [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": c}]
                 for p, c in zip(prompts, completions, strict=True)]
        raw = torch.tensor(self.rm.score_conversations(convs, self.a.batch_size))
        ends = torch.tensor([bool(ids) and ids[-1] in self.eos for ids in completion_ids])
        if "log_metric" in kw:
            kw["log_metric"]("score_raw", float(raw.mean()))
        return self.shaper(raw, ends).tolist()


class TRLLog(TrainerCallback):
    """metrics.jsonl (one line per step, the same names as our PPO's), the live figures, and --stop-after."""

    def __init__(self, a: PPOArgs, dest: Path, total: int, reporter: Reporter, history: list[dict],
                 signals: StopSignals | None = None):
        self.a, self.dest, self.total, self.reporter, self.history = a, dest, total, reporter, history
        self.signals = signals
        self.bad: str | None = None  # a NaN/inf figure or runaway KL: stop without saving
        self.t0 = self.last_step_time = time.time()

    def on_train_begin(self, args, state, control, **kw):
        self.reporter.start(state.max_steps or self.total)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        for k in ("loss", "grad_norm", "reward"):
            if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k]):
                self.bad = f"{k.replace('_', ' ')} is {logs[k]} at step {state.global_step}"
        kl = logs.get("kl")
        length = logs.get("completions/mean_length") or self.a.max_new_tokens
        if isinstance(kl, (int, float)) and kl * length > self.a.max_kl:  # TRL logs the KL per token
            self.bad = (f"the KL to the reference is about {kl * length:.1f} nats per response at "
                        f"step {state.global_step}, above --max-kl {self.a.max_kl:g} (runaway optimisation)")
        if self.bad:
            control.should_training_stop, control.should_save = True, False
            return
        if "reward" not in logs:
            return
        now = time.time()
        row = {"step": state.global_step, "episodes": state.global_step * self.a.batch_size,
               "score_mean": logs.get("score_raw", logs["reward"]), "reward_mean": logs["reward"],
               "score_std": logs.get("reward_std"), "kl": logs.get("kl"), "entropy": logs.get("entropy"),
               "response_length": logs.get("completions/mean_length"),
               "time/update": now - self.last_step_time, **logs}
        self.last_step_time = now
        self.history.append(row)
        jsonl_append(self.dest / "metrics.jsonl", row)
        fig = {"score": row["score_mean"], "score_std": row["score_std"], "kl": row["kl"],
               "entropy": row["entropy"], "clipfrac": logs.get("clip_ratio/region_mean"),
               "len": row["response_length"]}
        self.reporter.update(state.global_step, state.max_steps, {k: v for k, v in fig.items() if v is not None},
                             now - self.t0)

    def on_step_end(self, args, state, control, **kw):
        stop_after = self.a.stop_after is not None and self.a.stop_after <= state.global_step
        # a signal that reached one rank stops every rank at this step (core.runtime.any_rank)
        if state.global_step < self.total and not self.bad and runtime.any_rank(stop_after or bool(self.signals)):
            control.should_training_stop = True
            control.should_save = True

    def on_train_end(self, args, state, control, **kw):
        self.reporter.finish()


def trl_config(a: PPOArgs, out: Path, lr: float, precision: str, total: int,
               mem: memory.MemoryPlan | None = None, max_model_len: int | None = None) -> Any:
    """The GRPO/RLOO config for our flags; `mem`: the planner's micro-batches (TRL samples the whole
    --batch-size at once and trains on it in micro-batches that it accumulates), and whether it needs gradient
    checkpointing; `max_model_len`: the longest prompt + response, vLLM's context (its KV cache is sized by it)."""
    config_cls, _ = TRAINERS[a.algo]
    micro, accum = (mem.micro_batch, mem.grad_accum) if mem else (a.batch_size // a.grad_accum, a.grad_accum)
    return config_cls(
        output_dir=str(out), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=lr, lr_scheduler_type=a.lr_scheduler,
        warmup_steps=a.warmup_ratio,  # transformers reads a value below 1 as a fraction of the steps
        weight_decay=a.weight_decay, max_steps=total, seed=a.seed, data_seed=a.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", logging_steps=1,
        # the memory planner turns it on when no micro-batch fits without it
        gradient_checkpointing=bool(mem and mem.gradient_checkpointing),
        logging_strategy="steps", save_strategy="steps" if a.save_every else "no", save_steps=a.save_every or 500,
        eval_strategy="no", report_to=tracking.hf_report_to(a.report_to), run_name=tracking.run_name(out.parent),
        project=tracking.PROJECT, disable_tqdm=True, dataloader_num_workers=0,
        num_generations=a.group_size, max_completion_length=a.max_new_tokens, temperature=a.temperature,
        top_p=a.top_p, top_k=a.top_k or 0, beta=a.kl_coef, epsilon=a.clip_eps, max_grad_norm=a.max_grad_norm,
        num_iterations=ppo_epochs(a), disable_dropout=True, log_completions=False, shuffle_dataset=True,
        **vllm_kwargs(a, max_model_len), **runtime.trainer_device_kwargs(),
    )


def vllm_kwargs(a: PPOArgs, max_model_len: int | None = None) -> dict[str, Any]:
    """--use-vllm for TRL's trainers: its own vLLM integration (colocated in the training processes, or a
    `trl vllm-serve` server), its importance-sampling correction for the engine's slightly different
    log-probabilities left at TRL's default."""
    if not a.use_vllm:
        return {"use_vllm": False}
    kw: dict[str, Any] = {"use_vllm": True, "vllm_mode": a.vllm_mode}
    if a.vllm_mode == "colocate":
        kw["vllm_gpu_memory_utilization"] = a.vllm_gpu_memory_utilization
        if max_model_len:
            kw["vllm_max_model_length"] = max_model_len
    elif a.vllm_server_url:
        kw["vllm_server_base_url"] = a.vllm_server_url
    return kw


def run_trl(a: PPOArgs, plan: Plan, staged: PPOOutput, reporter: Reporter, started: float) -> Path:
    """Train with TRL's GRPO or RLOO; returns the finished stage folder (raises `Stopped` at --stop-after)."""
    say = reporter.info
    defaults = PPOArgs()
    ignored = [f"--{k.replace('_', '-')}" for k in PPO_ONLY if getattr(a, k) != getattr(defaults, k)]
    if ignored:
        say(f"--algo {a.algo}: ignoring PPO-only settings {', '.join(ignored)}")
    threads = runtime.configure_threads(a.threads)
    choice = runtime.precision_choice(a.precision)
    precision = choice.precision
    lr = a.lr or (DEFAULT_LORA_LR if a.lora else DEFAULT_LR)
    total = updates(a, len(plan.prompt_ids))
    tok = plan.tok
    mem = plan_memory(a, plan, precision, a.batch_size, say)
    transformers.set_seed(a.seed)
    policy = AutoModelForCausalLM.from_pretrained(
        plan.policy_path, **runtime.load_kwargs(plan.policy_path, AutoModelForCausalLM, precision, a.load_in_4bit),
        **plan.loading.model_kwargs())
    set_distinct_pad(tok, policy)
    policy.generation_config.eos_token_id = plan.eos_ids
    if a.freeze_layers:
        freeze_lower_layers(policy, a.freeze_layers)
    rm = RewardModel.load(plan.reward_spec, precision, tok=plan.rm_tok, max_length=plan.rm_max_length)
    history: list[dict] = []
    with StopSignals(say) as signals, staged as dest:
        resume_from = None
        if a.resume:
            last_checkpoint = complete_checkpoints(dest)[-1]
            last = int(last_checkpoint.name.rsplit("-", 1)[-1])
            history.extend(jsonl_keep(dest / "metrics.jsonl", last))
            resume_from = str(last_checkpoint)
            say(f"resuming from step {last} of {total} in {dest}")
        elif runtime.is_main_process():
            (dest / "metrics.jsonl").write_text("", encoding="utf-8")
        say(f"{a.algo}: policy {plan.policy}, reward {plan.reward}; {precision}, {threads} threads, lr {lr:g}, "
            f"{total} steps x {a.batch_size} responses ({a.batch_size // a.group_size} prompts x {a.group_size}), "
            f"beta {a.kl_coef:g}")
        trainer = TRAINERS[a.algo][1](
            model=policy, reward_funcs=RewardFunction(rm, a, plan.eos_ids),
            args=trl_config(a, dest / "trainer", lr, precision, total, mem,
                            max(len(p) for p in plan.prompt_ids) + a.max_new_tokens), processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in plan.rows]),
            peft_config=lora_config(a, "CAUSAL_LM", policy) if a.lora else None,
            callbacks=[log := TRLLog(a, dest, total, reporter, history, signals)])
        drop_printer(trainer)
        t0 = time.time()
        trainer.train(resume_from_checkpoint=resume_from)
        step = trainer.state.global_step
        if log.bad:
            done = complete_checkpoints(dest)
            keep = f"the last good checkpoint is {done[-1]} (--resume continues from it)" if done else \
                "no checkpoint was saved before it (--save-every N keeps one)"
            raise TrainingError(f"{log.bad}: training stopped; {keep}; expected a stable run: lower --lr, raise "
                                f"--kl-coef, or check the reward model")
        if signals and step < total:
            raise signals.stop(f"at step {step} of {total}", str(dest / "trainer" / f"checkpoint-{step}"))
        if a.stop_after is not None and step < total:
            raise Stopped()
        drop_checkpoints(dest)
        tok.padding_side = "right"
        save_model(trainer, tok, dest, a)
        dump_yaml(a, dest / "rlhf_config.yaml", header="# rlhf ppo --config rlhf_config.yaml\n")
        steps = trainer.state.global_step
        first, last_row = (history[0], history[-1]) if history else ({}, {})
        metrics = {"updates": steps, "episodes": steps * a.batch_size,
                   "initial_score_mean": first.get("score_mean"), "final_score_mean": last_row.get("score_mean"),
                   "final_kl": last_row.get("kl"), "final_entropy": last_row.get("entropy"),
                   "final_response_length": last_row.get("response_length"),
                   "seconds_per_update": (time.time() - t0) / max(1, steps),
                   "threads": threads, "precision": precision, "precision_reason": choice.reason, "lr": lr,
                   "generation": "vllm" if a.use_vllm else "hf", "memory": mem.with_peak()}
        write_ppo_manifest(dest, a, plan, metrics, started, lr=lr, ppo_epochs=ppo_epochs(a))
    return staged.out
