"""The quota signal: a worker answer `quota` (central-control said its quota is
exhausted; the worker undid the attempt) sets the quota pause for every master.

The pause itself, the gate that holds tasks under it and the probe that lifts it
every `quota_probe_s` are in sendscript/pauses.py and master/pauses.py; this part
only raises the flag, once per burst of quota answers.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis.asyncio
from loguru import logger

from master.bus import Subscription
from master.events import TaskAnswered
from master.jobs import Jobs
from sendscript import pauses
from sendscript.settings import Settings

QUOTA = "quota"


class PauseView(Protocol):
    """What this part reads of the pauses in force here (the pause gate's state)."""

    @property
    def quota(self) -> bool: ...


class QuotaSignal:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis, jobs: Jobs,
                 pauses: PauseView) -> None:
        self.settings = settings
        self.redis = client
        self.jobs = jobs
        self.pauses = pauses
        self.answers = 0
        self.set = 0
        self._setting = False

    def subscriptions(self) -> list[Subscription]:
        return [
            (TaskAnswered, self._on_answered),
        ]

    def _on_answered(self, event: TaskAnswered) -> None:
        if event.outcome != QUOTA:
            return
        self.answers += 1
        if self._setting or self.pauses.quota:  # already in force here
            return
        self._setting = True
        logger.warning("central-control quota exhausted (task {}): pausing sends",
                       event.task.id)
        self.jobs.spawn(self._set(event.answer.error or "quota exhausted"), "set quota pause")

    async def _set(self, reason: str) -> None:
        try:
            await pauses.set_quota(self.redis, self.settings.keys, reason[:200])
            self.set += 1
        finally:
            self._setting = False

    def report(self) -> dict[str, Any]:
        return {"answers": self.answers, "set": self.set,
                "status": self.settings.central_quota_status,
                "codes": sorted(self.settings.central_quota_codes)}
