"""Experiment tracking (`--report-to`) for every training stage.

The Trainer-based stages (sft, reward, and any stage built on `core.training.hf_training_kwargs`, plus TRL's GRPO
and RLOO) hand the chosen integrations to transformers, whose own callbacks log. Our PPO is not a Trainer, so
`Tracker` logs its per-update figures through each library's API: `torch.utils.tensorboard.SummaryWriter`,
`wandb`, `mlflow`, `trackio`. Both write TensorBoard events to `OUT/runs/<date>_<host>`, the Trainer callback's own
layout under its output folder (Trainer stages train with that folder inside OUT/trainer; `keep_trainer_logs`
moves the events up when the checkpoints are dropped), so one `tensorboard --logdir RUN` shows every stage.

A chosen integration that is not installed is refused before any model loads, with the pip extra to install.
Torch-free at import (the CLI checks the flag); the libraries load only when a tracker opens.

    rlhf sft --run runs/demo --data examples/data/sft_messages.jsonl --report-to tensorboard
    tensorboard --logdir runs/demo
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from rlhf_cli.core.errors import ConfigError

NONE = "none"
# integration -> the module it needs (also the name of the pip extra that installs it)
INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
CHOICES = (NONE, *INTEGRATIONS)
PROJECT = "rlhf-cli"  # trackio's project (wandb and mlflow keep their own defaults and environment variables)
LOG_DIR = "runs"  # OUT/runs/<date>_<host>: TensorBoard event files


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """`tensorboard,mlflow` (or a list) -> ["tensorboard", "mlflow"]; `none` -> []. Unknown names are an error."""
    items = value if isinstance(value, (list, tuple)) else str(value or NONE).split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    bad = [n for n in names if n not in CHOICES]
    if bad:
        raise ConfigError(f"--report-to {bad[0]}: not a tracking integration; expected one of: {', '.join(CHOICES)} "
                          f"(or a comma list such as tensorboard,mlflow)")
    if NONE in names and len(names) > 1:
        raise ConfigError(f"--report-to {','.join(names)}: `none` cannot be combined with an integration; pass "
                          f"none or the integrations to log to")
    return [n for n in dict.fromkeys(names) if n != NONE]


def check_report_to(value: str | list[str] | None) -> list[str]:
    """The chosen integrations, each installed; else one error naming the extra to install."""
    names = parse_report_to(value)
    for name in names:
        if importlib.util.find_spec(INTEGRATIONS[name]) is None:
            raise ConfigError(f"--report-to {name}: the {INTEGRATIONS[name]} package is not installed; install it "
                              f"with pip install \"rlhf-cli[{name}]\", or pass --report-to none")
    return names


def hf_report_to(value: str | list[str] | None) -> list[str] | str:
    """The TrainingArguments `report_to` value."""
    return parse_report_to(value) or NONE


def run_name(out: Path) -> str:
    """`demo/sft` for runs/demo/sft (or its .partial staging folder): the run's name in every tracker."""
    out = Path(out)
    name = out.name.removesuffix(".partial")
    return f"{out.parent.name}/{name}" if out.parent.name else name


def log_dir(out: Path) -> Path:
    """A fresh TensorBoard folder of a stage: OUT/runs/<date>_<host>, as the Trainer's callback names it."""
    stamp = _dt.datetime.now().strftime("%b%d_%H-%M-%S")
    return Path(out) / LOG_DIR / f"{stamp}_{socket.gethostname()}"


def keep_trainer_logs(trainer_dir: Path, dest: Path) -> None:
    """Move the event files the Trainer wrote under its output folder (about to be dropped with the checkpoints)
    into dest/runs."""
    src = Path(trainer_dir) / LOG_DIR
    if not src.is_dir():
        return
    target = Path(dest) / LOG_DIR
    target.mkdir(parents=True, exist_ok=True)
    for run in src.iterdir():
        place = target / run.name
        if place.exists():  # a resumed run that reused a name: keep both
            place = target / f"{run.name}-{len(list(target.iterdir()))}"
        shutil.move(str(run), str(place))


def _scalars(figures: dict[str, Any]) -> dict[str, float]:
    return {f"train/{k}": float(v) for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Per-step figures to every chosen integration, for a training loop that is not a transformers Trainer.
    Figures are logged as `train/NAME`, the Trainer callbacks' naming, so stages line up in one dashboard."""

    def __init__(self, report_to: str | list[str] | None, out: Path, config: dict[str, Any] | None = None):
        self.names = check_report_to(report_to)
        self.out, self.config = Path(out), dict(config or {})
        self.name = run_name(self.out)
        self.writers: dict[str, Any] = {}

    def __enter__(self) -> Tracker:
        for name in self.names:
            self.writers[name] = getattr(self, f"_open_{name}")()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open_tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir(self.out)))
        writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in self.config.items()))
        return writer

    def _open_wandb(self) -> Any:
        import wandb

        return wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), name=self.name, config=self.config)

    def _open_mlflow(self) -> Any:
        import mlflow

        run = mlflow.start_run(run_name=self.name)
        params = {k: str(v)[:500] for k, v in self.config.items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(items[i:i + 100]))
        return run

    def _open_trackio(self) -> Any:
        import trackio

        return trackio.init(project=os.getenv("TRACKIO_PROJECT", PROJECT), name=self.name, config=self.config)

    def log(self, step: int, figures: dict[str, Any]) -> None:
        scalars = _scalars(figures)
        if not scalars:
            return
        for name, writer in self.writers.items():
            if name == "tensorboard":
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, step)
                writer.flush()
            elif name == "wandb":
                import wandb

                wandb.log(scalars, step=step)
            elif name == "mlflow":
                import mlflow

                mlflow.log_metrics(scalars, step=step)
            elif name == "trackio":
                import trackio

                trackio.log(scalars, step=step)

    def close(self) -> None:
        writers, self.writers = self.writers, {}
        for name, writer in writers.items():
            if name == "tensorboard":
                writer.close()
            elif name == "wandb":
                import wandb

                wandb.finish()
            elif name == "mlflow":
                import mlflow

                mlflow.end_run()
            elif name == "trackio":
                import trackio

                trackio.finish()
