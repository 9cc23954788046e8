"""CPU seconds by process tree, from /proc: where a run's CPU went.

    before = CpuTimes.take({"m1": pid, "mongo": server_pid})
    ...                                        # the measured work
    spent = CpuTimes.take(roots).since(before)  # {"m1": 3.2, "mongo": 11.0, "other": 40.1}

Each process counts toward the nearest ancestor (itself included) named in `roots`;
everything else on the machine is `other` (other users' load, this harness). Linux
only. A process that exits between two snapshots takes its CPU with it, so measure
a window in which the named roles stay up; children that exited and were reaped
count in their parent's `cutime`/`cstime`, which is included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
OTHER = "other"


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children)."""
    try:
        text = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2:].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / TICKS


@dataclass
class CpuTimes:
    by_pid: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid: (label, s)

    @classmethod
    def take(cls, roots: dict[str, int]) -> CpuTimes:
        stats: dict[int, tuple[int, float]] = {}
        for entry in PROC.iterdir():
            if entry.name.isdigit() and (st := _stat(entry.name)) is not None:
                stats[int(entry.name)] = st
        label_of = {pid: name for name, pid in roots.items()}
        out: dict[int, tuple[str, float]] = {}
        for pid, (_, seconds) in stats.items():
            out[pid] = (_label(pid, stats, label_of), seconds)
        return cls(out)

    def since(self, before: CpuTimes) -> dict[str, float]:
        """CPU seconds by label between `before` and this snapshot."""
        spent: dict[str, float] = {}
        for pid, (label, seconds) in self.by_pid.items():
            _, was = before.by_pid.get(pid, (label, 0.0))
            spent[label] = spent.get(label, 0.0) + max(0.0, seconds - was)
        return spent


def _label(pid: int, stats: dict[int, tuple[int, float]], label_of: dict[int, str]) -> str:
    seen = 0
    while pid in stats and seen < 64:
        if pid in label_of:
            return label_of[pid]
        pid = stats[pid][0]
        seen += 1
    return OTHER
