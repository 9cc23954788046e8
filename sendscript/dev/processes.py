"""Runs sendscript's own roles (master, consumer, simulator) as child processes.

`sendscript up`, `sendscript demo`, the end-to-end tests and the benchmarks all
start the service the way supervisord would: one process per role, each with
its settings in the environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class RoleProcess:
    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 log_dir: Path | None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = env
        # Turns the role's argv into the one started (e.g. run it in a network
        # namespace); it must exec the role, so that the pid is the role's own.
        self.wrap = wrap
        self.log_path = (log_dir / f"{name}.log") if log_dir else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RoleProcess:
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "sendscript", *self.args]
        self.proc = subprocess.Popen(
            self.wrap(argv) if self.wrap else argv,
            env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if out is not None:
            out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait; SIGKILL whatever outlives the timeout. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL this process alone (its workers are left to notice)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def kill_group(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
