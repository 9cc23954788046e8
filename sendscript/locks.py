"""Device locks in Redis: one fenced key per device, released only by its fence.

`{prefix}:lock:device:{id}` holds a value from `INCR {prefix}:lock:fence`. Only
the holder of that value can delete it (compare-and-delete in Lua), so a late or
repeated release can never free a device another attempt has since locked.

An acquire may name what the lock is for (the worker names its task and itself,
`lock_owner`): the hash
`{prefix}:lock:owners` then maps the device to "<fence> <owner>", set in the same
script as the lock, so recovery can tell whether a device is still locked by the
attempt of a task whose process died (`owners`) and release that lock at once. An
entry whose fence is not the lock's any more says nothing; the next acquire of the
device overwrites it, so the hash holds at most one entry per device.

Fences only ever increase, even across a Redis restart that lost its last
writes: the acquire script hands out no fence until the running Redis (its run
id) has adopted a fence epoch, and adopting one raises the counter to the
epoch's floor (see `sendscript.fencing`). `{prefix}:lock:epoch` is a hash of the
adopted `run_id` and `epoch`. In the steady state an acquire batch is one round
trip; after a restart, the first acquire of each process adopts an epoch (one
Mongo bump, two more Redis round trips).

With a `ReplicaWait` (SENDSCRIPT_REDIS_MIN_REPLICAS), each acquire is pipelined with
`WAIT` on its connection (still one round trip): a lock a Redis failover could lose
is never handed out. If fewer replicas confirm in time, the locks just taken are
released and `NotReplicated` is raised: their tasks are held, nothing is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio
from redis.exceptions import NoScriptError

from sendscript.fencing import fence_floor
from sendscript.keys import Keys
from sendscript.replicas import NotReplicated, ReplicaWait

# The run id of the server running the script: new on every Redis restart.
_RUN_ID = "string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"

# KEYS[1] fence counter, KEYS[2] epoch hash, KEYS[3] owners hash, KEYS[4..] lock
# keys; ARGV[1] the lowest epoch the caller accepts (1 with an epoch source, 0
# without), then per lock KEYS[i + 3]: ARGV[3i - 1] its TTL (ms), ARGV[3i] its
# device id, ARGV[3i + 1] its owner ("" for none).
# Returns, per lock, the new fence, or 0 where the device is already locked; or,
# when this Redis run has adopted no epoch (or only one below ARGV[1]) yet,
# {-1, run_id} and changes nothing. A lock taken for an owner sets the owners hash
# entry of its device to "<fence> <owner>".
ACQUIRE = f"""
local run_id = {_RUN_ID}
local adopted = redis.call('HMGET', KEYS[2], 'run_id', 'epoch')
if adopted[1] ~= run_id or (tonumber(adopted[2]) or -1) < tonumber(ARGV[1]) then
  return {{-1, run_id}}
end
local out = {{}}
for i = 1, #KEYS - 3 do
  if redis.call('EXISTS', KEYS[i + 3]) == 1 then
    out[i] = 0
  else
    local fence = redis.call('INCR', KEYS[1])
    redis.call('SET', KEYS[i + 3], fence, 'PX', ARGV[3 * i - 1])
    if ARGV[3 * i + 1] ~= '' then
      redis.call('HSET', KEYS[3], ARGV[3 * i], fence .. ' ' .. ARGV[3 * i + 1])
    end
    out[i] = fence
  end
end
return out
"""

# KEYS[1] epoch hash, KEYS[2] fence counter; ARGV[1] the run id the acquire saw,
# ARGV[2] the epoch taken since (0 without an epoch source), ARGV[3] its fence
# floor (decimal).
# Adopts the epoch for this run and raises the counter to the floor (never lowers
# it) in one step; within one run the hash keeps the highest epoch adopted, while
# an epoch adopted on an earlier run counts for nothing. Returns 1, or 0 and
# changes nothing if Redis has restarted since ARGV[1] was seen: the epoch was
# taken before this run began and may be below one adopted on a run in between,
# so the caller must take a new one.
ADOPT = f"""
local run_id = {_RUN_ID}
if run_id ~= ARGV[1] then
  return 0
end
local adopted = redis.call('HMGET', KEYS[1], 'run_id', 'epoch')
local epoch = tonumber(ARGV[2])
if adopted[1] == run_id and (tonumber(adopted[2]) or -1) > epoch then
  epoch = tonumber(adopted[2])
end
redis.call('HSET', KEYS[1], 'run_id', run_id, 'epoch', string.format('%d', epoch))
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
"""

# KEYS lock keys; ARGV[1] the device-free channel, then (fence, device_id) per key.
# Deletes each lock still holding its fence and announces every device whose lock
# is gone (released now, or already), so masters waiting on it dispatch at once.
# The fence goes into the event as the digits it came as: cjson would print a
# number with 14 significant digits, and epoch-sized fences have more.
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
    redis.call('PUBLISH', ARGV[1],
      '{"device_id":' .. cjson.encode(device) .. ',"fence":' .. fence .. '}')
  end
end
return released
"""

def lock_owner(task_id: str, worker: str) -> str:
    """The owner a worker names when it locks a device for a task: recovery releases a
    dead worker's lock only where the lock is still the one it took for that task."""
    return f"{task_id} {worker}"


def owner_entry(entry: bytes | str | None,
                fence: bytes | str | int | None) -> tuple[int, str] | None:
    """(fence, owner) from an owners-hash entry ("<fence> <owner>") written for the lock
    that now holds `fence`; None where the device is free, or the entry is another
    lock's or missing."""
    if entry is None or fence is None:
        return None
    text = entry.decode() if isinstance(entry, bytes) else entry
    held = fence.decode() if isinstance(fence, bytes) else str(fence)
    written, _, owner = text.partition(" ")
    return (int(written), owner) if written == held and owner else None


# (device_id, ttl_ms) or (device_id, ttl_ms, owner): one lock to take.
LockRequest = tuple[str, int] | tuple[str, int, str]

# Restarts in a row an acquire rides out before giving up (each costs a new epoch).
MAX_ADOPTIONS = 5


class EpochSource(Protocol):
    async def bump(self) -> int:
        """A new epoch, above every one given before (e.g. `fencing.MongoEpochs`)."""
        ...


class FenceEpochError(RuntimeError):
    """Redis kept restarting while an epoch was being adopted."""


def epoch_key(keys: Keys) -> str:
    """Hash `run_id`, `epoch`: the fence epoch this Redis run has adopted."""
    return f"{keys.prefix}:lock:epoch"


class DeviceLocks:
    """Acquire, release and read device locks.

    A process that acquires passes `epochs`, the durable epoch source. Without one,
    a restarted Redis is adopted at epoch 0, which does not raise the counter:
    fences are then only as durable as Redis, as they were before epochs. That is
    for release-only roles and tests; it is still safe beside processes that have
    a source, because they do not accept a run adopted at epoch 0 and adopt a real
    epoch over it (the counter only rises). Release and `holders` need no epochs.
    `replicas`: WAIT after each acquire (module docstring); None: no wait.
    """

    def __init__(self, client: redis.asyncio.Redis, keys: Keys,
                 epochs: EpochSource | None = None,
                 replicas: ReplicaWait | None = None) -> None:
        self._redis = client
        self._keys = keys
        self._epochs = epochs
        self._replicas = replicas
        self._acquire = client.register_script(ACQUIRE)
        self._adopt = client.register_script(ADOPT)
        self._release = client.register_script(RELEASE)
        self.adoptions = 0  # epochs this instance adopted (tests and logs read it)

    async def acquire_many(self, requests: Sequence[LockRequest]) -> list[int]:
        """(device_id, ttl_ms) or (device_id, ttl_ms, owner) each -> fence, or 0 where
        the device is locked. An owner is recorded with the fence (`owners`)."""
        if not requests:
            return []
        keys = ([self._keys.lock_fence, epoch_key(self._keys), self._keys.lock_owners]
                + [self._keys.device_lock(r[0]) for r in requests])
        args: list[int | str] = [1 if self._epochs is not None else 0]
        for request in requests:
            args += [int(request[1]), request[0], request[2] if len(request) > 2 else ""]
        for _ in range(MAX_ADOPTIONS + 1):
            fences, acked = await self._run_acquire(keys, args)
            if not (fences and int(fences[0]) == -1):
                return await self._replicated(requests, [int(f) for f in fences], acked)
            run_id = fences[1]
            await self._adopt_epoch(run_id.decode() if isinstance(run_id, bytes) else run_id)
        raise FenceEpochError(f"Redis restarted {MAX_ADOPTIONS} times during one acquire")

    async def _run_acquire(self, keys: list[str], args: list[int | str]
                           ) -> tuple[list, object]:
        """The script's answer, and WAIT's (None without a ReplicaWait)."""
        if self._replicas is None:
            return await self._acquire(keys=keys, args=args), None
        # EVALSHA and WAIT on one connection; a Script in a pipeline would first ask
        # SCRIPT EXISTS (a round trip more), so a missing script is loaded on demand.
        for _ in range(2):
            pipe = self._redis.pipeline(transaction=False)
            pipe.evalsha(self._acquire.sha, len(keys), *keys, *args)
            pipe.wait(self._replicas.replicas, self._replicas.timeout_ms)
            fences, acked = await pipe.execute(raise_on_error=False)
            if isinstance(fences, NoScriptError):
                await self._redis.script_load(ACQUIRE)
                continue
            if isinstance(fences, Exception):
                raise fences
            return fences, acked
        raise RuntimeError("acquire script missing right after SCRIPT LOAD")

    async def _replicated(self, requests: Sequence[LockRequest], fences: list[int],
                          acked: object) -> list[int]:
        """The fences, once enough replicas hold them; else released, NotReplicated."""
        if self._replicas is None or not any(fences):
            return fences
        try:
            self._replicas.check(acked, "device lock")
        except NotReplicated:
            taken = [(r[0], f) for r, f in zip(requests, fences, strict=True) if f]
            with contextlib.suppress(Exception):  # else their TTL or the orphan sweep
                await self.release_many(taken)
            raise
        return fences

    async def _adopt_epoch(self, run_id: str) -> None:
        # Taken after this run was seen: above every epoch adopted on an earlier run.
        epoch = await self._epochs.bump() if self._epochs is not None else 0
        adopted = await self._adopt(keys=[epoch_key(self._keys), self._keys.lock_fence],
                                    args=[run_id, epoch, fence_floor(epoch)])
        if int(adopted):
            self.adoptions += 1

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
            args += [int(fence), device]  # the script puts these digits into JSON as they are
        return int(await self._release(keys=keys, args=args))

    async def owners(self, devices: Sequence[str]) -> list[tuple[int, str] | None]:
        """(fence, owner) of the lock now held on each device, where it was taken for
        an owner; None where the device is free or its lock was taken for none."""
        if not devices:
            return []
        # Two calls, not one pipeline: a cluster client refuses MGET in a pipeline. The
        # two were never atomic; only a lock whose fence matches its owner entry counts.
        values = await self._redis.mget([self._keys.device_lock(d) for d in devices])
        owners = await self._redis.hmget(self._keys.lock_owners, list(devices))
        return [owner_entry(owner, value) for value, owner in zip(values, owners, strict=True)]

    async def holders(self, devices: Sequence[str]) -> list[int | None]:
        """The fence now locking each device, or None where it is free."""
        if not devices:
            return []
        values = await self._redis.mget([self._keys.device_lock(d) for d in devices])
        return [int(v) if v is not None else None for v in values]
