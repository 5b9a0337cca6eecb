"""Several processes through accelerate: `--num-processes N` / `--accelerate-config FILE` on a training command
make the plain command start itself again under `accelerate launch`, with the same arguments minus those two.

The launched processes find themselves through the launcher's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
set by torchrun, which accelerate drives) and never launch again. Rank 0 alone shows progress and writes the stage
folder's own files (weights, metrics, model card, manifest); the Trainer-based stages split each global batch
across the processes (DistributedDataParallel; DeepSpeed or FSDP when the config file names them).

Without a config file, `--num-processes N` asks accelerate for its torchrun launcher (`--multi_gpu`): on a machine
without GPUs the processes then talk over gloo on the CPU. (accelerate's own `--cpu` launcher starts a single
process unless an MPI host file is given.) Nothing here imports torch.

    rlhf sft --run runs/demo --data examples/data/sft_messages.jsonl --num-processes 2
    rlhf sft --run runs/demo --data examples/data/sft_messages.jsonl --accelerate-config examples/accelerate/ddp.yaml
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from rlhf_cli.core.errors import ConfigError

FLAGS = ("--num-processes", "--accelerate-config")  # each takes one value
ARGV_ENV = "RLHF_LAUNCH_ARGV"  # the command line as typed, for the resume command that rank 0 prints
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def launched() -> bool:
    """True inside a process started by a launcher (accelerate, torchrun, deepspeed)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def wants_launch(args: Any) -> bool:
    """The plain command was asked for several processes (or a config file) and is not yet under a launcher."""
    n = getattr(args, "num_processes", None)
    cfg = getattr(args, "accelerate_config", None)
    return (bool(n and n > 1) or bool(cfg)) and not launched() and not getattr(args, "dry_run", False)


def processes(args: Any) -> int:
    """How many processes a run of `args` uses: inside a launcher, the world size; else --num-processes, else the
    config file's num_processes, else 1."""
    if launched():
        return world_size()
    if getattr(args, "num_processes", None):
        return args.num_processes
    cfg = getattr(args, "accelerate_config", None)
    return config_processes(cfg) if cfg else 1


def config_processes(path: str) -> int:
    """`num_processes` of an accelerate config file (1 when it names none)."""
    from rlhf_cli.core.config import load_yaml

    n = load_yaml(path).get("num_processes", 1)
    return n if isinstance(n, int) and n > 0 else 1


def strip_flags(argv: list[str]) -> list[str]:
    """`argv` without --num-processes N and --accelerate-config FILE (either spelling, `--flag=value` too)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in FLAGS and "=" in a:
            continue
        kept.append(a)
    return kept


def launch_argv(args: Any, argv: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `rlhf ARGV` in --num-processes processes (or as the config file
    says)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    cfg = getattr(args, "accelerate_config", None)
    if cfg:
        if not os.path.isfile(cfg):
            raise ConfigError(f"--accelerate-config {cfg}: no such file; expected an accelerate config YAML such "
                              f"as examples/accelerate/ddp.yaml")
        cmd += ["--config_file", cfg]
    n = getattr(args, "num_processes", None)
    if n:
        cmd += ["--num_processes", str(n)]
    if not cfg:
        # no config: torchrun for several processes (gloo on the CPU), with the defaults spelt out so accelerate
        # does not warn about them; a free port, so two runs on one machine do not collide
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
        cmd += ["--multi_gpu"] if (n or 1) > 1 else []
    return cmd + ["-m", "rlhf_cli", *strip_flags(argv)]


def relaunch(args: Any, argv: list[str] | None = None, say: Callable[[str], None] = print) -> None:
    """Replace this process by `accelerate launch` of the same command (never returns). The launcher keeps this
    process id, so a signal sent to it reaches the launcher, which passes it on to every rank."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "check_launch"):  # what a stage refuses to run in several processes, said before they start
        args.check_launch()
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("--num-processes/--accelerate-config: accelerate is not installed; expected it beside "
                          "transformers (pip install accelerate)") from None
    cmd = launch_argv(args, argv)
    n = processes(args)
    say(f"launching {n} process{'es' if n != 1 else ''}: accelerate launch {shlex.join(cmd[4:])}")
    env = dict(os.environ, **{ARGV_ENV: json.dumps(argv)})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def original_argv() -> list[str] | None:
    """Inside a launched process: the command line the user typed (with its --num-processes), else None."""
    raw = os.environ.get(ARGV_ENV)
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
