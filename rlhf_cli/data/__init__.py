"""The data layer: reading (`io`), and one module per kind of data (`sft`, `prefs`, `prompts`). Torch-free."""

from rlhf_cli.data.io import DataSet, Record, parse_transcript, read_records, split_eval
from rlhf_cli.data.prefs import PREF_FORMATS, load_prefs
from rlhf_cli.data.prompts import PROMPT_FORMATS, load_prompts
from rlhf_cli.data.sft import SFT_FORMATS, load_sft

__all__ = ["DataSet", "Record", "read_records", "split_eval", "parse_transcript", "SFT_FORMATS", "load_sft",
           "PREF_FORMATS", "load_prefs", "PROMPT_FORMATS", "load_prompts"]
