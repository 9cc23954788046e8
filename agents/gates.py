"""Protections applied to leases: pause flags and rate limits, as for pushed tasks.

- Pauses (`sendscript.pauses`): the same flags hold pull tasks: global, hard stop,
  queue, group and device scopes. The quota pause is central-control's and does not
  hold agents, which never call it. The flags are reloaded at most once a second.
- Rate limits (`sendscript.limits`): a lease spends one token of each limit that
  covers the task (global, its queue, its device's groups), from the same Redis
  windows the masters use; a task with no token left waits, using no attempt.
- The circuit breaker guards central-control and has nothing to say about agents.
- Priorities and queue caps are the lease query's and `Leases._take`'s (best priority
  first; SENDSCRIPT_QUEUES caps a queue's running pull tasks across agents processes).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript import pauses
from sendscript.groups import devices_of
from sendscript.limits import Ask, RateLimit, RateLimiter, parse_limits
from sendscript.models import ANY_DEVICE
from sendscript.pauses import PauseView
from sendscript.settings import Settings
from sendscript.store import GROUPS

PAUSES_RELOAD_S = 1.0


class LeaseGates:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis,
                 db: AsyncDatabase) -> None:
        self.settings = settings
        self.redis = client
        self.groups = db[GROUPS]
        self.limits: dict[str, RateLimit] = parse_limits(settings.rate_limits)
        self.limiter = RateLimiter(client, settings.keys)
        self.view = PauseView.empty()
        self._view_at = -1e9
        self._limit_groups: dict[str, list[str]] = {}  # device -> its limited groups
        self._groups_at = -1e9
        self.held: Counter[str] = Counter()  # why tasks waited: pause scope / rate limit

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self._view_at >= PAUSES_RELOAD_S:
            flags = await pauses.load(self.redis, self.settings.keys)
            flags.pop(pauses.QUOTA, None)
            paused_groups = [pauses.split(s)[1] for s in flags if pauses.split(s)[0] == "group"]
            members = await self._members(paused_groups)
            self.view = PauseView.build(flags, members)
            self._view_at = now
        limited = [lim.target for lim in self.limits.values() if lim.kind == "group"]
        if limited and now - self._groups_at >= self.settings.rate_limit_groups_refresh_s:
            of: dict[str, list[str]] = {}
            for group, devices in (await self._members(limited)).items():
                for device in devices:
                    of.setdefault(device, []).append(group)
            self._limit_groups = of
            self._groups_at = now

    async def _members(self, names: list[str]) -> dict[str, list[str]]:
        if not names:
            return {}
        return devices_of([d async for d in self.groups.find({"_id": {"$in": names}})])

    @property
    def quiet(self) -> bool:
        """Everything is paused: agents may as well lease less often."""
        return self.view.everything is not None

    def paused(self, task: dict[str, Any]) -> str | None:
        device = task.get("device_id", ANY_DEVICE)
        return self.view.match(task.get("queue", "default"), "" if device == ANY_DEVICE
                               else device)

    def limits_of(self, task: dict[str, Any]) -> list[RateLimit]:
        out = []
        if (lim := self.limits.get("global")) is not None:
            out.append(lim)
        if (lim := self.limits.get(f"queue:{task.get('queue', 'default')}")) is not None:
            out.append(lim)
        for group in self._limit_groups.get(task.get("device_id", ""), ()):
            if (lim := self.limits.get(f"group:{group}")) is not None:
                out.append(lim)
        return out

    async def admit(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tasks (in order) the rate limits let go now; a token each of their limits.
        Tokens granted and not used are given back in their window."""
        if not self.limits or not tasks:
            return tasks
        per_task = [self.limits_of(t) for t in tasks]
        want: Counter[str] = Counter(lim.name for lims in per_task for lim in lims)
        if not want:
            return tasks
        names = list(want)
        reservation = await self.limiter.reserve(
            [Ask(self.limits[n], want[n]) for n in names])
        left = {n: g.granted for n, g in zip(names, reservation.grants, strict=True)}
        admitted = []
        for task, lims in zip(tasks, per_task, strict=True):
            if all(left[lim.name] > 0 for lim in lims):
                for lim in lims:
                    left[lim.name] -= 1
                admitted.append(task)
            else:
                self.held["rate_limit"] += 1
        back = [Ask(self.limits[n], 0, left[n], g.grant)
                for n, g in zip(names, reservation.grants, strict=True) if left[n] > 0]
        if back:
            await self.limiter.reserve(back)
        return admitted
