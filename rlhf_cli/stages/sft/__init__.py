"""Stage 1, supervised fine-tuning: `args` (the flags) and `train` (`run_sft`)."""
