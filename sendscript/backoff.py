"""Exponential backoff with jitter, and a loop guard that reports an outage once.

`exponential_delay` is the one formula: reconnect loops and task retries both
use it. `Backoff` wraps it for a loop that talks to a server: the first failure
is logged as an outage, the first success after it as the recovery, nothing in
between.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger


def exponential_delay(
    attempt: int,
    *,
    base_s: float,
    factor: float = 2.0,
    cap_s: float = 60.0,
    jitter: float = 0.5,
    rand: random.Random | None = None,
) -> float:
    """Delay before try number `attempt` (1-based): base * factor^(attempt-1), capped,
    then spread by +/- `jitter` of itself so that many waiters don't retry together."""
    raw = min(cap_s, base_s * factor ** max(0, attempt - 1))
    if jitter <= 0:
        return raw
    r = (rand or random).uniform(-jitter, jitter)
    return max(0.0, min(cap_s, raw * (1 + r)))


class OutageLog:
    """Says "down" at the first failure and "back" at the first success after it;
    quiet in between, however many calls fail."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0
        self.since: float | None = None

    def failed(self, exc: object) -> None:
        self.failures += 1
        if self.failures == 1:
            self.since = time.monotonic()
            logger.warning("{}: {!r}; retrying with backoff until it answers", self.what, exc)
        else:
            logger.debug("{}: still failing ({}): {!r}", self.what, self.failures, exc)

    def ok(self) -> None:
        if self.failures:
            took = time.monotonic() - (self.since or time.monotonic())
            logger.info("{}: recovered after {} failed tries ({:.1f}s)", self.what,
                        self.failures, took)
            self.failures = 0
            self.since = None


class Backoff:
    """For a loop that talks to a server: log the outage once, sleep more each time."""

    def __init__(self, *, base_s: float = 0.2, cap_s: float = 10.0, factor: float = 2.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.factor = factor
        self._logs: dict[str, OutageLog] = {}

    @property
    def failures(self) -> int:
        return max((log.failures for log in self._logs.values()), default=0)

    async def failed(self, what: str, exc: BaseException,
                     stop: asyncio.Event | None = None) -> bool:
        """Log the failure and wait before the next try; with `stop`, the wait ends
        as soon as it is set (True then: give up, the process is stopping)."""
        log = self._logs.setdefault(what, OutageLog(what))
        log.failed(exc)
        delay = exponential_delay(log.failures, base_s=self.base_s, factor=self.factor,
                                  cap_s=self.cap_s)
        if stop is None:
            await asyncio.sleep(delay)
            return False
        return await stopped_within(stop, delay)

    def succeeded(self, what: str) -> None:
        if what in self._logs:
            self._logs[what].ok()


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False


async def opened_before_stop(opened: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until `opened` or `stop` is set; True if open and not stopping."""
    if not opened.is_set():
        waits = {asyncio.ensure_future(opened.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
    return opened.is_set() and not stop.is_set()


async def every(stop: asyncio.Event, interval_s: float, what: str,
                step: Callable[[], Awaitable[Any]], *, wait_first: bool = False) -> None:
    """Run `step` every `interval_s` until `stop` is set. A failing step is retried
    with backoff, and the outage is logged once, its end once."""
    backoff = Backoff(base_s=0.5, cap_s=10.0)
    if wait_first and await stopped_within(stop, interval_s):
        return
    while not stop.is_set():
        try:
            await step()
            backoff.succeeded(what)
        except Exception as exc:
            await backoff.failed(what, exc, stop)
            continue
        if await stopped_within(stop, interval_s):
            return
