"""Stage 1: supervised fine-tuning on written demonstrations.

The model learns to imitate `<prompt, answer>` demonstrations. By default the loss covers only the assistant's
tokens (the prompt is context, not a target), through a chat template with `{% generation %}` markers that
renders exactly as the model's own. Training runs on TRL's SFTTrainer with hardware-aware defaults: fp32 and no
gradient checkpointing on CPU, bf16 on GPUs that have it.

    rlhf sft --model HuggingFaceTB/SmolLM2-135M-Instruct --data examples/data/sft_messages.jsonl --run runs/demo
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.core.config import check_choices, dump_yaml, opt, to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.manifest import STAGE_COMMANDS, StagedOutput, a_stage, stage_dir, write_manifest
from rlhf_cli.core.models import (
    configure_threads,
    load_tokenizer,
    pick_precision,
    resolve_model,
    set_distinct_pad,
    torch_dtype,
)
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.training import (
    TrainArgs,
    check_common,
    describe_setup,
    drop_printer,
    freeze_lower_layers,
    hf_training_kwargs,
    inherit,
    lora_config,
    make_progress_callback,
    parent_of,
    quiet_libraries,
    save_model,
    write_metrics,
)
from rlhf_cli.data.io import SFT_FORMATS, load_sft, split_eval

DEFAULT_MAX_LENGTH = 1024
DEFAULT_LR = 2e-5
DEFAULT_LORA_LR = 2e-4


@dataclass
class SFTArgs(TrainArgs):
    format: str = opt("auto", "Data format; detected from the fields when auto.", choices=SFT_FORMATS)
    assistant_only_loss: bool = opt(True, "Train only on the assistant's tokens (the prompt is context).")
    packing: bool = opt(False, "Pack several short examples into each sequence of --max-length tokens.")


def run_sft(args: SFTArgs, reporter: Reporter | None = None) -> Path:
    """Fine-tune `args.model` on `args.data`; returns the finished stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    check_common(args)
    check_choices(args)
    out = stage_dir(args.out, args.run, "sft", "--out")
    if out is None:
        raise ConfigError("--out: missing; pass --out DIR or --run DIR (writes DIR/sft)")
    staged = StagedOutput(out, args.overwrite)

    train = load_sft(args.data, args.format, args.max_samples)
    say(train.describe())
    evalset = None
    if args.eval_data:
        evalset = load_sft(args.eval_data, args.format, flag="--eval-data")
        say(evalset.describe())
    elif args.eval_split:
        train, evalset = split_eval(train, args.eval_split, args.seed)
        say(f"held out {evalset.kept} rows for eval")

    parent = parent_of(args.model)
    if parent is not None and parent.stage not in ("sft", "ppo", "rejection"):
        raise CheckpointError(
            f"--model {args.model}: is {a_stage(parent.stage)}; sft starts from a base or instruct model or an sft "
            f"stage, for example `{STAGE_COMMANDS['sft']}`")
    max_length = inherit(args, parent, "max_length", DEFAULT_MAX_LENGTH, say)
    lr = args.lr or (DEFAULT_LORA_LR if args.lora else DEFAULT_LR)
    model_path = resolve_model(args.model, say=say)

    quiet_libraries()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf_cli.core.chat_template import training_template

    threads = configure_threads(args.threads)
    precision = pick_precision(args.precision)
    tok = load_tokenizer(model_path)
    if args.assistant_only_loss:
        tok.chat_template = training_template(tok)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(precision))
    set_distinct_pad(tok, model)
    trainable = freeze_lower_layers(model, args.freeze_layers)
    say(describe_setup(f"model {args.model}", model, args, precision, threads, lr, trainable))

    with staged as dest:
        cfg = SFTConfig(**hf_training_kwargs(args, dest, lr, precision, evalset is not None),
                        max_length=max_length, packing=args.packing,
                        assistant_only_loss=args.assistant_only_loss, dataset_num_proc=None)
        trainer = SFTTrainer(
            model=model, args=cfg, processing_class=tok,
            train_dataset=Dataset.from_list(train.rows),
            eval_dataset=Dataset.from_list(evalset.rows) if evalset else None,
            peft_config=lora_config(args, "CAUSAL_LM", model) if args.lora else None,
            callbacks=[make_progress_callback(reporter)],
        )
        drop_printer(trainer)
        metrics: dict = {}
        if evalset:
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        t0 = time.time()
        result = trainer.train()
        metrics.update(train_loss=result.training_loss, steps=trainer.state.global_step,
                       train_seconds=round(time.time() - t0, 2),
                       tokens=int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0))
        first = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
        last = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
        metrics.update(first_loss=first, last_loss=last)
        if evalset:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        shutil.rmtree(dest / "trainer", ignore_errors=True)
        save_model(trainer, tok, dest, args)
        write_metrics(trainer, dest)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf sft --config rlhf_config.yaml\n")
        data = {"train": train.summary(), "eval": evalset.summary() if evalset else None}
        write_manifest(dest, stage="sft", parents=[str(parent.path) if parent else args.model],
                       args=to_dict(args) | {"resolved_model": str(model_path), "lr": lr}, data=data,
                       metrics=metrics | {"threads": threads, "precision": precision}, started=started)
    return out
