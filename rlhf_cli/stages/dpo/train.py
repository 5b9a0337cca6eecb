"""The offline preference stage: DPO and its relatives train the policy on preferences directly, without a reward
model and without sampling.

DPO (Rafailov et al. 2023) reads the RM's pairwise loss `-log sigmoid(r(chosen) - r(rejected))` with the reward
replaced by the policy's implicit reward `r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`: raising it on chosen
answers and lowering it on rejected ones, measured against a frozen reference, is the KL-regularised RLHF
objective solved in closed form. The reference is the start model (the SFT folder), so beta bounds how far the
policy moves from SFT, as PPO's KL penalty does. It needs only the data `rlhf reward` reads; a ranked list of K
answers gives all K-choose-2 pairs.

`--method` picks one of TRL's offline trainers, all on the same data:

| method | TRL class | reference model | loss |
|---|---|---|---|
| dpo | `trl.DPOTrainer` / `DPOConfig` | the start model | `--loss`: any `loss_type` of DPOConfig (sigmoid = DPO) |
| kto | `trl.KTOTrainer` / `KTOConfig` | the start model | kto or apo_zero_unpaired, on answers marked good or bad |
| orpo | `trl.experimental.orpo.ORPOTrainer` | none | SFT loss on chosen + beta * odds-ratio term |
| cpo | `trl.experimental.cpo.CPOTrainer` | none | sigmoid, hinge, ipo or simpo on policy log-probs + SFT loss |
| simpo | `trl.experimental.cpo.CPOTrainer`, loss `simpo`, `cpo_alpha=0` | none | length-normalised, margin gamma |

KTO learns from unpaired thumbs up/down (`rlhf_cli.data.feedback`); pairs are split into their desirable and
undesirable answers.

The reference model, where the method has one. For dpo in one process (`--precompute-ref`, the default) its
log-probabilities of every pair are computed once, before training, by the policy itself, which is still the
start model then (TRL's `precompute_ref_log_probs`): one reference pass in all instead of one per epoch, and no
second copy of the weights. A resume computes them again the same way, from the start model, before its
checkpoint is loaded. Otherwise (kto, `--no-precompute-ref`, or several processes: see `precomputed`), for a
full fine-tune, a second copy of the start weights, loaded here under the same safety rules as the policy
(safetensors only, no folder code unless allowed) rather than by TRL from the config's name. With `--lora`
there is no second copy: TRL computes the reference log-probabilities with the adapters switched off, which is
exactly the start model (checked in trl 1.16's DPOTrainer and KTOTrainer: a peft model with `ref_model=None`
keeps `self.ref_model = None` and wraps the reference forward in `use_adapter(model, None)`).

Batches: as in `rlhf reward`, all pairs of one prompt share a batch (`GroupBatchSampler`) for dpo, orpo, cpo and
simpo, whose trainers read their batches from the Trainer's own dataloader, so it is replaced cleanly
(`--no-group-by-prompt` shuffles pairs). KTO estimates its KL term by pairing each answer with the prompt of its
neighbour in a fixed-order batch, so its TRL config requires sequential batches: KTO rows are shuffled once, with
the seed, and read in that order.

Memory: the planner counts the trained policy, two sequences per example (chosen and rejected; for KTO the answer
and its mismatched KL answer), and, for a full fine-tune of kto (or of dpo when the reference is not computed
once: `--no-precompute-ref`, or several processes), the frozen reference weights. The reference's forward pass
runs without gradients, so its activations are freed layer by layer and are not counted: a rough but honest
estimate.

Metrics: before and after training, on the eval data, TRL's own eval loss and implicit-reward figures
(`rewards/margins`, `rewards/accuracies` as TRL logs them; KTO logs no accuracy, and the reference-free methods'
rewards are beta times the policy's log-probabilities), and the mean log-probability of chosen and rejected
answers.

    rlhf dpo --model runs/demo/sft --data examples/data/prefs_ranked.jsonl --out runs/demo/dpo
    rlhf dpo --run runs/demo --data examples/data/hh_prefs_train.jsonl --eval-data examples/data/hh_prefs_test.jsonl \\
        --method simpo --lora
"""

from __future__ import annotations

import functools
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rlhf_cli.core import dry_run as dry
from rlhf_cli.core import hub, launch, runtime, training
from rlhf_cli.core.args import DEFAULT_MODEL
from rlhf_cli.core.config import dump_yaml, to_dict, validate
from rlhf_cli.core.errors import CheckpointError, ConfigError, DataError
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.manifest import Manifest, manifest_if_stage, require_stage, write_manifest
from rlhf_cli.core.models import LoadOptions, load_tokenizer, resolve_model, set_distinct_pad
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.stages import a_stage, command_for, is_policy
from rlhf_cli.data import DataSet
from rlhf_cli.data.feedback import load_feedback, load_pairs
from rlhf_cli.stages.dpo.args import DEFAULT_BETA, DEFAULT_LORA_LR, DEFAULT_LR, DEFAULT_MAX_LENGTH, LOSSES, DPOArgs
from rlhf_cli.stages.reward.train import GroupBatchSampler

TRAINERS = {"dpo": "trl.DPOTrainer", "kto": "trl.KTOTrainer", "orpo": "trl.experimental.orpo.ORPOTrainer",
            "cpo": "trl.experimental.cpo.CPOTrainer", "simpo": "trl.experimental.cpo.CPOTrainer"}
WITH_REFERENCE = ("dpo", "kto")
# the per-step figures TRL logs that metrics.jsonl keeps (besides the loss, learning rate, ...)
LOGGED = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
          "logps/rejected", "nll_loss", "kl", "eval_rewards/margins", "eval_rewards/accuracies")
EVAL_FIGURES = {"eval_loss": "eval_loss", "eval_rewards/margins": "eval_reward_margin",
                "eval_rewards/accuracies": "eval_reward_accuracy", "eval_logps/chosen": "eval_logps_chosen",
                "eval_logps/rejected": "eval_logps_rejected"}


def resolve_method(args: DPOArgs) -> None:
    """The loss and beta the method runs with (written back into args, so the manifest and a resume see them)."""
    validate(args)
    losses = LOSSES[args.method]
    args.loss = args.loss or losses[0]
    if args.loss not in losses:
        raise ConfigError(f"--loss {args.loss}: not a loss of --method {args.method}; expected one of: "
                          f"{', '.join(losses)}")
    args.beta = args.beta or DEFAULT_BETA[args.method]


def pick_start_model(args: DPOArgs, say: Callable[[str], None]) -> Manifest | None:
    """--model if given, else RUN/sft, else the default model; refuses a stage that is not a policy."""
    if args.model is None:
        if args.run:
            args.model = str(require_stage(Path(args.run) / "sft", "sft", "--run").path)
        else:
            say(f"no --model and no --run: starting from {DEFAULT_MODEL} (DPO starts from the SFT model, which is "
                f"also its reference: pass --model SFT_DIR)")
            args.model = DEFAULT_MODEL
    parent = manifest_if_stage(args.model)
    if parent is not None and not is_policy(parent.stage):
        raise CheckpointError(f"--model {args.model}: is {a_stage(parent.stage)}, expected an sft stage (a policy), "
                              f"made by `{command_for('sft')}`")
    return parent


def trl_classes(method: str) -> tuple[type, type]:
    """(trainer, config) of a method; trl.experimental's import notice is silenced (the README says which are)."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        if method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOTrainer, ORPOConfig
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig


def precomputed(args: DPOArgs) -> bool:
    """Whether the reference's log-probabilities are computed once before training: dpo in one process. Across
    processes each rank would look for the others' cached results in its own temporary folder (trl 1.16 keeps
    them in a file beside an in-memory dataset), so there the reference runs in every step."""
    return args.method == "dpo" and args.precompute_ref and launch.world_size() == 1


def method_config(args: DPOArgs, micro_batch: int = 1) -> dict[str, Any]:
    """The method's own config fields (beside the Trainer's and max_length)."""
    if args.method == "dpo":
        once = {"precompute_ref_log_probs": True, "precompute_ref_batch_size": micro_batch} if precomputed(args) else {}
        return {"beta": args.beta, "loss_type": [args.loss], "dataset_num_proc": None} | once
    if args.method == "kto":
        return {"beta": args.beta, "loss_type": args.loss, "train_sampling_strategy": "sequential"}
    if args.method == "orpo":
        return {"beta": args.beta}
    if args.method == "simpo":
        return {"beta": args.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": args.simpo_gamma}
    return {"beta": args.beta, "loss_type": args.loss, "simpo_gamma": args.simpo_gamma}


def grouped(trainer_cls: type) -> type:
    """`trainer_cls` whose training batches hold whole prompts (`GroupBatchSampler`); set `group_info` to
    (group of each training row, seed, effective batch, say) before `train()`."""

    class Grouped(trainer_cls):
        group_info: tuple[list[int], int, int, Callable[[str], None]] | None = None

        def get_train_dataloader(self) -> DataLoader:
            groups, seed, batch, say = self.group_info
            data = self.train_dataset
            if not isinstance(data, Dataset) or len(data) != len(groups):  # the trainer dropped rows of its own
                say("pairs shuffled, not grouped by prompt: the trainer changed the number of training rows")
                return super().get_train_dataloader()
            data = self._remove_unused_columns(data, description="training")
            sampler = GroupBatchSampler(groups, batch, seed, micro=self.args.per_device_train_batch_size)
            return self.accelerator.prepare(DataLoader(data, batch_sampler=sampler, collate_fn=self.data_collator,
                                                       num_workers=0))

    Grouped.__name__ = Grouped.__qualname__ = f"Grouped{trainer_cls.__name__}"
    return Grouped


def token_lengths(ds: DataSet, tok: PreTrainedTokenizerBase, keys: tuple[str, ...]) -> list[tuple[int, int]]:
    """(prompt tokens, longest prompt + answer tokens) of every row, through the chat template."""
    def count(msgs: list[dict], prompt: bool) -> int:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return [(count(r["prompt"], True), max(count(r["prompt"] + r[k], False) for k in keys)) for r in ds.rows]


def fit_rows(ds: DataSet, lengths: list[tuple[int, int]], max_length: int, flag: str, say: Callable[[str], None]
             ) -> tuple[list[dict], list[int], int]:
    """Rows whose prompt leaves room for an answer (the trainers drop or empty the others), their sequence lengths
    capped at max_length, and how many of them the trainer will cut short."""
    keep = [i for i, (p, _) in enumerate(lengths) if p < max_length]
    if len(keep) < len(ds.rows):
        ds.dropped[f"prompts of {max_length} tokens or more (--max-length)"] += len(ds.rows) - len(keep)
        if not keep:
            raise DataError(f"{flag} {ds.source}: every prompt fills --max-length {max_length} tokens, so no answer "
                            f"is left to train on; expected a larger --max-length")
        say(f"{flag}: {len(ds.rows) - len(keep)} rows dropped, their prompt alone fills --max-length {max_length}")
    cut = sum(lengths[i][1] > max_length for i in keep)
    ds.rows = [ds.rows[i] for i in keep]
    return ds.rows, [min(lengths[i][1], max_length) for i in keep], cut


def as_dataset(rows: list[dict], method: str) -> Dataset:
    keys = ("prompt", "completion", "label") if method == "kto" else ("prompt", "chosen", "rejected")
    return Dataset.from_list([{k: r[k] for k in keys} for r in rows])


def eval_figures(trainer: Any, suffix: str) -> dict[str, float]:
    """TRL's eval loss and implicit-reward figures on the eval data, under the manifest's names."""
    ev = trainer.evaluate()
    return {name + suffix: float(ev[key]) for key, name in EVAL_FIGURES.items() if key in ev}


def dry_run(args: DPOArgs, reporter: Reporter, out: Path, model_path: Path, plan: Any, train: Any, evalset: Any,
            train_lengths: list[int], eval_lengths: list[int], truncated: int, parent: Any, how: str,
            resolved: dict[str, Any]) -> Path:
    """`--dry-run`: the plan of this run (see `rlhf_cli.core.dry_run`). A pair is two sequences (KTO: one row, one
    sequence); a reference model adds one forward pass per trained token, or per token of one epoch when its
    log-probabilities are computed once (`how` says which reference)."""
    kto = args.method == "kto"
    per_example = 1 if kto else 2
    shape = dry.memory.ModelShape.of(model_path)
    data = {"model": f"{args.model} ({model_path})",
            "parent stage": str(parent.path) if parent else "none (not an sft stage)",
            "method": f"{args.method} (loss {args.loss}, beta {args.beta:g}); " + how,
            "data": train.describe(), "eval data": evalset.describe() if evalset else "none",
            "token lengths": dry.length_stats(train_lengths),
            "truncated to --max-length": f"{truncated} rows longer than {args.max_length}"}
    return dry.trainer_stage(
        args, reporter, "dpo", out, model_path, plan, unit="rows" if kto else "pairs", data=data,
        example_tokens=[n * per_example for n in train_lengths],
        eval_tokens=sum(n * per_example for n in eval_lengths),
        forward_per_token=dry.forward_flops(shape, 1.0) if args.method in WITH_REFERENCE else 0.0,
        forward_once=precomputed(args), resolved=resolved)


def run_dpo(args: DPOArgs, reporter: Reporter | None = None) -> Path:
    """Train a policy on preferences with `args.method`; returns the finished stage folder."""
    reporter = reporter or Reporter()
    say = reporter.info
    started = time.time()
    resolve_method(args)
    kto = args.method == "kto"
    load = load_feedback if kto else functools.partial(load_pairs, method=args.method)
    staged, train, evalset = training.prepare_stage(args, "dpo", load, say)

    parent = pick_start_model(args, say)
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
    keys = ("completion",) if kto else ("chosen", "rejected")
    train_rows, lengths, cut = fit_rows(train, token_lengths(train, tok, keys), max_length, "--data", say)
    eval_rows, ecut = [], 0
    if evalset:
        eval_rows, eval_lengths, ecut = fit_rows(evalset, token_lengths(evalset, tok, keys), max_length,
                                                 "--eval-data" if args.eval_data else "--eval-split", say)
        lengths = lengths + eval_lengths
    if cut or ecut:
        say(f"{cut + ecut} rows longer than {max_length} tokens: the ends of their answers are cut")
    if kto:  # KTO reads its rows in order (see the module docstring): one seeded shuffle instead
        train_rows = train_rows[:]
        random.Random(args.seed).shuffle(train_rows)

    reference = args.method in WITH_REFERENCE and not args.lora and not precomputed(args)  # a second copy held
    how = ("reference: the start model" + (" (LoRA adapters off)" if args.lora else "")
           + (", its log-probabilities computed once before training" if precomputed(args) else "")
           if args.method in WITH_REFERENCE else "no reference model")
    plan = training.plan_memory(args, model_path, causal=True, lengths=lengths, seqs_per_example=2,
                                precision=precision, say=say, saved=saved, reference=reference)
    if kto and args.loss == "kto" and plan.micro_batch < 2:
        raise ConfigError(f"--batch-size {args.batch_size}: KTO estimates its KL term from the other answers of a "
                          f"forward pass, so it needs at least 2 rows per pass (micro-batch {plan.micro_batch}); "
                          f"expected --batch-size 2 or more (or --micro-batch-size 2)")
    if args.dry_run:
        return dry_run(args, reporter, staged.out, model_path, plan, train, evalset, lengths[:len(train_rows)],
                       lengths[len(train_rows):], cut + ecut, parent, how,
                       {"lr (used)": lr, "precision (used)": str(choice), "threads (used)": threads})

    # the reference loads as the policy does (fp32 under autocast on the CPU): both compute alike at step 0
    dtype = runtime.weight_dtype(precision)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **loading.model_kwargs())
    set_distinct_pad(tok, model)
    ref_model = None
    if reference:
        ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **loading.model_kwargs())
        set_distinct_pad(tok, ref_model)
        ref_model.requires_grad_(False).eval()
    trainable = training.freeze_lower_layers(model, args.freeze_layers)
    say(training.describe_setup(f"{args.method} (loss {args.loss}, beta {args.beta:g}) from {args.model}", model,
                                args, str(choice), threads, lr, trainable)
        + f", {how}, " + ("rows in a seeded fixed order" if kto else
                          "pairs grouped by prompt" if args.group_by_prompt else "pairs shuffled"))

    trainer_cls, config_cls = trl_classes(args.method)
    group = args.group_by_prompt and not kto
    if group:
        trainer_cls = grouped(trainer_cls)
    with StopSignals(say) as signals, staged as dest:
        resume_from = training.resume_point(dest, saved, args, plan, say)
        hf = training.hf_training_kwargs(args, dest, lr, precision, plan)
        if args.method not in WITH_REFERENCE:  # their batches have no input_ids to count tokens from
            hf["include_num_input_tokens_seen"] = "no"
        cfg = config_cls(**hf, max_length=max_length, **method_config(args, plan.micro_batch))
        extra = {"ref_model": ref_model} if args.method in WITH_REFERENCE else {}
        trainer = trainer_cls(
            model=model, args=cfg, processing_class=tok, train_dataset=as_dataset(train_rows, args.method),
            eval_dataset=as_dataset(eval_rows, args.method) if eval_rows else None,
            peft_config=training.lora_config(args, "CAUSAL_LM", model) if args.lora else None,
            callbacks=[training.ProgressCallback(reporter), guard := training.GuardCallback(signals)], **extra)
        if group:
            trainer.group_info = ([r["group"] for r in train_rows], args.seed, plan.micro_batch * plan.grad_accum,
                                  say)
        training.drop_printer(trainer)
        metrics: dict[str, Any] = {"rows" if kto else "pairs": len(train_rows), "prompts": len(
            {r["group"] for r in train_rows})}
        if eval_rows:
            metrics |= eval_figures(trainer, "_before")
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume_from)
        training.raise_if_stopped(trainer, guard, dest, signals)
        metrics.update(train_loss=training.train_loss(trainer, result.training_loss),
                       steps=trainer.state.global_step, train_seconds=round(time.time() - t0, 2))
        last = next((h for h in reversed(trainer.state.log_history) if "rewards/margins" in h), {})
        metrics.update({f"train_{k.replace('/', '_')}_last": last[k] for k in ("rewards/margins", "rewards/accuracies")
                        if k in last})
        if eval_rows:
            metrics |= eval_figures(trainer, "")
            metrics["eval_rows" if kto else "eval_pairs"] = len(eval_rows)
            if "eval_reward_margin" in metrics:
                say(f"eval implicit reward margin {metrics['eval_reward_margin_before']:.3f} -> "
                    f"{metrics['eval_reward_margin']:.3f}"
                    + (f", accuracy {metrics['eval_reward_accuracy_before']:.3f} -> "
                       f"{metrics['eval_reward_accuracy']:.3f}" if "eval_reward_accuracy" in metrics else "")
                    + f" ({len(eval_rows)} {'rows' if kto else 'pairs'})")
        training.drop_checkpoints(dest)
        training.save_model(trainer, tok, dest, args)
        training.write_metrics(trainer, dest, extra=LOGGED)
        dump_yaml(args, dest / "rlhf_config.yaml", header="# rlhf dpo --config rlhf_config.yaml\n")
        data = {"train": train.summary(), "eval": evalset.summary() if evalset else None,
                "truncated_rows": cut + ecut}
        write_manifest(dest, stage="dpo", parents=[str(parent.path) if parent else args.model],
                       args=to_dict(args) | {"resolved_model": str(model_path), "lr": lr,
                                             "trainer": TRAINERS[args.method], "reference": how},
                       data=data, metrics=metrics | {"threads": threads, "precision": precision,
                                                     "precision_reason": choice.reason,
                                                     "memory": plan.with_peak()},
                       started=started)
    hub.push_if_asked(args, staged.out, say)  # --push-to-hub: checked before training, uploaded now
    return staged.out
