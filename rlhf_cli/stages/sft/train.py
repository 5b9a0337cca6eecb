"""Stage 1: supervised fine-tuning on written demonstrations.

The model learns to imitate `<prompt, answer>` demonstrations. By default the loss covers only the assistant's
tokens (the prompt is context, not a target), through a chat template with `{% generation %}` markers that
renders exactly as the model's own. Training runs on TRL's SFTTrainer with hardware-aware defaults: no gradient
checkpointing on CPU; bf16 on GPUs that have it and on CPUs where it measures faster (fp32 weights, bf16 autocast).

    rlhf sft --model HuggingFaceTB/SmolLM2-135M-Instruct --data examples/data/sft_messages.jsonl --run runs/demo
"""

from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from rlhf_cli.core import dry_run as dry
from rlhf_cli.core import hub, runtime, training
from rlhf_cli.core.chat_template import training_template
from rlhf_cli.core.config import dump_yaml, to_dict
from rlhf_cli.core.errors import CheckpointError
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.manifest import Manifest, StagedOutput, manifest_if_stage, write_manifest
from rlhf_cli.core.memory import MemoryPlan
from rlhf_cli.core.models import LoadOptions, load_tokenizer, resolve_model, set_distinct_pad
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.stages import a_stage, command_for, is_policy
from rlhf_cli.data import DataSet, load_sft
from rlhf_cli.stages.sft.args import DEFAULT_LORA_LR, DEFAULT_LR, DEFAULT_MAX_LENGTH, SFTArgs


def token_counts(data: DataSet, tok) -> list[int]:
    """Tokens of each conversation as the chat template renders it, before any truncation."""
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in data.rows]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def sft_lengths(counts: list[int], max_length: int, args: SFTArgs) -> list[int]:
    """Token lengths of the training rows as the trainer will see them (capped at --max-length); with packing
    every sequence is --max-length long."""
    if args.packing:
        return [max_length]
    return [min(n, max_length) for n in counts]


def dry_run(args: SFTArgs, reporter: Reporter, staged: StagedOutput, model_path: Path, plan: MemoryPlan,
            counts: list[int],
            evalset: DataSet | None, tok, max_length: int, lr: float, precision: object, threads: int,
            parent: Manifest | None, train: DataSet) -> Path:
    """`--dry-run`: the plan of this run (see `rlhf_cli.core.dry_run`)."""
    # packed: every sequence is --max-length tokens long, as many of them as the tokens fill
    examples = [max_length] * max(1, -(-sum(counts) // max_length)) if args.packing else \
        sft_lengths(counts, max_length, args)
    eval_tokens = sum(min(n, max_length) for n in token_counts(evalset, tok)) if evalset else 0
    data = {"model": f"{args.model} ({model_path})",
            "parent stage": str(parent.path) if parent else "none (a base or instruct model)",
            "data": train.describe(), "eval data": evalset.describe() if evalset else "none",
            "token lengths": dry.length_stats(counts),
            "truncated to --max-length": f"{sum(n > max_length for n in counts)} rows longer than {max_length}"}
    if args.packing:
        data["packing"] = f"{len(examples)} sequences of {max_length} tokens"
    return dry.trainer_stage(args, reporter, "sft", staged.out, model_path, plan, example_tokens=examples,
                             unit="rows", data=data, eval_tokens=eval_tokens,
                             resolved={"lr (used)": lr, "precision (used)": str(precision), "threads (used)": threads})


def run_sft(args: SFTArgs, reporter: Reporter | None = None) -> Path:
    """Fine-tune `args.model` on `args.data`; returns the finished stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    staged, train, evalset = training.prepare_stage(args, "sft", load_sft, say)

    parent = manifest_if_stage(args.model)
    if parent is not None and not is_policy(parent.stage):
        raise CheckpointError(
            f"--model {args.model}: is {a_stage(parent.stage)}; sft starts from a base or instruct model or an sft "
            f"stage, for example `{command_for('sft')}`")
    max_length = training.inherit(args, parent, "max_length", DEFAULT_MAX_LENGTH, say)
    lr = args.lr or (DEFAULT_LORA_LR if args.lora else DEFAULT_LR)
    saved = training.check_resume(args, staged)
    loading = LoadOptions.of(args)
    model_path = resolve_model(args.model, say=say, loading=loading)

    runtime.quiet_libraries()
    threads = runtime.configure_threads(args.threads)
    choice = runtime.precision_choice(args.precision)
    precision = choice.precision
    tok = load_tokenizer(model_path, loading=loading)
    if args.assistant_only_loss:
        tok.chat_template = training_template(tok)
    counts = token_counts(train, tok)
    plan = training.plan_memory(args, model_path, causal=True, lengths=sft_lengths(counts, max_length, args),
                                seqs_per_example=1, precision=precision, say=say, saved=saved)
    if args.dry_run:
        return dry_run(args, reporter, staged, model_path, plan, counts, evalset, tok, max_length, lr, choice,
                       threads, parent, train)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=runtime.weight_dtype(precision),
                                                 **loading.model_kwargs())
    set_distinct_pad(tok, model)
    trainable = training.freeze_lower_layers(model, args.freeze_layers)
    say(training.describe_setup(f"model {args.model}", model, args, str(choice), threads, lr, trainable))

    with StopSignals(say) as signals, staged as dest:
        resume_from = training.resume_point(dest, saved, args, plan, say)
        cfg = SFTConfig(**training.hf_training_kwargs(args, dest, lr, precision, plan),
                        max_length=max_length, packing=args.packing,
                        assistant_only_loss=args.assistant_only_loss, dataset_num_proc=None)
        trainer = SFTTrainer(
            model=model, args=cfg, processing_class=tok,
            train_dataset=Dataset.from_list(train.rows),
            eval_dataset=Dataset.from_list(evalset.rows) if evalset else None,
            peft_config=training.lora_config(args, "CAUSAL_LM", model) if args.lora else None,
            callbacks=[training.ProgressCallback(reporter), guard := training.GuardCallback(signals)],
        )
        training.drop_printer(trainer)
        metrics: dict = {}
        if evalset:
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume_from)
        training.raise_if_stopped(trainer, guard, dest, signals)
        metrics.update(train_loss=training.train_loss(trainer, result.training_loss), steps=trainer.state.global_step,
                       train_seconds=round(time.time() - t0, 2),
                       tokens=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0))
        first = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
        last = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
        metrics.update(first_loss=first, last_loss=last)
        if evalset:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        training.drop_checkpoints(dest)
        training.save_model(trainer, tok, dest, args)
        training.write_metrics(trainer, dest)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf sft --config rlhf_config.yaml\n")
        data = {"train": train.summary(), "eval": evalset.summary() if evalset else None}
        write_manifest(dest, stage="sft", parents=[str(parent.path) if parent else args.model],
                       args=to_dict(args) | {"resolved_model": str(model_path), "lr": lr}, data=data,
                       metrics=metrics | {"threads": threads, "precision": precision, "precision_reason": choice.reason,
                                          "memory": plan.with_peak()},
                       started=started)
    hub.push_if_asked(args, staged.out, say)  # --push-to-hub: checked before training, uploaded now
    return staged.out
