"""What every training stage shares: the common flags, hardware defaults, progress, LoRA, the stage folder.

The shared flags have the same names in every stage: --model, --data, --eval-data, --out, --run, --config,
--max-steps, --epochs, --lr, --batch-size, --grad-accum, --max-length, --seed, --lora, --max-samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.config import opt
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.manifest import Manifest, manifest_if_stage
from rlhf_cli.core.models import DEFAULT_MODEL
from rlhf_cli.core.progress import Reporter


@dataclass
class TrainArgs:
    model: str = opt(DEFAULT_MODEL, "Model to start from: a stage folder, a local model folder or a hub id.")
    data: str | None = opt(None, "Training data: .jsonl/.json/.csv/.parquet file, folder, or hub dataset "
                                 "(name, name:split, name:config:split).")
    eval_data: str | None = opt(None, "Held-out data in the same format, for eval metrics.")
    eval_split: float = opt(0.0, "Hold out this fraction of --data for eval (when --eval-data is not given).")
    out: str | None = opt(None, "Output folder (default: RUN/STAGE when --run is given).")
    run: str | None = opt(None, "Run folder: stages write RUN/sft, RUN/reward, ... and find their parents there.")
    overwrite: bool = opt(False, "Replace a finished stage already in --out (only once the new one is complete).")
    format: str = opt("auto", "Data format; detected from the fields when auto.")
    max_samples: int | None = opt(None, "Use at most this many rows (prompts, for ranked lists) of --data.")
    max_steps: int | None = opt(None, "Stop after this many optimiser steps (overrides --epochs).")
    epochs: float = opt(1.0, "Passes over the training data.")
    lr: float | None = opt(None, "Peak learning rate (stage default when not given).")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule.",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_ratio: float = opt(0.05, "Fraction of steps spent warming up the learning rate.")
    batch_size: int = opt(8, "Examples (pairs, for reward) per device step.")
    grad_accum: int = opt(1, "Steps whose gradients are summed before each optimiser step.")
    max_length: int | None = opt(None, "Longest sequence in tokens (default: the parent stage's, else the "
                                       "stage default).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    seed: int = opt(42, "Random seed (data order, head initialisation, LoRA).")
    lora: bool = opt(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    lora_targets: str = opt("all-linear", "Modules that get adapters: all-linear or a comma list "
                                          "(q_proj,v_proj).")
    lora_merge: bool = opt(True, "Merge adapters into a full checkpoint (the adapter is kept in OUT/adapter).")
    precision: str = opt("auto", "Numeric precision: auto = bf16 on GPUs that have it, fp32 on CPU.",
                         choices=("auto", "fp32", "bf16", "fp16"))
    freeze_layers: int = opt(0, "Freeze the embeddings and the lowest N transformer layers: no backward pass "
                                "through them, much faster on CPU (LoRA adapters, if any, go in the rest).")
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory (slower).")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores this process may use).")
    logging_steps: int = opt(1, "Log metrics every N optimiser steps.")


def parent_of(model: str) -> Manifest | None:
    return manifest_if_stage(model)


def inherit(args: Any, parent: Manifest | None, name: str, fallback: Any, say) -> Any:
    """A setting not given: the parent stage's value (and say so), else the stage default."""
    value = getattr(args, name)
    if value is not None:
        if parent is not None and parent.args.get(name) not in (None, value):
            say(f"--{name.replace('_', '-')} {value} overrides the parent's {parent.args.get(name)}")
        return value
    if parent is not None and parent.args.get(name) is not None:
        value = parent.args[name]
        say(f"inherited {name}={value} from {parent.path}")
    else:
        value = fallback
    setattr(args, name, value)
    return value


def check_common(args: TrainArgs) -> None:
    if args.freeze_layers < 0:
        raise ConfigError(f"--freeze-layers {args.freeze_layers}: expected a whole number >= 0")
    for name in ("batch_size", "grad_accum", "lora_r", "logging_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a whole number >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: expected a whole number >= 1")
    if args.epochs <= 0:
        raise ConfigError(f"--epochs {args.epochs}: expected a positive number")
    if args.lr is not None and not (0 < args.lr < 1):
        raise ConfigError(f"--lr {args.lr}: expected a small positive number such as 1e-5")
    if args.max_length is not None and args.max_length < 16:
        raise ConfigError(f"--max-length {args.max_length}: expected at least 16 tokens")
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio {args.warmup_ratio}: expected a fraction of the steps, 0 <= x < 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples {args.max_samples}: expected a whole number >= 1")
    if args.data is None:
        raise ConfigError("--data: missing; expected a data file, folder or hub dataset name")


def hf_training_kwargs(args: TrainArgs, out: Path, lr: float, precision: str, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments that suit the hardware; TRL's defaults (bf16, gradient checkpointing) hurt on CPU."""
    import torch

    kw = dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )
    return kw


def freeze_lower_layers(model: Any, n: int) -> int:
    """Freeze input embeddings and the first `n` decoder layers; returns the number of trainable parameters.

    With tied input/output embeddings (SmolLM2) the LM head is frozen too; a reward model's score head stays
    trainable."""
    if n <= 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    import torch

    total = getattr(model.config, "num_hidden_layers", None)
    layers = next((m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if layers is None:
        raise ConfigError("--freeze-layers: cannot find this model's list of decoder layers; drop the flag")
    if n >= len(layers):
        raise ConfigError(f"--freeze-layers {n}: the model has {len(layers)} layers; expected fewer than that")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_setup(what: str, model: Any, args: TrainArgs, precision: str, threads: int, lr: float,
                   trainable: int) -> str:
    total = sum(p.numel() for p in model.parameters())
    how = f"LoRA r={args.lora_r}" if args.lora else "full fine-tune"
    if args.freeze_layers:
        how += f", lowest {args.freeze_layers} layers frozen ({trainable / 1e6:.0f}M trainable)"
    cores = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{what} ({total / 1e6:.0f}M parameters), {precision}, {cores}, {how}, lr {lr:g}"


def lora_config(args: TrainArgs, task: str, model: Any) -> Any:
    from peft import LoraConfig

    targets: Any = args.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing or not targets:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if type(m).__name__ == "Linear" and n.rsplit(".", 1)[-1] not in ("score", "lm_head")})
            raise ConfigError(f"--lora-targets {args.lora_targets}: no module named {', '.join(missing) or '(empty)'}"
                              f" in this model; expected all-linear or a comma list of: {', '.join(linear)}")
    extra = {"modules_to_save": ["score"]} if task == "SEQ_CLS" else {}
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type=task, **extra)


def save_model(trainer: Any, tok: Any, dest: Path, args: TrainArgs) -> None:
    """A normal Hugging Face folder; with LoRA, the merged model (adapter kept in dest/adapter) or the adapter."""
    model = trainer.model
    if args.lora:
        model.save_pretrained(dest / "adapter")
        tok.save_pretrained(dest / "adapter")
        if not args.lora_merge:  # the adapter alone: small, but later stages need full weights
            return
        model = model.merge_and_unload()
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def make_progress_callback(reporter: Reporter, total_steps_hint: int | None = None) -> Any:
    """A transformers TrainerCallback that feeds the reporter: step/total, loss, lr, tokens/s, ETA."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.time()
            self.last: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            reporter.start(state.max_steps or total_steps_hint or 0)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            for k, v in logs.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self.last[k] = v

        def on_step_end(self, args, state, control, **kw):
            elapsed = time.time() - self.t0
            fig = {k: v for k, v in self.last.items() if k not in ("epoch", "num_input_tokens_seen")}
            tokens = getattr(state, "num_input_tokens_seen", 0) or 0
            if tokens:
                fig["tokens/s"] = tokens / max(elapsed, 1e-9)
            reporter.update(state.global_step, state.max_steps, fig, elapsed)

        def on_train_end(self, args, state, control, **kw):
            reporter.finish()

    return _Progress()


def write_metrics(trainer: Any, dest: Path) -> None:
    """`metrics.jsonl`: one JSON object per logged training step (step, loss, learning_rate, and the stage's own
    figures such as accuracy and margin for reward), then eval entries; what `rlhf report` plots."""
    import json

    keep = ("loss", "learning_rate", "grad_norm", "accuracy", "margin", "mean_token_accuracy", "entropy",
            "eval_loss", "epoch", "num_input_tokens_seen")
    with (dest / "metrics.jsonl").open("w", encoding="utf-8") as f:
        for h in trainer.state.log_history:
            if "loss" not in h and "eval_loss" not in h:
                continue
            row = {"step": h.get("step")} | {k: h[k] for k in keep if k in h}
            f.write(json.dumps(row) + "\n")


def drop_printer(trainer: Any) -> None:
    """With tqdm off, transformers prints every log dict to stdout; our reporter shows them instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def quiet_libraries() -> None:
    """The toolkit shows its own progress; silence the libraries' bars and advisory warnings."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
