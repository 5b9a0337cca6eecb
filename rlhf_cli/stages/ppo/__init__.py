"""Stage 3: PPO (ours), GRPO and RLOO (TRL's). `train.run_ppo` is the entry; the module docstring of
`train` explains the algorithm step by step."""
