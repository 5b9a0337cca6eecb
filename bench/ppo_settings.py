"""The PPO settings that both sides of bench/ppo_vs_trl112.py take, declared once. Imported by ppo_vs_trl112.py
and by trl112_ppo.py, which runs in its own virtualenv: standard library only."""

from __future__ import annotations

import argparse

SETTINGS = (("updates", int, 10), ("batch_size", int, 8), ("ppo_epochs", int, 2), ("num_minibatches", int, 2),
            ("response_length", int, 32), ("lr", float, 1e-3), ("kl_coef", float, 0.05),
            ("temperature", float, 0.7), ("missing_eos_penalty", float, 1.0), ("freeze_layers", int, 0))


def add_settings(p: argparse.ArgumentParser) -> None:
    for name, tp, default in SETTINGS:
        p.add_argument("--" + name.replace("_", "-"), type=tp, default=default)


def setting_flags(a: argparse.Namespace) -> list[str]:
    """The settings of `a` as command-line flags, to pass on to trl112_ppo.py."""
    return [x for name, _, _ in SETTINGS for x in ("--" + name.replace("_", "-"), str(getattr(a, name)))]
