"""`rlhf dpo` flags (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_cli.core.args import TrainArgs
from rlhf_cli.core.config import opt
from rlhf_cli.data.feedback import FEEDBACK_FORMATS

DEFAULT_MAX_LENGTH = 512
DEFAULT_LR = 5e-6  # DPO moves a policy fast: the usual full fine-tune rates are 5e-7 to 5e-6
DEFAULT_LORA_LR = 5e-5

METHODS = ("dpo", "kto", "orpo", "cpo", "simpo")
# The loss types each method's TRL config accepts (trl 1.16; tests/test_dpo.py checks these lists against the
# installed DPOConfig, KTOConfig and CPOConfig). The first is the default. ORPO has one loss; SimPO is CPO's
# "simpo" loss without the behaviour-cloning term.
LOSSES: dict[str, tuple[str, ...]] = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": ("orpo",),
    "cpo": ("sigmoid", "hinge", "ipo", "simpo"),
    "simpo": ("simpo",),
}
LOSS_CHOICES = tuple(dict.fromkeys(loss for losses in LOSSES.values() for loss in losses))
# beta when --beta is not given: TRL's default, except SimPO, whose rewards are length-normalised log-probs and
# whose paper uses beta 2 to 2.5 with a margin gamma of about 0.5
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "cpo": 0.1, "simpo": 2.0}


def _loss_help() -> str:
    per = "; ".join(f"{m}: {', '.join(LOSSES[m])}" for m in METHODS)
    return f"Loss of the chosen --method (default: its first) ({per})."


@dataclass
class DPOArgs(TrainArgs):
    resume_keys: ClassVar[tuple[str, ...]] = ("method", "loss", "beta", "simpo_gamma", "group_by_prompt")

    model: str | None = opt(None, "Model to start from and reference model: an sft stage (default: RUN/sft), a "
                                  "model folder or a hub id.")
    format: str = opt("auto", "Preference format; detected from the fields when auto (unpaired: prompt, "
                              "completion, label true/false, for --method kto only).", choices=FEEDBACK_FORMATS)
    method: str = opt("dpo", "dpo (trl DPOTrainer), kto (trl KTOTrainer, unpaired thumbs up/down or pairs), orpo "
                             "(trl.experimental ORPOTrainer, no reference model), cpo (trl.experimental "
                             "CPOTrainer), simpo (CPOTrainer, loss simpo, no behaviour cloning).", choices=METHODS)
    loss: str | None = opt(None, _loss_help(), choices=LOSS_CHOICES)
    beta: float | None = opt(None, "Strength of the pull towards the reference model (DPO's beta; ORPO's lambda; "
                                   "SimPO's reward scale) (default: 0.1, 2.0 for simpo).", above=0,
                             expect="a positive number such as 0.1")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin (--method simpo, or cpo with --loss simpo).", min=0)
    precompute_ref: bool = opt(True, "--method dpo: compute the reference model's log-probabilities of every pair "
                                     "once, before training, instead of in every step (one reference pass in all "
                                     "instead of one per epoch, and no second copy of the weights; the same loss). In "
                                     "one process; under several the reference runs in every step.")
    group_by_prompt: bool = opt(True, "Put all pairs of one prompt in the same batch, as `rlhf reward` does (not "
                                      "for kto, whose KL estimate needs a fixed batch order).")
