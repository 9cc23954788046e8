"""CPU time of process trees, read from /proc (psutil), for the benchmarks' CPU split.

A tree is a root pid and every descendant alive when it is sampled, plus what the
root's reaped children used (a recycled worker's time ends up there). Sampling
before and after a measured window gives the CPU each tree spent in it.
"""

from __future__ import annotations

from collections.abc import Mapping

import psutil


def tree_cpu_s(pid: int) -> float:
    """User + system seconds of `pid` and its descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for i, proc in enumerate(procs):
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
        if i == 0:  # reaped children of the root only: the others' are in the tree
            total += t.children_user + t.children_system
    return total


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` alone, in MB (0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.Error:
        return 0.0


class CpuMeter:
    """CPU seconds per named group of trees between `start()` and `stop()`."""

    def __init__(self, groups: Mapping[str, list[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._start: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        return {name: sum(tree_cpu_s(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self.sample()

    def stop(self) -> dict[str, float]:
        now = self.sample()
        return {name: now[name] - self._start.get(name, 0.0) for name in now}
