"""The master's heartbeat: what it is doing, where `sendscript status` can read it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis.asyncio

from sendscript import roundtrips
from sendscript.backoff import every
from sendscript.heartbeat import add_beat
from sendscript.models import utcnow
from sendscript.settings import Settings


class Heartbeat:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings,
                 report: Callable[[], dict[str, Any]], started_at: datetime) -> None:
        self.client = client
        self.settings = settings
        self.report = report
        self.started_at = started_at.isoformat()

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.heartbeat_interval_s, "heartbeat", self.beat)

    async def beat(self) -> None:
        keys = self.settings.keys
        me = self.settings.master_id
        status = {
            "master_id": me,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": utcnow().isoformat(),
            **self.report(),
        }
        pipe = self.client.pipeline(transaction=False)
        add_beat(pipe, keys.masters, me, keys.master_alive(me), status,
                 self.settings.heartbeat_ttl_s)
        await pipe.execute()
        await roundtrips.flush(self.client, keys.roundtrips, "master")

    async def remove(self) -> None:
        """Stop being alive. The entry in the masters hash stays: to the others this
        master is now dead, and the leader takes over what it still holds."""
        keys = self.settings.keys
        await roundtrips.flush(self.client, keys.roundtrips, "master")
        await self.client.delete(keys.master_alive(self.settings.master_id))

