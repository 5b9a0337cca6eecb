"""Stage 2: a reward model trained on human preferences.

The reward model (RM) reads `<prompt, answer>` and outputs one score. It starts from the SFT model (as in
InstructGPT) with a fresh one-output head, and is trained with the pairwise ranking loss
`-log sigmoid(r(chosen) - r(rejected) [- margin])` on TRL's RewardTrainer. Ranked lists of K answers give all
K-choose-2 pairs; by default the pairs of one prompt share a batch, so the RM sees each prompt's comparisons at
once instead of overfitting to a prompt repeated across the epoch (InstructGPT, section 3.5).

    rlhf reward --model runs/demo/sft --data examples/data/prefs_ranked.jsonl --run runs/demo
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.config import check_choices, dump_yaml, opt, to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.manifest import STAGE_COMMANDS, StagedOutput, a_stage, require_stage, stage_dir, write_manifest
from rlhf_cli.core.models import (
    DEFAULT_MODEL,
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
from rlhf_cli.data.io import PREF_FORMATS, DataSet, load_prefs, split_eval

DEFAULT_MAX_LENGTH = 512
DEFAULT_LR = 1e-5
DEFAULT_LORA_LR = 1e-4


@dataclass
class RewardArgs(TrainArgs):
    model: str | None = opt(None, "Model to start from: an sft stage (default: RUN/sft), a model folder or a hub "
                                  "id.")
    format: str = opt("auto", "Preference format; detected from the fields when auto.", choices=PREF_FORMATS)
    margin: bool = opt(False, "Subtract a per-pair margin in the loss: the row's `margin`, or the score "
                              "difference for ranked lists with `scores`.")
    group_by_prompt: bool = opt(True, "Put all pairs of one prompt in the same batch (InstructGPT).")
    center_rewards: float | None = opt(None, "Coefficient pushing scores towards mean zero (e.g. 0.01).")


def pick_start_model(args: RewardArgs, say) -> tuple[str, Any]:
    """--model if given, else RUN/sft, else the default model; refuses stages other than sft."""
    if args.model is None:
        if args.run:
            m = require_stage(Path(args.run) / "sft", "sft", "--run")
            args.model = str(m.path)
        else:
            say(f"no --model and no --run: starting from {DEFAULT_MODEL} (InstructGPT starts the RM from the SFT "
                f"model: pass --model SFT_DIR)")
            args.model = DEFAULT_MODEL
    parent = parent_of(args.model)
    if parent is not None and parent.stage not in ("sft", "ppo", "rejection"):
        raise CheckpointError(
            f"--model {args.model}: is {a_stage(parent.stage)}, expected an sft stage, made by "
            f"`{STAGE_COMMANDS['sft']}`")
    return args.model, parent


def encode_pairs(ds: DataSet, tok: Any, max_length: int) -> tuple[list[dict], int]:
    """Token ids of prompt+chosen and prompt+rejected through the chat template; over-long sequences keep their
    last `max_length` tokens (the answer), and are counted."""
    rows, truncated = [], 0
    for r in ds.rows:
        ids = []
        for key in ("chosen", "rejected"):
            text = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            x = tok(text, add_special_tokens=False)["input_ids"]
            if len(x) > max_length:
                x = x[-max_length:]
                truncated += 1
            ids.append(x)
        rows.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "margin": r.get("margin", 0.0),
                     "group": r.get("group", len(rows))})
    return rows, truncated


class GroupBatchSampler:
    """Batches of whole prompts: every pair of a prompt lands in the same batch (a prompt with more pairs than
    the batch size fills whole batches of its own first). Prompts are packed once (first-fit decreasing, after
    a seeded shuffle) so the number of batches is the same every epoch, as the Trainer expects; the order of
    the batches is reshuffled every epoch."""

    def __init__(self, groups: list[int], batch_size: int, seed: int):
        self.seed, self.epoch = seed, 0
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

    def __iter__(self):
        batches = self.batches[:]
        random.Random(self.seed + 1 + self.epoch).shuffle(batches)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class PairScores:
    accuracy: float
    mean_margin: float
    pairs: int
    chosen: list[float]
    rejected: list[float]


def score_ids(model: Any, ids: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """One score per sequence (right padding; the head reads the last non-pad token)."""
    import torch

    from rlhf_cli.core.generation import pad_batch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
    out = [0.0] * len(ids)
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            x, att = pad_batch([ids[i] for i in idx], pad_id)
            dev = next(model.parameters()).device
            logits = model(input_ids=x.to(dev), attention_mask=att.to(dev)).logits[:, 0].float().cpu()
            for row, i in enumerate(idx):
                out[i] = float(logits[row])
    return out


def pair_metrics(model: Any, rows: list[dict], pad_id: int, batch_size: int = 16) -> PairScores:
    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    s = score_ids(model, ids, pad_id, batch_size)
    c, r = s[:len(rows)], s[len(rows):]
    diffs = [a - b for a, b in zip(c, r, strict=True)]
    return PairScores(accuracy=sum(d > 0 for d in diffs) / len(diffs), mean_margin=sum(diffs) / len(diffs),
                      pairs=len(diffs), chosen=c, rejected=r)


def run_reward(args: RewardArgs, reporter: Reporter | None = None) -> Path:
    """Train a reward model on `args.data`; returns the finished stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    check_common(args)
    check_choices(args)
    out = stage_dir(args.out, args.run, "reward", "--out")
    if out is None:
        raise ConfigError("--out: missing; pass --out DIR or --run DIR (writes DIR/reward)")
    staged = StagedOutput(out, args.overwrite)

    train = load_prefs(args.data, args.format, args.max_samples, use_margin=args.margin)
    say(train.describe())
    evalset = None
    if args.eval_data:
        evalset = load_prefs(args.eval_data, args.format, flag="--eval-data", use_margin=args.margin)
        say(evalset.describe())
    elif args.eval_split:
        train, evalset = split_eval(train, args.eval_split, args.seed)
        say(f"held out {evalset.kept} pairs ({evalset.prompts} prompts) for eval")

    model_name, parent = pick_start_model(args, say)
    max_length = inherit(args, parent, "max_length", DEFAULT_MAX_LENGTH, say)
    lr = args.lr or (DEFAULT_LORA_LR if args.lora else DEFAULT_LR)
    model_path = resolve_model(model_name, say=say)

    quiet_libraries()
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    threads = configure_threads(args.threads)
    precision = pick_precision(args.precision)
    tok = load_tokenizer(model_path)
    train_rows, trunc = encode_pairs(train, tok, max_length)
    eval_rows, etrunc = encode_pairs(evalset, tok, max_length) if evalset else ([], 0)
    if trunc or etrunc:
        say(f"{trunc + etrunc} sequences longer than {max_length} tokens kept their last {max_length} tokens")

    import transformers

    transformers.set_seed(args.seed)  # the fresh score head is random
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                               dtype=torch_dtype(precision))
    set_distinct_pad(tok, model)
    trainable = freeze_lower_layers(model, args.freeze_layers)
    say(describe_setup(f"reward model from {model_name}", model, args, precision, threads, lr, trainable)
        + (", pairs grouped by prompt" if args.group_by_prompt else ", pairs shuffled"))

    cols = ["chosen_ids", "rejected_ids"] + (["margin"] if args.margin else [])
    train_ds = Dataset.from_list([{k: r[k] for k in cols} for r in train_rows])
    groups = [r["group"] for r in train_rows]

    class _Trainer(RewardTrainer):
        def get_train_dataloader(self):
            if not args.group_by_prompt:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            sampler = GroupBatchSampler(groups, self.args.per_device_train_batch_size, args.seed)
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler,
                                                       collate_fn=self.data_collator, num_workers=0))

    with staged as dest:
        cfg = RewardConfig(**hf_training_kwargs(args, dest, lr, precision, evalset is not None),
                           max_length=None, center_rewards_coefficient=args.center_rewards,
                           remove_unused_columns=False)
        trainer = _Trainer(model=model, args=cfg, processing_class=tok, train_dataset=train_ds,
                           peft_config=lora_config(args, "SEQ_CLS", model) if args.lora else None,
                           callbacks=[make_progress_callback(reporter)])
        drop_printer(trainer)
        metrics: dict[str, Any] = {"pairs": len(train_rows), "prompts": train.prompts}
        if eval_rows:
            before = pair_metrics(trainer.model, eval_rows, tok.pad_token_id, args.batch_size * 2)
            metrics.update(eval_accuracy_before=before.accuracy, eval_mean_margin_before=before.mean_margin)
        t0 = time.time()
        result = trainer.train()
        metrics.update(train_loss=result.training_loss, steps=trainer.state.global_step,
                       train_seconds=round(time.time() - t0, 2))
        accs = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
        if accs:
            metrics["train_accuracy_last"] = accs[-1]
        if eval_rows:
            after = pair_metrics(trainer.model, eval_rows, tok.pad_token_id, args.batch_size * 2)
            metrics.update(eval_accuracy=after.accuracy, eval_mean_margin=after.mean_margin,
                           eval_pairs=after.pairs)
            say(f"held-out pairwise accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, "
                f"mean margin {before.mean_margin:.3f} -> {after.mean_margin:.3f} ({after.pairs} pairs)")
        shutil.rmtree(dest / "trainer", ignore_errors=True)
        save_model(trainer, tok, dest, args)
        write_metrics(trainer, dest)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf reward --config rlhf_config.yaml\n")
        data = {"train": train.summary(), "eval": evalset.summary() if evalset else None,
                "truncated_sequences": trunc + etrunc}
        write_manifest(dest, stage="reward", parents=[str(parent.path) if parent else model_name],
                       args=to_dict(args) | {"resolved_model": str(model_path), "lr": lr}, data=data,
                       metrics=metrics | {"threads": threads, "precision": precision}, started=started)
    return out
