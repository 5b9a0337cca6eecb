"""Stage 2, the reward model: `args` (the flags) and `train` (`run_reward`)."""
