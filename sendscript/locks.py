"""Device locks in Redis: one fenced key per device, released only by its fence.

`{prefix}:lock:device:{id}` holds a value from `INCR {prefix}:lock:fence`. Only
the holder of that value can delete it (compare-and-delete in Lua), so a late or
repeated release can never free a device another attempt has since locked.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio

from sendscript.keys import Keys

# KEYS[1] fence counter, KEYS[2..] lock keys; ARGV[i] the TTL (ms) of lock i.
# Returns, per lock, the new fence, or 0 where the device is already locked.
ACQUIRE = """
local out = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[i - 1] = 0
  else
    local fence = redis.call('INCR', KEYS[1])
    redis.call('SET', KEYS[i], fence, 'PX', ARGV[i - 1])
    out[i - 1] = fence
  end
end
return out
"""

# KEYS lock keys; ARGV[1] the device-free channel, then (fence, device_id) per key.
# Deletes each lock still holding its fence and announces every device whose lock
# is gone (released now, or already), so masters waiting on it dispatch at once.
RELEASE = """
local released = 0
for i = 1, #KEYS do
  local fence = ARGV[2 * i]
  local device = ARGV[2 * i + 1]
  local value = redis.call('GET', KEYS[i])
  if value == fence then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
  if value == fence or not value then
    redis.call('PUBLISH', ARGV[1], cjson.encode({device_id = device, fence = tonumber(fence)}))
  end
end
return released
"""


class DeviceLocks:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)

    async def acquire_many(self, requests: Sequence[tuple[str, int]]) -> list[int]:
        """(device_id, ttl_ms) each -> fence, or 0 where the device is locked."""
        if not requests:
            return []
        keys = [self._keys.lock_fence] + [self._keys.device_lock(d) for d, _ in requests]
        fences = await self._acquire(keys=keys, args=[int(ttl) for _, ttl in requests])
        return [int(f) for f in fences]

    async def release_many(self, releases: Sequence[tuple[str, int]]) -> int:
        """(device_id, fence) each; keep one release per device, the newest fence."""
        newest: dict[str, int] = {}
        for device, fence in releases:
            if fence and fence > newest.get(device, 0):
                newest[device] = fence
        if not newest:
            return 0
        keys = [self._keys.device_lock(d) for d in newest]
        args: list[str | int] = [self._keys.device_free_channel]
        for device, fence in newest.items():
            args += [fence, device]
        return int(await self._release(keys=keys, args=args))

    async def holders(self, devices: Sequence[str]) -> list[int | None]:
        """The fence now locking each device, or None where it is free."""
        if not devices:
            return []
        values = await self._redis.mget([self._keys.device_lock(d) for d in devices])
        return [int(v) if v is not None else None for v in values]
