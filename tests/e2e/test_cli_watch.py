"""`sendscript status --watch` in a real terminal (a pty): it draws the status, redraws
it as the service changes, and ends cleanly on Ctrl-C (SIGINT): exit 0, cursor back."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from sendscript.settings import Settings
from tests.support import Inspect, settings_env

pytestmark = pytest.mark.e2e

SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A child process on a pseudo-terminal; what it wrote so far, escapes included."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.fd, child = os.openpty()
        env = {**env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "60"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(args, env=env, stdin=child, stdout=child, stderr=child,
                                     start_new_session=True)
        os.close(child)
        self.raw = ""

    def read_until(self, predicate, timeout_s: float, what: str) -> str:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not predicate(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{self.text[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode} before {what}:\n"
                                         f"{self.text[-2000:]}")
                self.raw += chunk.decode(errors="replace")
        return self.text

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.fd)


def test_status_watch_redraws_and_ends_on_ctrl_c(settings: Settings, inspect: Inspect) -> None:
    term = Terminal([sys.executable, "-m", "sendscript", "status", "--watch"],
                    settings_env(settings))
    try:
        term.read_until(lambda t: "ready queue: 0 " in t, 60, "the first view")
        first_draws = term.text.count("ready queue:")
        # The service changes; a later redraw shows it (nothing else would print it).
        inspect.redis.lpush(settings.keys.ready,
                            *[json.dumps({"task_id": f"t-{i}"}) for i in range(3)])
        term.read_until(lambda t: "ready queue: 3 " in t, 30, "a redraw with 3 items")
        term.read_until(lambda t: t.count("ready queue: 3 ") >= 2, 30, "a second redraw")
        assert term.text.count("ready queue:") >= first_draws + 2
        assert term.proc.poll() is None, "still watching"

        term.proc.send_signal(signal.SIGINT)
        assert term.proc.wait(30) == 0, term.text[-2000:]
        while select.select([term.fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(term.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            term.raw += chunk.decode(errors="replace")
        assert "Traceback" not in term.text and "Aborted" not in term.text, term.text[-2000:]
        # The live view hid the cursor while drawing; the clean exit shows it again.
        assert term.raw.rfind(SHOW_CURSOR) > term.raw.rfind(HIDE_CURSOR) >= 0
    finally:
        term.close()
