"""How the master learns a device is free: the consumer's event, and a slow fallback.

The consumer publishes `{"device_id", "fence"}` on the device-free channel when it
releases a lock; that drives dispatch of the device's next task at once. A
lost event (a reconnect, a crash between release and publish) must not strand a
device, so now and then the master also reads the locks of the devices it waits
on, and treats a lock that is gone as freed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import redis.asyncio
from loguru import logger

from sendscript.backoff import Backoff, every
from sendscript.locks import DeviceLocks

OnFree = Callable[[str, int], None]


class DeviceFreeListener:
    def __init__(self, client: redis.asyncio.Redis, channel: str, on_free: OnFree,
                 on_reconnect: Callable[[], None]) -> None:
        self.client = client
        self.channel = channel
        self.on_free = on_free
        self.on_reconnect = on_reconnect
        self.received = 0

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if backoff.failures:
                    self.on_reconnect()  # events sent while we were away are lost
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
        self.on_free(device_id, fence)


class LockChecker:
    """The fallback: read the locks of devices we wait on; a missing lock frees one."""

    def __init__(self, locks: DeviceLocks, waiting: Callable[[], list[str]],
                 on_gone: Callable[[str], None], interval_s: float) -> None:
        self.locks = locks
        self.waiting = waiting
        self.on_gone = on_gone
        self.interval_s = interval_s
        self.freed = 0

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
                    self.on_gone(device_id)
        if gone:
            logger.info("lock check: {} device(s) free without an event", gone)
        self.freed += gone
        return gone
