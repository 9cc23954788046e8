"""Wall-clock timings of a call, for the benchmarks' page and query budgets."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(call: Callable[[], Any], repeat: int) -> float:
    """The median wall time of `repeat` calls, in milliseconds (0.1 ms)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)
