"""What the training stages share: settings inherited from the parent stage, Trainer arguments that suit the
hardware, frozen layers, LoRA, saving, progress and metrics. The shared flags themselves are in
`rlhf_cli.core.args` (torch-free, for `--help`)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_callback import ProgressCallback as HFProgressCallback

from rlhf_cli.core import memory, runtime, tracking
from rlhf_cli.core.args import TrainArgs, check_train_args
from rlhf_cli.core.config import note_origin
from rlhf_cli.core.errors import ConfigError, TrainingError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.manifest import Manifest, ResumableOutput, StagedOutput, stage_output
from rlhf_cli.core.progress import Reporter
from rlhf_cli.data import DataSet, split_eval


def inherit(args: Any, parent: Manifest | None, name: str, fallback: Any, say: Callable[[str], None]) -> Any:
    """A setting not given: the parent stage's value (and say so), else the stage default."""
    value = getattr(args, name)
    if value is not None:
        if parent is not None and parent.args.get(name) not in (None, value):
            say(f"--{name.replace('_', '-')} {value} overrides the parent's {parent.args.get(name)}")
        return value
    if parent is not None and parent.args.get(name) is not None:
        value = parent.args[name]
        say(f"inherited {name}={value} from {parent.path}")
        note_origin(args, name, f"parent stage {parent.path}")
    else:
        value = fallback
        note_origin(args, name, "stage default")
    setattr(args, name, value)
    return value


def prepare_stage(args: TrainArgs, stage: str, load: Callable[..., DataSet], say: Callable[[str], None]
                  ) -> tuple[StagedOutput, DataSet, DataSet | None]:
    """Everything a Trainer stage checks before any model loads: the flags, the output folder, the data."""
    check_train_args(args)
    staged = stage_output(args.out, args.run, stage, args.overwrite, ResumableOutput, resume=args.resume)
    if not args.resume and staged.partial.exists():
        say(f"{'a real run would discard' if args.dry_run else 'discarding'} the unfinished run in "
            f"{staged.partial} (pass --resume to continue it)")
    return (staged, *load_train_eval(args, load, say))


def load_train_eval(args: TrainArgs, load: Callable[..., DataSet], say: Callable[[str], None]
                    ) -> tuple[DataSet, DataSet | None]:
    """--data, and the held-out set: --eval-data, else --eval-split of --data (by prompt for preferences)."""
    train = load(args.data, args.format, args.max_samples)
    say(train.describe())
    if args.eval_data:
        evalset = load(args.eval_data, args.format, flag="--eval-data")
        say(evalset.describe())
        return train, evalset
    if args.eval_split:
        train, evalset = split_eval(train, args.eval_split, args.seed)
        say(f"held out {evalset.kept} {'pairs' if evalset.prompts else 'rows'}"
            + (f" ({evalset.prompts} prompts)" if evalset.prompts else "") + " for eval")
        return train, evalset
    return train, None


def plan_memory(args: Any, model_path: Path, *, causal: bool, lengths: list[int], seqs_per_example: int,
                precision: str, say: Callable[[str], None], saved: dict | None = None,
                reference: bool = False) -> memory.MemoryPlan:
    """The memory plan of a stage (see `rlhf_cli.core.memory`), said in one line, before any weight loads.
    `reference`: a frozen copy of the model is held beside it (DPO's reference model)."""
    shape = memory.ModelShape.of(model_path)
    trainable = memory.trainable_params(shape, lora=bool(getattr(args, "lora", False)),
                                        lora_r=getattr(args, "lora_r", 16),
                                        freeze_layers=getattr(args, "freeze_layers", 0) or 0)
    # weights (and their gradients and AdamW states) in the dtype they load in; activations in the compute dtype
    work = memory.Workload(causal=causal, seq_len=max(lengths or [1]), seqs_per_example=seqs_per_example,
                           trainable=trainable, frozen_layers=getattr(args, "freeze_layers", 0) or 0,
                           weight_bytes=runtime.weight_dtype(precision).itemsize,
                           act_bytes=runtime.compute_dtype(precision).itemsize,
                           frozen_params=shape.params if reference else 0)
    plan = memory.plan(shape, work, args.batch_size, args.grad_accum,
                       checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
                       max_memory=args.max_memory, cpu=not runtime.has_gpu(),
                       micro_batch=saved["micro_batch"] if saved else args.micro_batch_size)
    if plan.tight:
        memory.return_freed_memory()
    say(plan.describe())
    return plan


def hf_training_kwargs(args: TrainArgs, out: Path, lr: float, precision: str, plan: memory.MemoryPlan
                       ) -> dict[str, Any]:
    """TrainingArguments that suit the hardware and the memory plan; TRL's defaults (bf16, gradient
    checkpointing) hurt on CPU. `bf16=True` with fp32 weights on the CPU is mixed precision: the Trainer runs
    forward passes under CPU autocast and keeps fp32 master weights and optimiser state."""
    return dict(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # transformers reads a value below 1 as a fraction of the steps
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=plan.gradient_checkpointing,
        logging_steps=args.logging_steps,
        logging_strategy="steps",
        **checkpoint_kwargs(args),
        eval_strategy="no",
        report_to=tracking.hf_report_to(getattr(args, "report_to", None)),
        run_name=tracking.run_name(out),
        project=tracking.PROJECT,
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every trainable weight is used (frozen ones never need a gradient)
        **runtime.trainer_device_kwargs(),
    )


def freeze_lower_layers(model: PreTrainedModel, n: int) -> int:
    """Freeze input embeddings and the first `n` decoder layers; returns the number of trainable parameters.

    With tied input/output embeddings (SmolLM2) the LM head is frozen too; a reward model's score head stays
    trainable."""
    if n <= 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
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


def describe_setup(what: str, model: PreTrainedModel, args: Any, precision: str, threads: int, lr: float,
                   trainable: int) -> str:
    total = sum(p.numel() for p in model.parameters())
    how = f"LoRA r={args.lora_r}" if args.lora else "full fine-tune"
    if args.freeze_layers:
        how += f", lowest {args.freeze_layers} layers frozen ({trainable / 1e6:.0f}M trainable)"
    cores = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{what} ({total / 1e6:.0f}M parameters), {precision}, {cores}, {how}, lr {lr:g}"


def lora_config(args: Any, task: str, model: PreTrainedModel) -> LoraConfig:
    """`args`: any args with the LoRA fields of `rlhf_cli.core.args`. With --freeze-layers N the adapters go only
    on the layers above N, so no backward pass runs below them."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in ("score", "lm_head")})
    targets: Any = args.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing or not targets:
            raise ConfigError(f"--lora-targets {args.lora_targets}: no module named {', '.join(missing) or '(empty)'}"
                              f" in this model; expected all-linear or a comma list of: {', '.join(linear)}")
    extra: dict[str, Any] = {"modules_to_save": ["score"]} if task == "SEQ_CLS" else {}
    frozen = getattr(args, "freeze_layers", 0) or 0
    total = getattr(model.config, "num_hidden_layers", None)
    if frozen and total and frozen < total and linear:
        # peft takes a layer list only with named targets: all-linear is spelled out
        targets = linear if targets == "all-linear" else targets
        extra["layers_to_transform"] = list(range(frozen, total))
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type=task, **extra)


def save_model(trainer: Trainer, tok: PreTrainedTokenizerBase, dest: Path, args: Any) -> None:
    """A normal Hugging Face folder; with LoRA, the merged model (adapter kept in dest/adapter) or the adapter.
    Under several processes every rank hands over its part of the weights (ZeRO-3 and FSDP shard them) and rank 0
    writes."""
    model = trainer.model
    state = None
    if runtime.world_size() > 1 and not args.lora:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not runtime.is_main_process():
        return
    if args.lora:
        model.save_pretrained(dest / "adapter")
        tok.save_pretrained(dest / "adapter")
        if not args.lora_merge:  # the adapter alone: small, but later stages need full weights
            return
        model = model.merge_and_unload()
    model.save_pretrained(dest, safe_serialization=True, state_dict=state)
    tok.save_pretrained(dest)


class ProgressCallback(TrainerCallback):
    """Feeds a reporter from a transformers Trainer: step/total, loss, lr, tokens/s, ETA."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.t0 = time.time()
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.time()
        self.reporter.start(state.max_steps or 0)

    def on_log(self, args, state, control, logs=None, **kw):
        for k, v in (logs or {}).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.last[k] = v

    def on_step_end(self, args, state, control, **kw):
        elapsed = time.time() - self.t0
        fig = {k: v for k, v in self.last.items() if k not in ("epoch", "num_input_tokens_seen")}
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        if tokens:
            fig["tokens/s"] = tokens / max(elapsed, 1e-9)
        self.reporter.update(state.global_step, state.max_steps, fig, elapsed)

    def on_train_end(self, args, state, control, **kw):
        self.reporter.finish()


def write_metrics(trainer: Trainer, dest: Path, extra: tuple[str, ...] = ()) -> None:
    """`metrics.jsonl`: one JSON object per logged training step (step, loss, learning_rate, and the stage's own
    figures such as accuracy and margin for reward, or the `extra` keys a stage names), then eval entries; what
    `rlhf report` plots. Rank 0 writes (the logged figures are already averaged over the processes)."""
    if not runtime.is_main_process():
        return
    keep = ("loss", "learning_rate", "grad_norm", "accuracy", "margin", "mean_token_accuracy", "entropy",
            "eval_loss", "epoch", "num_input_tokens_seen") + extra
    rows = [{"step": h.get("step")} | {k: h[k] for k in keep if k in h}
            for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    atomic_write_text(dest / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def drop_printer(trainer: Trainer) -> None:
    """With tqdm off, transformers prints every log dict to stdout; our reporter shows them instead."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgressCallback)


# ---------------------------------------------------------------------------------------------------------
# Stopping, faults and resume (Trainer stages)

CHECKPOINTS = "trainer"  # OUT.partial/trainer/checkpoint-N: the Trainer's own resumable checkpoints
RESUME_FILE = "resume.json"  # the settings a resumed run must share with the one it continues
RESUME_KEYS = ("model", "data", "format", "max_samples", "eval_data", "eval_split", "epochs", "lr", "lr_scheduler",
               "warmup_ratio", "batch_size", "grad_accum", "max_length", "weight_decay", "seed", "lora", "lora_r",
               "lora_alpha", "lora_targets", "freeze_layers", "precision")


def complete_checkpoints(dest: Path) -> list[Path]:
    """The Trainer checkpoints in `dest/trainer` (sft, reward, and TRL's GRPO/RLOO) that were written to the end
    (trainer_state.json is written last), oldest first."""
    found = [p for p in (dest / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def check_resume(args: Any, staged: StagedOutput) -> dict | None:
    """With --resume: the saved settings of the run being continued (one clear error when there is none, or
    when a setting differs); None for a fresh run."""
    part = staged.partial
    if not args.resume:
        return None
    if not complete_checkpoints(part):
        raise ConfigError(f"--resume: no complete checkpoint in {part / CHECKPOINTS} (one is saved on Ctrl-C or "
                          f"SIGTERM, and every --save-every N steps); start again without --resume")
    try:
        saved = json.loads((part / RESUME_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume: {part / RESUME_FILE} is unreadable ({e}); start again without --resume") \
            from None
    now = to_resume_dict(args)
    changed = [k for k in now if k in saved["args"] and saved["args"][k] != now.get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"--{k.replace('_', '-')} {now.get(k)}: the run being resumed used "
                          f"{saved['args'][k]}; resume with the same settings (only --max-steps may change)")
    return saved


def to_resume_dict(args: Any) -> dict:
    """The settings a resumed run must share: RESUME_KEYS and the stage's own `resume_keys` (a class attribute)."""
    return {k: getattr(args, k, None) for k in RESUME_KEYS + tuple(getattr(args, "resume_keys", ()))}


def resume_point(dest: Path, saved: dict | None, args: Any, plan: memory.MemoryPlan,
                 say: Callable[[str], None]) -> str | None:
    """The checkpoint `trainer.train(resume_from_checkpoint=...)` continues from, or None for a fresh run, which
    records its settings in RESUME_FILE for a later --resume."""
    if saved:
        last = complete_checkpoints(dest)[-1]
        say(f"resuming from {last}")
        return str(last)
    body = {"args": to_resume_dict(args), "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
            "gradient_checkpointing": plan.gradient_checkpointing}
    if runtime.is_main_process():
        atomic_write_text(dest / RESUME_FILE, json.dumps(body, indent=2, default=str) + "\n")
    return None


def drop_checkpoints(dest: Path) -> None:
    """A finished stage folder keeps neither the Trainer's checkpoints nor the resume settings (its TensorBoard
    event files, written under the Trainer's folder, move to dest/runs). Rank 0 only."""
    if not runtime.is_main_process():
        return
    tracking.keep_trainer_logs(dest / CHECKPOINTS, dest)
    shutil.rmtree(dest / CHECKPOINTS, ignore_errors=True)
    (dest / RESUME_FILE).unlink(missing_ok=True)


def checkpoint_kwargs(args: Any) -> dict[str, Any]:
    """TrainingArguments for resumable checkpoints: every --save-every N steps, and whenever a stop is
    requested; the newest two are kept, so a kill while one is written leaves the one before."""
    every = getattr(args, "save_every", None)
    return dict(save_strategy="steps", save_steps=every or 10**9, save_total_limit=2, save_only_model=False)


class GuardCallback(TrainerCallback):
    """Stops a Trainer on a signal (saving a checkpoint first) or on a NaN/inf loss or gradient norm (saving
    nothing: the weights are already damaged)."""

    def __init__(self, signals: Any):
        self.signals = signals
        self.bad: tuple[str, float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = (key, value, state.global_step)
                control.should_training_stop = True
                control.should_save = False
                return

    def on_step_end(self, args, state, control, **kw):
        # under several processes a signal may reach one rank only, or each at a different step: all stop at the
        # first step any of them saw it, so they save the same checkpoint together
        if self.bad is None and state.global_step < state.max_steps and runtime.any_rank(bool(self.signals)):
            control.should_training_stop = True
            control.should_save = True


def raise_if_stopped(trainer: Trainer, guard: GuardCallback, dest: Path, signals: Any) -> None:
    """After `trainer.train()` returns: `Interrupted` with the resume command, or the divergence error."""
    step, total = trainer.state.global_step, trainer.state.max_steps
    if guard.bad is not None:
        key, value, at = guard.bad
        good = complete_checkpoints(dest)
        keep = (f"the last good checkpoint is {good[-1]} (resume from it with --resume and a smaller --lr)"
                if good else "no checkpoint was saved before it (--save-every N keeps one)")
        raise TrainingError(f"{key} is {value} at step {at}: training diverged and was stopped; {keep}; expected "
                            f"finite values: lower --lr, or check the data and model for inf/NaN")
    if signals and step < total:
        good = complete_checkpoints(dest)
        raise signals.stop(f"at step {step} of {total}", str(good[-1] if good else dest))


def train_loss(trainer: Trainer, fallback: float) -> float:
    """The mean logged training loss over the whole run, a resumed one included (the Trainer's own figure
    counts only the steps since the resume)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else fallback
