"""How the master learns a device is free: the consumer's event, and a slow fallback.

The consumer publishes `{"device_id", "fence"}` on the device-free channel when it
releases a lock; that drives dispatch of the device's next task at once. A
lost event (a reconnect, a crash between release and publish) must not strand a
device, so now and then the master also reads the locks of the devices it waits
on, and treats a lock that is gone as freed; a reconnect of the listener asks for
such a check at once (`FreeEventsMissed`). Both say what they found as `DeviceFreed`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import Bus, Subscription
from master.events import DeviceFreed, FreeEventsMissed
from master.jobs import Jobs
from sendscript.backoff import Backoff, every
from sendscript.locks import DeviceLocks


class DeviceFreeListener:
    def __init__(self, client: redis.asyncio.Redis, channel: str, bus: Bus) -> None:
        self.client = client
        self.channel = channel
        self.bus = bus
        self.received = 0

    def report(self) -> dict[str, Any]:
        return {"device_free_events": self.received}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if backoff.failures:
                    self.bus.emit(FreeEventsMissed())  # sent while we were away
                backoff.succeeded("device-free events")
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._handle(message["data"])
            except Exception as exc:
                await backoff.failed("device-free events", exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    def _handle(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            device_id, fence = str(event["device_id"]), int(event["fence"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed device-free event {!r}", data[:200])
            return
        self.received += 1
        self.bus.emit(DeviceFreed(device_id, fence, "event"))


class LockChecker:
    """The fallback: read the locks of devices we wait on; a missing lock frees one."""

    def __init__(self, locks: DeviceLocks, waiting: Callable[[], list[str]], bus: Bus,
                 jobs: Jobs, interval_s: float) -> None:
        self.locks = locks
        self.waiting = waiting  # the devices the board waits on (a read-only view)
        self.bus = bus
        self.jobs = jobs
        self.interval_s = interval_s
        self.freed = 0

    def subscriptions(self) -> list[Subscription]:
        return [(FreeEventsMissed, lambda _: self.jobs.spawn(self.check(), "lock check"))]

    def report(self) -> dict[str, Any]:
        return {"freed_by_lock_check": self.freed}

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.interval_s, "lock check", self.check, wait_first=True)

    async def check(self) -> int:
        devices = self.waiting()
        gone = 0
        for start in range(0, len(devices), 500):
            chunk = devices[start:start + 500]
            for device_id, holder in zip(chunk, await self.locks.holders(chunk), strict=True):
                if holder is None:
                    gone += 1
                    self.bus.emit(DeviceFreed(device_id, None, "lock-check"))
        if gone:
            logger.info("lock check: {} device(s) free without an event", gone)
        self.freed += gone
        return gone
