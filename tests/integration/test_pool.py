"""The worker pool with real spawned processes: a worker that keeps dying."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

from loguru import logger

from master.pool import WorkerPool
from sendscript.settings import Settings


def die_at_once(worker_id: int, conn: Connection, settings_data: dict[str, Any]) -> None:
    """A worker entry point that crashes before it is online."""
    raise SystemExit(3)


async def test_a_worker_that_keeps_dying_is_restarted_with_growing_waits(
    settings: Settings,
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR", format="{message}")
    pool = WorkerPool(settings.model_copy(update={"workers": 1,
                                                  "worker_restart_backoff_max_s": 8.0}),
                      on_done=lambda *_: None, on_lost=lambda *_: None,
                      on_change=lambda: None, target=die_at_once)
    try:
        pool.start()
        await asyncio.sleep(4.5)
        spawned = pool._next_id
    finally:
        await pool.stop(2.0)
        logger.remove(sink)
    # Waits of 0.5, 1 and 2 s between starts (plus start-up): a few starts, not a spin.
    assert 3 <= spawned <= 5, spawned
    loud = [line for line in lines if "keep dying" in line]
    assert len(loud) == spawned - 1 or len(loud) == spawned, lines
    assert "next start in 0.5s" in loud[0] and "next start in 1.0s" in loud[1]
    assert all("died (exit code 3)" in line or "keep dying" in line for line in lines)
