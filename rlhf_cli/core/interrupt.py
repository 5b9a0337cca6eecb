"""Stopping cleanly on Ctrl-C (SIGINT) and SIGTERM.

The first signal is a request: the running stage finishes its current step, saves a resumable checkpoint and
raises `Interrupted`, whose message is the exact command that resumes; the CLI exits 130 (SIGINT) or 143
(SIGTERM), as shells expect. A second signal stops at once (KeyboardInterrupt), leaving the last checkpoint.
SIGKILL cannot be caught: `--save-every N` keeps a checkpoint at most N steps old for that case.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable

from rlhf_cli.core import launch
from rlhf_cli.core.errors import RLHFError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Under a launcher, Ctrl-C reaches every rank from the terminal and again from the launcher a moment later: a
# second signal this soon after the first is that echo, not a second request.
ECHO_S = 3.0


class Interrupted(RLHFError):
    """A stage stopped by a signal after saving what a resumed run needs."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def resume_command(argv: list[str] | None = None, flag: str = "--resume") -> str:
    """The command line that was run, with `flag` added: what continues it."""
    if argv is None:  # under `accelerate launch`, the command as typed (with --num-processes), not the rank's own
        argv = launch.original_argv() or sys.argv[1:]
    args = list(argv)
    if flag and flag not in args:
        args.append(flag)
    return shlex.join(["rlhf", *args])


class StopSignals:
    """While active, SIGINT and SIGTERM set `requested` (the signal number) instead of killing the process."""

    def __init__(self, say: Callable[[str], None] = lambda s: None, what: str = "step"):
        self.say, self.what = say, what
        self.requested: int | None = None
        self.at = 0.0
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested is not None and launch.launched() and time.monotonic() - self.at < ECHO_S:
            return  # the launcher passing on the Ctrl-C this process already had from the terminal
        if self.requested is not None:  # the second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.requested, self.at = signum, time.monotonic()
        self.say(f"{signal_name(signum)}: stopping after this {self.what} and saving a checkpoint "
                 f"(Ctrl-C again to stop at once)")

    def __bool__(self) -> bool:
        return self.requested is not None

    def stop(self, where: str, checkpoint: str, argv: list[str] | None = None, flag: str = "--resume"
             ) -> Interrupted:
        """The exception to raise once the checkpoint is saved."""
        sig = self.requested or signal.SIGINT
        return Interrupted(sig, f"stopped by {signal_name(sig)} {where}; saved in {checkpoint}; resume with: "
                                f"{resume_command(argv, flag)}")
