"""Side jobs of the master: coroutines started from event handlers.

A handler must return at once, so I/O it starts runs as a job. A job's failure is
logged, never lost in a task nobody reads; jobs still running at stop are
cancelled together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from loguru import logger


class Jobs:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._running.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._running.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("{} failed: {!r}", what, t.exception())

        task.add_done_callback(_done)

    def __len__(self) -> int:
        return len(self._running)

    async def settle(self, timeout_s: float) -> None:
        """Let running jobs finish for up to `timeout_s`, then cancel the rest."""
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout_s)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
