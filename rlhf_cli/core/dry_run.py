"""`--dry-run`: a training stage's plan without the training.

A stage runs its own checks up to the point where weights would load (the flags, the data, the parent stages,
the model folder, the tokenizer, the memory plan: the same code a real run goes through), then, with
`--dry-run`, hands a `DryRunReport` to its reporter and returns the output folder it would write, without
creating it. The CLI's reporter prints the report as tables on stdout and ends the command with exit 0.

    rlhf sft --config examples/configs/demo_sft.yaml --run runs/demo --dry-run

The time estimate is arithmetic, said to be one wherever it is shown:

    seconds = training FLOPs / (measured matmul speed x TRAIN_EFFICIENCY)
              + forward-only FLOPs / (measured matmul speed x FORWARD_EFFICIENCY)
              + generated tokens x 2N / (measured speed of one-token-per-sequence matmuls x DECODE_EFFICIENCY)

FLOPs per token are 2N for a forward pass and 2N + 2N(backprop) + 2N(trainable) for a training pass (6N when
all N parameters train; less with --freeze-layers or --lora, which skip weight gradients and, below the frozen
layers, the backward pass). The matmul speed is measured for about 0.2 s on this machine, with the model's own
widths, micro-batch and thread count; the efficiencies (the share of that speed whole steps reach: attention,
normalisation, the optimiser, data collation; for generation, one token per sequence at a time) were fitted once
on CPU to real runs of the default model (docs/BENCHMARKS.md, "Dry run"). Padding counts: each micro-batch
computes its longest example's length for every example in it.

A new stage gets `--dry-run` with its args field (`dry_run: bool = dry_run_field()` from `core.args`; Trainer
stages inherit it from `TrainArgs`) and one call just before its weights load: `trainer_stage(...)` for a
Trainer stage, or `finish(reporter, report(...))` with its own steps and an `estimate_time(Compute(...))` (the
ppo stage's `preflight.dry_run` is the example).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core import launch, memory
from rlhf_cli.core.config import fields_of, origins

# Share of the measured matmul speed that whole steps reach on CPU: fitted to the demo's documented runs on 2 cores
# (docs/BENCHMARKS.md "Dry run": sft 61 s, reward 94 s, ppo 15.2 s per update, of which 4.0 s generating) with
# the matmul speed of the same machine when quiet: the estimates come out 17% under (sft), 45% over (reward) and
# 14% over (ppo) those runs.
TRAIN_EFFICIENCY = 0.7
FORWARD_EFFICIENCY = 0.7
DECODE_EFFICIENCY = 0.28
MEASURE_SECONDS = 0.2


@dataclass
class Compute:
    """What a stage will compute: FLOPs of training passes (forward + backward) and of forward-only passes (eval,
    reference and reward scores), and tokens generated one at a time (rollouts), `decode_batch` sequences at
    once."""

    train_flops: float = 0.0
    forward_flops: float = 0.0
    decode_tokens: float = 0.0
    decode_batch: int = 1


@dataclass
class TimeEstimate:
    seconds: float
    how: str


@dataclass
class DryRunReport:
    """What `--dry-run` found: the resolved settings with where each came from, the data, and the plan."""

    stage: str
    out: Path
    settings: list[tuple[str, Any, str]]  # (name, value, source) in --help order
    summary: dict[str, Any]  # what the stage found and will do, in the order it is shown
    steps: int
    tokens_per_epoch: int
    memory: memory.MemoryPlan
    time: TimeEstimate

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "steps": self.steps,
                "tokens_per_epoch": self.tokens_per_epoch, "memory": self.memory.to_dict(),
                "estimated_seconds": round(self.time.seconds, 1), "estimate": self.time.how,
                "summary": {k: v for k, v in self.summary.items()},
                "settings": {name: {"value": value, "source": source} for name, value, source in self.settings}}


def settings(args: Any, resolved: dict[str, Any] | None = None) -> list[tuple[str, Any, str]]:
    """Every field of `args` with its value and source: a flag, the --config file, the parent stage, the stage
    (its default for a setting left open, a parent folder it found), or the default; then `resolved`, values the
    stage chose that no field holds."""
    given = origins(args)
    # args built in Python (not by `resolve`): a value off its default was given there or filled in by the stage
    other = "the stage" if given is not None else "given, or filled in by the stage"
    rows = []
    for f, _ in fields_of(type(args)):
        if f.name == "dry_run":
            continue
        value = getattr(args, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        source = (given or {}).get(f.name) or ("default" if value == default else other)
        rows.append((f.name, value, source))
    rows += [(k, v, "stage") for k, v in (resolved or {}).items()]
    return rows


def length_stats(lengths: list[int]) -> str:
    """'min 12, mean 48.2, median 40, p95 120, max 256 tokens' of a list of token counts."""
    if not lengths:
        return "none"
    s = sorted(lengths)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return (f"min {s[0]}, mean {sum(s) / len(s):.1f}, median {q(0.5)}, p95 {q(0.95)}, max {s[-1]} tokens "
            f"({len(s)} sequences)")


def forward_flops(shape: memory.ModelShape, head: float = 1.0) -> float:
    """FLOPs of one token's forward pass: 2 per weight of the transformer body (the embedding lookup is free) and,
    on the share `head` of tokens that get vocabulary logits (1 for a language model's loss, the response's share
    for PPO's log-probabilities, 0 for a scoring model), 2 per weight of the vocabulary projection."""
    vocab = shape.vocab * shape.hidden
    return 2.0 * max(shape.params - vocab, 0) + head * 2.0 * vocab


def train_flops(shape: memory.ModelShape, *, head: float = 1.0, lora: bool = False, lora_r: int = 16,
                freeze_layers: int = 0) -> float:
    """FLOPs of one token's training pass: the forward, then backward 2 per weight the gradient passes through
    (the layers above --freeze-layers, and the vocabulary projection on tokens with logits) and 2 per weight that
    trains (all of them: 6N per token; fewer with --freeze-layers or --lora)."""
    vocab = shape.vocab * shape.hidden
    body = max(shape.params - vocab, 0)
    per_layer = body / max(shape.layers, 1)
    backprop = body - freeze_layers * per_layer
    trainable = memory.trainable_params(shape, lora=lora, lora_r=lora_r, freeze_layers=freeze_layers)
    embeddings_train = not lora and not freeze_layers  # (tied) embeddings get their gradient through the head
    trainable_body = trainable - (vocab if embeddings_train else 0)
    return (forward_flops(shape, head) + 2.0 * backprop + 2.0 * trainable_body
            + head * 2.0 * vocab * (2 if embeddings_train else 1))


def matmul_speed(rows: int, shape: memory.ModelShape, seconds: float = MEASURE_SECONDS, precision: str = "fp32"
                 ) -> tuple[float, str]:
    """FLOP/s of (rows x hidden) @ (hidden x intermediate) matmuls where the run will compute (on the CPU in
    `precision`, the dtype autocast computes in, with torch's threads as set; bf16, or fp16, on a GPU): the best
    of short windows over about `seconds`, so that a moment's contention from other processes does not decide the
    figure. Also says what was measured."""
    import torch

    gpu = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if gpu else \
        {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = "cuda" if gpu else "cpu"
    from torch.nn.functional import linear  # the kernel a model's layers run (bf16 on an AVX2 CPU: ~3x `a @ b`)

    k, n = max(shape.hidden, 8), max(shape.intermediate, 8)
    a = torch.randn(max(rows, 1), k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    linear(a, w)  # first call: allocation and kernel choice
    sync()
    flops = 2.0 * a.shape[0] * k * n
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds or best == 0.0:
        done, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 10 or done < 2:
            linear(a, w)
            done += 1
            if gpu and done % 16 == 0:
                sync()
        sync()
        elapsed = time.perf_counter() - t0
        best = max(best, flops * done / max(elapsed, 1e-9))
    what = f"the GPU's {str(dtype).removeprefix('torch.')} " if gpu else \
        f"the {precision} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}) "
    return best, what


def estimate_time(compute: Compute, shape: memory.ModelShape, micro_tokens: int, precision: str = "fp32"
                  ) -> TimeEstimate:
    """Seconds for `compute` from the matmul speed measured now in the run's compute `precision` (see the module
    docstring)."""
    dense, what = matmul_speed(min(max(micro_tokens, 1), memory.CPU_MICRO_TOKENS), shape, precision=precision)
    seconds = (compute.train_flops / (dense * TRAIN_EFFICIENCY)
               + compute.forward_flops / (dense * FORWARD_EFFICIENCY))
    how = (f"an estimate: {fmt_flops(compute.train_flops)} of training (6N per token when all N weights train) "
           f"at {fmt_flops(dense)}/s, {what}matmul speed measured just now, x {TRAIN_EFFICIENCY:g}, the share "
           f"of it whole steps reached in real runs of the default model on CPU")
    if compute.forward_flops:
        how += f"; {fmt_flops(compute.forward_flops)} forward-only (x {FORWARD_EFFICIENCY:g})"
    if compute.decode_tokens:
        skinny, _ = matmul_speed(compute.decode_batch, shape, precision=precision)
        seconds += compute.decode_tokens * forward_flops(shape) / (skinny * DECODE_EFFICIENCY)
        how += (f"; {compute.decode_tokens:.0f} generated tokens at 2N each, {compute.decode_batch} sequences at "
                f"a time ({fmt_flops(skinny)}/s measured, x {DECODE_EFFICIENCY:g}), every response taken at "
                f"--max-new-tokens")
    return TimeEstimate(seconds=seconds, how=how)


def fmt_flops(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s" if s >= 1 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def finish(reporter: Any, report: DryRunReport) -> Path:
    """Hand the report to the reporter (the CLI prints it and exits 0); the folder a real run would write."""
    reporter.plan(report)
    return report.out


def trainer_steps(args: Any, examples: int, steps_per_epoch: int | None = None) -> tuple[int, int]:
    """Optimiser steps of a Trainer run and the steps in one epoch: --max-steps, else epochs x batches (the
    Trainer's own rule: ceil(epochs x steps per epoch))."""
    per_epoch = steps_per_epoch or max(1, math.ceil(examples / global_batch(args)))
    return (args.max_steps or max(1, math.ceil(args.epochs * per_epoch))), per_epoch


def global_batch(args: Any) -> int:
    """Examples per optimiser step over every process: --batch-size x --grad-accum x processes (the Trainer's
    per-device batch, accumulated, then averaged across the processes)."""
    return args.batch_size * args.grad_accum * launch.processes(args)


def padded_tokens(lengths: list[int], micro_batch: int, seqs_per_example: int = 1, seed: int | None = 0) -> int:
    """Tokens a pass over `lengths` computes when each micro-batch is padded to its longest example: the examples in
    a seeded random order (the Trainer shuffles), or in the given order when `seed` is None (batches of neighbours,
    such as the pairs of one prompt)."""
    order = list(lengths)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return sum(max(order[i:i + micro_batch]) * len(order[i:i + micro_batch]) * seqs_per_example
               for i in range(0, len(order), max(micro_batch, 1)))


def trainer_stage(args: Any, reporter: Any, stage: str, out: Path, model_path: Path, plan: memory.MemoryPlan,
                  *, example_tokens: list[int], unit: str, data: dict[str, Any], causal: bool = True,
                  padded: int | None = None,
                  eval_tokens: int = 0, eval_passes: int = 2, steps_per_epoch: int | None = None,
                  forward_per_token: float = 0.0, forward_once: bool = False,
                  resolved: dict[str, Any] | None = None) -> Path:
    """The dry run of a Trainer stage (sft, reward, dpo, ...): `example_tokens` are the tokens of each training
    example (all its sequences), `unit` what an example is ("rows", "pairs"), `data` the rows shown about the
    data, `causal` whether the loss is over the vocabulary (False for a scoring model), `padded` the tokens one
    epoch computes with padding (default: `padded_tokens` of `example_tokens`); `forward_per_token`:
    extra forward-only FLOPs per trained token (a frozen reference model), or with `forward_once` per token of one
    epoch (the reference's log-probabilities computed once before training)."""
    shape = memory.ModelShape.of(model_path)
    steps, per_epoch = trainer_steps(args, len(example_tokens), steps_per_epoch)
    per_epoch_tokens = sum(example_tokens)
    if padded is None:
        padded = padded_tokens(example_tokens, plan.micro_batch, seed=getattr(args, "seed", 0))
    trained = padded * steps / per_epoch
    head = 1.0 if causal else 0.0
    train_fpt = train_flops(shape, head=head, lora=bool(getattr(args, "lora", False)),
                            lora_r=getattr(args, "lora_r", 16), freeze_layers=getattr(args, "freeze_layers", 0) or 0)
    compute = Compute(train_flops=trained * train_fpt,
                      forward_flops=(eval_tokens * eval_passes * forward_flops(shape, head)
                                     + (padded if forward_once else trained) * forward_per_token))
    mean = per_epoch_tokens / max(len(example_tokens), 1)
    from rlhf_cli.core import runtime  # the choice the stage made: the probe's cached measurement

    precision = runtime.pick_precision(getattr(args, "precision", "auto"))
    t = estimate_time(compute, shape, int(plan.micro_batch * mean), precision)
    summary = dict(data)
    summary.update({
        "optimisation steps": f"{steps} ({per_epoch} per epoch; effective batch {global_batch(args)} {unit})",
        "tokens per epoch": per_epoch_tokens,
        "tokens computed": f"{int(trained)} (with padding to the longest example of each micro-batch of "
                           f"{plan.micro_batch})",
    })
    return finish(reporter, report(stage, out, args, summary, steps, per_epoch_tokens, plan, t, resolved))


def processes_row(args: Any) -> str:
    """How many processes would run, how they start, and what each one holds."""
    n = launch.processes(args)
    cfg = getattr(args, "accelerate_config", None)
    how = f"accelerate launch --config_file {cfg}" if cfg else "accelerate launch" if n > 1 else "this process"
    if n == 1:
        return f"1 ({how})"
    batch = f"; each takes --batch-size {args.batch_size} x --grad-accum {args.grad_accum} of every step" \
        if hasattr(args, "grad_accum") else ""
    return f"{n} ({how}{batch}; memory below is per process, the time is for one process doing all the work)"


def report(stage: str, out: Path, args: Any, summary: dict[str, Any], steps: int, tokens_per_epoch: int,
           plan: memory.MemoryPlan, t: TimeEstimate, resolved: dict[str, Any] | None = None) -> DryRunReport:
    """The report, with the rows every stage shows after its own: memory, time, and what was not done."""
    summary = dict(summary)
    summary["processes"] = processes_row(args)
    summary["memory"] = plan.describe().removeprefix("memory: ")
    summary["estimated time"] = f"about {fmt_seconds(t.seconds)} ({t.how})"
    summary["output"] = f"{out} (not created: dry run, no weights loaded)"
    return DryRunReport(stage=stage, out=Path(out), settings=settings(args, resolved), summary=summary,
                        steps=steps, tokens_per_epoch=int(tokens_per_epoch), memory=plan, time=t)
