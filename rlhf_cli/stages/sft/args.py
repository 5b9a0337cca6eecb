"""`rlhf sft` flags (torch-free, so `--help` is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.core.args import TrainArgs
from rlhf_cli.core.config import opt
from rlhf_cli.data.sft import SFT_FORMATS

DEFAULT_MAX_LENGTH = 1024
DEFAULT_LR = 2e-5
DEFAULT_LORA_LR = 2e-4


@dataclass
class SFTArgs(TrainArgs):
    format: str = opt("auto", "Data format; detected from the fields when auto.", choices=SFT_FORMATS)
    assistant_only_loss: bool = opt(True, "Train only on the assistant's tokens (the prompt is context).")
    packing: bool = opt(False, "Pack several short examples into each sequence of --max-length tokens.")
