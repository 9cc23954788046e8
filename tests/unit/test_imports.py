"""The layout's import rules (the [tool.importlinter] contracts in pyproject.toml) hold:
the roles sit above the shared core and none reaches into another, a worker never
imports the master, nothing imports bench."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-4000:]


def test_the_cli_loads_no_role_until_a_command_runs() -> None:
    """The CLI is the one core module allowed to import roles, and only lazily: loading
    it (as every `sendscript ...` does) loads no role package."""
    code = ("import sys, sendscript.cli\n"
            "roles = {'master', 'worker', 'consumers', 'console', 'agents', 'bench'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in roles))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
