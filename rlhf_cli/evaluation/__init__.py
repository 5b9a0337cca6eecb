"""Measuring checkpoints: `eval_reward`, `eval_policy`, and the run `report`; their flags in `args`."""
