"""`rlhf reward` flags (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import TrainArgs
from rlhf_cli.core.config import opt
from rlhf_cli.data.prefs import PREF_FORMATS

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
