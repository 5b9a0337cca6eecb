"""Stage 2: a reward model trained on human preferences.

The reward model (RM) reads `<prompt, answer>` and outputs one score. It starts from the SFT model (as in
InstructGPT) with a fresh one-output head, and is trained with the pairwise ranking loss
`-log sigmoid(r(chosen) - r(rejected) [- margin])` on TRL's RewardTrainer. Ranked lists of K answers give all
K-choose-2 pairs; by default the pairs of one prompt share a batch, so the RM sees each prompt's comparisons at
once instead of overfitting to a prompt repeated across the epoch (InstructGPT, section 3.5).

    rlhf reward --model runs/demo/sft --data examples/data/prefs_ranked.jsonl --run runs/demo
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from rlhf_cli.core import dry_run as dry
from rlhf_cli.core import hub, runtime
from rlhf_cli.core.args import DEFAULT_MODEL
from rlhf_cli.core.config import dump_yaml, to_dict
from rlhf_cli.core.errors import CheckpointError
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.manifest import Manifest, manifest_if_stage, require_stage, write_manifest
from rlhf_cli.core.models import LoadOptions, load_tokenizer, resolve_model, set_distinct_pad
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.reward_model import encode_pairs, pair_metrics
from rlhf_cli.core.stages import a_stage, command_for, is_policy
from rlhf_cli.core.training import (
    GuardCallback,
    ProgressCallback,
    check_resume,
    describe_setup,
    drop_checkpoints,
    drop_printer,
    freeze_lower_layers,
    hf_training_kwargs,
    inherit,
    lora_config,
    plan_memory,
    prepare_stage,
    raise_if_stopped,
    resume_point,
    save_model,
    train_loss,
    write_metrics,
)
from rlhf_cli.data import load_prefs
from rlhf_cli.stages.reward.args import DEFAULT_LORA_LR, DEFAULT_LR, DEFAULT_MAX_LENGTH, RewardArgs


def pick_start_model(args: RewardArgs, say: Callable[[str], None]) -> tuple[str, Manifest | None]:
    """--model if given, else RUN/sft, else the default model; refuses stages other than sft."""
    if args.model is None:
        if args.run:
            m = require_stage(Path(args.run) / "sft", "sft", "--run")
            args.model = str(m.path)
        else:
            say(f"no --model and no --run: starting from {DEFAULT_MODEL} (InstructGPT starts the RM from the SFT "
                f"model: pass --model SFT_DIR)")
            args.model = DEFAULT_MODEL
    parent = manifest_if_stage(args.model)
    if parent is not None and parent.stage == "reward":
        # a later round of the recipe (`rlhf pipeline`, reward_init: previous) goes on training the last RM
        say(f"--model {args.model}: a reward stage; training goes on from its weights and score head")
    elif parent is not None and not is_policy(parent.stage):
        raise CheckpointError(
            f"--model {args.model}: is {a_stage(parent.stage)}, expected an sft stage (or a reward stage to go on "
            f"training), made by `{command_for('sft')}`")
    return args.model, parent


class GroupBatchSampler:
    """Batches of whole prompts: every pair of a prompt lands in the same batch (a prompt with more pairs than
    the batch size fills whole batches of its own first). Prompts are packed once (first-fit decreasing, after
    a seeded shuffle) so the number of batches is the same every epoch, as the Trainer expects; the order of
    the batches is reshuffled every epoch.

    With micro-batches (`micro` < `batch_size`), each batch is cut into `batch_size / micro` consecutive
    micro-batches, which the Trainer accumulates into one optimiser step: a prompt's pairs still share a step."""

    def __init__(self, groups: list[int], batch_size: int, seed: int, micro: int | None = None):
        self.seed, self.epoch = seed, 0
        self.micro = micro or batch_size
        self.chunks = max(batch_size // self.micro, 1)
        by: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by.setdefault(g, []).append(i)
        order = list(by.values())
        random.Random(seed).shuffle(order)
        order.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
        self.batches: list[list[int]] = []
        bins: list[list[int]] = []
        for g in order:
            full = len(g) - len(g) % batch_size
            self.batches.extend(g[k:k + batch_size] for k in range(0, full, batch_size))
            rest = g[full:]
            if not rest:
                continue
            for b in bins:
                if len(b) + len(rest) <= batch_size:
                    b.extend(rest)
                    break
            else:
                bins.append(list(rest))
        self.batches.extend(bins)

    def set_epoch(self, epoch: int) -> None:
        """The Trainer sets the epoch (a resumed run too), so each epoch's order depends on it alone."""
        self.epoch = epoch

    def split(self, batch: list[int]) -> list[list[int]]:
        """`chunks` near-equal micro-batches (fewer when the batch has fewer pairs than that)."""
        n = min(self.chunks, len(batch))
        size, extra = divmod(len(batch), n)
        out, start = [], 0
        for k in range(n):
            end = start + size + (1 if k < extra else 0)
            out.append(batch[start:end])
            start = end
        return out

    def __iter__(self):
        batches = self.batches[:]
        random.Random(self.seed + 1 + self.epoch).shuffle(batches)
        self.epoch += 1  # for loops that do not call set_epoch
        return iter([m for b in batches for m in self.split(b)])

    def __len__(self) -> int:
        return sum(min(self.chunks, len(b)) for b in self.batches)


class GroupedRewardTrainer(RewardTrainer):
    """RewardTrainer whose batches hold whole prompts (`GroupBatchSampler`)."""

    def __init__(self, *args: Any, groups: list[int], seed: int, batch_size: int, **kw: Any):
        super().__init__(*args, **kw)
        self.groups, self.group_seed, self.group_batch = groups, seed, batch_size

    def get_train_dataloader(self) -> DataLoader:
        sampler = GroupBatchSampler(self.groups, self.group_batch, self.group_seed,
                                    micro=self.args.per_device_train_batch_size)
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler,
                                                   collate_fn=self.data_collator, num_workers=0))


def dry_run(args: RewardArgs, reporter: Reporter, out: Path, model_path: Path, plan: Any, train: Any, evalset: Any,
            train_rows: list[dict], eval_rows: list[dict], truncated: int, parent: Manifest | None,
            resolved: dict[str, Any]) -> Path:
    """`--dry-run`: the plan of this run (see `rlhf_cli.core.dry_run`); steps count whole-prompt batches as
    `GroupBatchSampler` packs them."""
    effective = dry.global_batch(args)
    per_epoch = len(GroupBatchSampler([r["group"] for r in train_rows], effective, args.seed).batches) \
        if args.group_by_prompt else None
    seqs = [len(r[k]) for r in train_rows for k in ("chosen_ids", "rejected_ids")]
    data = {"model": f"{args.model} ({model_path})",
            "parent stage": str(parent.path) if parent else "none (not an sft stage)",
            "data": train.describe(), "eval data": evalset.describe() if evalset else "none",
            "pairs": f"{len(train_rows)} pairs from {train.prompts} prompts"
                     + (", grouped by prompt" if args.group_by_prompt else ", shuffled"),
            "token lengths": dry.length_stats(seqs),
            "truncated to --max-length": f"{truncated} sequences longer than {args.max_length}"}
    return dry.trainer_stage(
        args, reporter, "reward", out, model_path, plan, unit="pairs", data=data, causal=False,
        steps_per_epoch=per_epoch,
        example_tokens=[len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows],
        # chosen and rejected are padded together; grouped batches hold one prompt's pairs, in data order
        padded=dry.padded_tokens([max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train_rows],
                                 plan.micro_batch, 2, seed=None if args.group_by_prompt else args.seed),
        eval_tokens=sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in eval_rows),
        resolved=resolved)


def run_reward(args: RewardArgs, reporter: Reporter | None = None) -> Path:
    """Train a reward model on `args.data`; returns the finished stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    staged, train, evalset = prepare_stage(args, "reward", functools.partial(load_prefs, use_margin=args.margin), say)

    model_name, parent = pick_start_model(args, say)
    max_length = inherit(args, parent, "max_length", DEFAULT_MAX_LENGTH, say)
    lr = args.lr or (DEFAULT_LORA_LR if args.lora else DEFAULT_LR)
    saved = check_resume(args, staged)
    loading = LoadOptions.of(args)
    model_path = resolve_model(model_name, say=say, loading=loading)

    runtime.quiet_libraries()
    threads = runtime.configure_threads(args.threads)
    choice = runtime.precision_choice(args.precision)
    precision = choice.precision
    tok = load_tokenizer(model_path, loading=loading)
    train_rows, trunc = encode_pairs(train, tok, max_length)
    eval_rows, etrunc = encode_pairs(evalset, tok, max_length) if evalset else ([], 0)
    if trunc or etrunc:
        say(f"{trunc + etrunc} sequences longer than {max_length} tokens kept their last {max_length} tokens")

    lengths = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train_rows + eval_rows]
    plan = plan_memory(args, model_path, causal=False, lengths=lengths, seqs_per_example=2, precision=precision,
                       say=say, saved=saved)
    if args.dry_run:
        return dry_run(args, reporter, staged.out, model_path, plan, train, evalset, train_rows, eval_rows,
                       trunc + etrunc, parent, {"lr (used)": lr, "precision (used)": str(choice),
                                                "threads (used)": threads})

    transformers.set_seed(args.seed)  # the fresh score head is random
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **loading.model_kwargs(),
                                                               dtype=runtime.weight_dtype(precision))
    set_distinct_pad(tok, model)
    trainable = freeze_lower_layers(model, args.freeze_layers)
    say(describe_setup(f"reward model from {model_name}", model, args, str(choice), threads, lr, trainable)
        + (", pairs grouped by prompt" if args.group_by_prompt else ", pairs shuffled"))

    cols = ["chosen_ids", "rejected_ids"] + (["margin"] if args.margin else [])
    train_ds = Dataset.from_list([{k: r[k] for k in cols} for r in train_rows])
    groups = [r["group"] for r in train_rows]

    with StopSignals(say) as signals, staged as dest:
        resume_from = resume_point(dest, saved, args, plan, say)
        cfg = RewardConfig(**hf_training_kwargs(args, dest, lr, precision, plan),
                           max_length=None, center_rewards_coefficient=args.center_rewards,
                           remove_unused_columns=False)
        # grouped batches are global: accelerate deals each one's micro-batches out to the processes in turn
        trainer_cls = functools.partial(GroupedRewardTrainer, groups=groups, seed=args.seed,
                                        batch_size=plan.micro_batch * plan.grad_accum * runtime.world_size()) \
            if args.group_by_prompt else RewardTrainer
        trainer = trainer_cls(model=model, args=cfg, processing_class=tok, train_dataset=train_ds,
                              peft_config=lora_config(args, "SEQ_CLS", model) if args.lora else None,
                              callbacks=[ProgressCallback(reporter), guard := GuardCallback(signals)])
        drop_printer(trainer)
        metrics: dict[str, Any] = {"pairs": len(train_rows), "prompts": train.prompts}
        if eval_rows:
            before = pair_metrics(trainer.model, eval_rows, tok.pad_token_id, plan.micro_batch * 2)
            metrics.update(eval_accuracy_before=before.accuracy, eval_mean_margin_before=before.mean_margin)
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume_from)
        raise_if_stopped(trainer, guard, dest, signals)
        metrics.update(train_loss=train_loss(trainer, result.training_loss), steps=trainer.state.global_step,
                       train_seconds=round(time.time() - t0, 2))
        accs = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
        if accs:
            metrics["train_accuracy_last"] = accs[-1]
        if eval_rows:
            after = pair_metrics(trainer.model, eval_rows, tok.pad_token_id, plan.micro_batch * 2)
            metrics.update(eval_accuracy=after.accuracy, eval_mean_margin=after.mean_margin,
                           eval_pairs=after.pairs)
            say(f"held-out pairwise accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, "
                f"mean margin {before.mean_margin:.3f} -> {after.mean_margin:.3f} ({after.pairs} pairs)")
        drop_checkpoints(dest)
        save_model(trainer, tok, dest, args)
        write_metrics(trainer, dest)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf reward --config rlhf_config.yaml\n")
        data = {"train": train.summary(), "eval": evalset.summary() if evalset else None,
                "truncated_sequences": trunc + etrunc}
        write_manifest(dest, stage="reward", parents=[str(parent.path) if parent else model_name],
                       args=to_dict(args) | {"resolved_model": str(model_path), "lr": lr}, data=data,
                       metrics=metrics | {"threads": threads, "precision": precision, "precision_reason": choice.reason,
                                          "memory": plan.with_peak()},
                       started=started)
    hub.push_if_asked(args, staged.out, say)  # --push-to-hub: checked before training, uploaded now
    return staged.out
