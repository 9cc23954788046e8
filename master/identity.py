"""One live process per master_id: a claim in Redis, renewed with the heartbeat.

Two masters with one id would share processing lists, held tasks and a heartbeat
without noticing. So a master claims `{prefix}:master:{id}:claim` with a token of
its own process (SET NX PX heartbeat_ttl_s) before anything else, renews it at
every heartbeat interval, and deletes it when it stops.

A claim held by another token is either alive (renewed) or the leftover of a
process that died without deleting it (SIGKILL). The newcomer watches its TTL: a
renewal (the TTL going up) means the holder is alive, and the newcomer refuses to
start; a claim that runs out was a dead process's, and is taken. So a restart after
a SIGKILL waits at most heartbeat_ttl_s (10 s by default) and a live duplicate is
refused within about one heartbeat interval.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import redis.asyncio
from loguru import logger

from sendscript.backoff import every
from sendscript.settings import Settings

# KEYS[1] the claim; ARGV[1] this process's token, ARGV[2] the TTL (ms).
# 1 taken or renewed; 0 another token holds it.
CLAIM = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] the claim; ARGV[1] the token. Deletes the claim only if it is still ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

POLL_S = 0.2


class IdentityTaken(Exception):
    """Another live process runs a master under this master_id."""


class MasterIdentity:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings,
                 on_lost: Callable[[str], None]) -> None:
        self.client = client
        self.settings = settings
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.key = settings.keys.master_claim(settings.master_id)
        self.ttl_ms = int(settings.heartbeat_ttl_s * 1000)
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)

    async def _try(self) -> bool:
        return bool(await self._claim(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def claim(self) -> None:
        """Take the claim, waiting out a dead holder's; IdentityTaken if it is alive."""
        last_ttl: int | None = None
        deadline = time.monotonic() + self.settings.heartbeat_ttl_s + 2 * POLL_S + 1.0
        while not await self._try():
            ttl = int(await self.client.pttl(self.key))
            if last_ttl is not None and ttl > last_ttl + int(POLL_S * 1000):
                raise IdentityTaken(self._taken_message())
            if last_ttl is None:
                logger.info("master_id {} is claimed by another process; waiting up to "
                            "{:.1f}s for its claim to lapse", self.settings.master_id,
                            max(ttl, 0) / 1000)
            if time.monotonic() > deadline:  # a TTL renewed between our looks
                raise IdentityTaken(self._taken_message())
            last_ttl = ttl
            await asyncio.sleep(POLL_S)

    def _taken_message(self) -> str:
        return (f"master_id {self.settings.master_id!r} is in use by a live master "
                f"(its claim {self.key} is being renewed); give this one another "
                "SENDSCRIPT_MASTER_ID")

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.heartbeat_interval_s, "identity claim", self.renew)

    async def renew(self) -> None:
        if not await self._try():
            # Our claim lapsed (a stall longer than the TTL) and another process took
            # the id: two masters must not go on under it, so this one stops.
            self.on_lost(f"master_id {self.settings.master_id!r} claimed by another process")

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])
