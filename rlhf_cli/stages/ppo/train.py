"""Stage 3: reinforcement learning against the reward model with PPO, written here from the algorithm.

The InstructGPT recipe (Ouyang et al. 2022) after Ziegler et al. (2019), with the implementation details of
Huang et al. (2024), "The N+ Implementation Details of RLHF with PPO". Every update:

1. Rollouts: `--batch-size` prompts, one response each sampled from the policy (batched HF generate with left
   padding and the KV cache; temperature, top-k, top-p; stops at EOS).
2. Scores: the reward model (RM) reads prompt + response and gives one score. When both models share the
   vocabulary and the chat template, the policy's token ids go straight in (plus the template's end-of-turn
   suffix, so the RM sees what it was trained on); otherwise the response is decoded and re-encoded through the
   RM's own template. Responses without EOS can be penalised (`--missing-eos-penalty`); scores can be
   normalised with running statistics (`--normalize-rewards`) and clipped (`--score-clip`).
3. Shaped per-token rewards: `-beta * KL_t(policy || SFT)` on every response token (estimator k1 or k3), the
   score added on the last one; beta fixed or adapted towards `--kl-target` (Ziegler et al. 2019, 2.2).
4. Advantages: a value model (started from the RM, or from the policy with a fresh one-output head; its head is
   applied to every hidden state) predicts a value per token; GAE(gamma, lambda), then whitened advantages.
5. PPO: `--ppo-epochs` passes over minibatches of the rollouts (rollouts of similar length together, in a
   shuffled order; or random minibatches) with the clipped surrogate for the policy and the clipped value loss,
   gradient accumulation and clipping, a decaying learning rate, and an optional early stop of the update when
   the approximate KL to the rollout policy passes `--target-kl`.

Every forward pass (old and reference log-probabilities, values, RM scores, training) runs its rows without the
columns that are padding in all of them: with prompts of mixed lengths, padding is a large part of a batch.

The reference is a frozen copy of the SFT policy (with `--lora`, the same weights with the adapters switched
off). Old log-probabilities come from the same forward path as the training passes, dropout off and logits
divided by the sampling temperature, so the first minibatch of each update starts at ratio 1 (recorded in
metrics.jsonl as check/first_logratio_max). Masks come from the first EOS, never from `ids != pad`, so a
tokenizer whose pad token is its EOS corrupts nothing. `--algo grpo` and `--algo rloo` give the same prompts
and RM to TRL's GRPOTrainer / RLOOTrainer instead (group baselines, no value model).

Several processes (`--num-processes N`): each takes its own `--batch-size` prompts of every update and samples
them with its own seed; DDP averages the gradients, and whitening, reward statistics, the KL controller and the
logged figures use the whole batch (see `trainer` and docs/SCALING.md).

The phases live in their own modules: `preflight` (checks before any weights load), `rollout` (generation,
forward passes, scores), `trainer` (the PPO loop), `checkpoint` (run folder and resume), `trl_algos` (GRPO, RLOO),
`core` (the maths, torch only).

The run folder: the policy at the top (a normal Hugging Face folder), OUT/value, OUT/state (scheduler, RNG, KL
controller and reward statistics; the checkpoints in OUT.partial also hold the optimiser state: enough for
`--resume`), metrics.jsonl (one line per update), samples.jsonl, and the manifest, written last.

    rlhf ppo --run runs/demo --prompts examples/data/prompts.jsonl --max-steps 20 --max-new-tokens 48
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_cli.core import hub, launch, runtime, vllm_engine
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.core.manifest import stage_output
from rlhf_cli.core.progress import Reporter
from rlhf_cli.core.training import complete_checkpoints
from rlhf_cli.stages.ppo.args import PPOArgs, check_ppo_args
from rlhf_cli.stages.ppo.checkpoint import PPOOutput, Stopped
from rlhf_cli.stages.ppo.preflight import dry_run, preflight
from rlhf_cli.stages.ppo.trainer import PPOTrainer
from rlhf_cli.stages.ppo.trl_algos import run_trl


def check_gpu_flags(a: PPOArgs) -> None:
    """--use-vllm and --load-in-4bit: one line, before any weights load, where this machine or run cannot."""
    if a.algo == "ppo" and a.use_vllm and a.load_in_4bit:
        raise ConfigError("--use-vllm with --load-in-4bit: --algo ppo hands vLLM the policy's merged weights, which "
                          "4-bit base weights cannot give exactly; expected one of them (or --algo grpo/rloo)")
    vllm_engine.check_vllm(a.use_vllm, launch.processes(a), a.vllm_mode,
                           what="rlhf ppo --algo ppo" if a.algo == "ppo" else "")
    runtime.check_load_in_4bit(a.load_in_4bit)


def run_ppo(args: PPOArgs, reporter: Reporter | None = None) -> Path:
    """Train the policy against the reward model; returns the finished stage folder (with --stop-after, the
    OUT.partial folder holding the checkpoint)."""
    reporter = reporter or Reporter(every=1)
    say = reporter.info
    started = time.time()
    check_ppo_args(args)
    staged = stage_output(args.out, args.run, "ppo", args.overwrite, PPOOutput, resume=args.resume)
    if args.resume and args.algo == "ppo" and not staged.checkpoint.is_file():
        raise ConfigError(f"--resume: no checkpoint in {staged.partial} (one is written every --save-every N "
                          f"updates, and by --stop-after); start again without --resume")
    if args.resume and args.algo != "ppo" and not complete_checkpoints(staged.partial):
        raise ConfigError(f"--resume: no checkpoint in {staged.partial / 'trainer'} (one is written every "
                          f"--save-every N steps, and by --stop-after); start again without --resume")
    if not args.resume and staged.partial.exists():
        say(f"{'a real run would discard' if args.dry_run else 'discarding'} the unfinished run in "
            f"{staged.partial} (pass --resume to continue it)")
    if not args.dry_run:  # a dry run shows whether they would run here instead of refusing
        check_gpu_flags(args)
    plan = preflight(args, say)
    if args.dry_run:
        return dry_run(args, plan, staged.out, reporter)
    say("reward model reads " + ("the policy token ids directly (same tokenizer and chat template)" if plan.same_ids
                                 else f"the text re-encoded with its own chat template ({plan.why_reencode})"))
    try:
        if args.algo != "ppo":
            folder = run_trl(args, plan, staged, reporter, started)
        else:
            folder = PPOTrainer(args, plan, staged, reporter, started).train()
    except Stopped:
        return staged.partial
    hub.push_if_asked(args, folder, say)  # --push-to-hub: checked before training, uploaded now
    return folder
