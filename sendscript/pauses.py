"""Pause flags in Redis: set, clear and list them (CLI, SDK, master), and what they cover.

A pause is one field of the hash `{prefix}:pauses`: its scope -> JSON
`{"reason", "by", "at"}`. Scopes:

- `global` — every task; lifted by a plain resume.
- `queue:<name>`, `group:<name>`, `device:<id>` — the tasks of a queue, of the
  devices of a group, of one device.
- `hard` — the hard stop (the drop-rate ladder sets it): holds every task and only
  an explicit `resume --hard` lifts it, never a plain resume.
- `quota` — central-control's quota is exhausted: holds every task but one probe now
  and then (the master's gate); the probe's success lifts it.

Every change is published on `{prefix}:events:pauses` in the same step (Lua), so
masters apply it at once; they also reload the hash now and then, for messages
lost to a reconnect. The pure part, `PauseView.match`, says which pause (if any)
holds a task: O(1) per task.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio

from sendscript.groups import check_name
from sendscript.keys import Keys
from sendscript.models import utcnow

GLOBAL = "global"
HARD = "hard"
QUOTA = "quota"
KINDS = ("queue", "group", "device")
# Which pause a task is said to wait on when several cover it: the hard stop first.
ORDER = (HARD, GLOBAL, QUOTA, "queue", "group", "device")

# KEYS[1] the pauses hash; ARGV[1] the channel, ARGV[2] the scope, ARGV[3] the new
# value (JSON), or "" to clear the scope.
# Sets or clears the field and, if that changed anything, publishes
# `{"scope", "active"}` on the channel in the same step (a master that sees the
# message reads the hash after it changed). Returns the previous value, or false.
CHANGE = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[3] == '' then
  if not old then return false end
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('PUBLISH', ARGV[1], cjson.encode({scope = ARGV[2], active = false}))
else
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PUBLISH', ARGV[1], cjson.encode({scope = ARGV[2], active = true}))
end
return old
"""


@dataclass(frozen=True)
class Pause:
    scope: str
    reason: str = ""
    by: str = ""
    at: str = ""  # ISO-8601, when it was set

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "by": self.by, "at": self.at})

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_raw(cls, scope: str, raw: bytes | str | None) -> Pause:
        """A stored field; one that is not our JSON still pauses (its reason says so)."""
        try:
            doc = json.loads(raw or "{}")
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return cls(scope, str(doc.get("reason", "")), str(doc.get("by", "")),
                       str(doc.get("at", "")))
        except ValueError:
            return cls(scope, f"unreadable flag {str(raw)[:100]!r}")


# -- scopes ---------------------------------------------------------------------------


def scope_of(queue: str | None = None, group: str | None = None, device: str | None = None,
             *, hard: bool = False, quota: bool = False) -> str:
    """The scope named by at most one of the options; none names `global`."""
    named = [(k, v) for k, v in (("queue", queue), ("group", group), ("device", device))
             if v is not None]
    flags = [f for f, on in ((HARD, hard), (QUOTA, quota)) if on]
    if len(named) + len(flags) > 1:
        raise ValueError("name at most one of queue, group, device, hard, quota")
    if flags:
        return flags[0]
    if not named:
        return GLOBAL
    kind, name = named[0]
    name = name.strip()
    if kind == "group":
        check_name(name)
    elif not name or len(name) > 200:
        raise ValueError(f"invalid {kind} name {name!r}")
    return f"{kind}:{name}"


def split(scope: str) -> tuple[str, str]:
    """(`queue`, name) for `queue:name`; (scope, "") for global, hard, quota."""
    kind, sep, name = scope.partition(":")
    return (kind, name) if sep else (scope, "")


def rank(scope: str) -> int:
    kind, _ = split(scope)
    return ORDER.index(kind) if kind in ORDER else len(ORDER)


def by_default() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


# -- what pauses cover (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class PauseView:
    """Active pauses as a master sees them, with the members of the paused groups.

    `match` answers, per task, the scope that holds it (first in ORDER), or None:
    a few dict lookups whatever the number of pauses or group members."""

    pauses: Mapping[str, Pause]
    queues: frozenset[str]
    devices: frozenset[str]
    group_of: Mapping[str, str]  # device -> a paused group it belongs to
    everything: str | None  # hard or global, whichever holds all tasks
    quota: bool

    @classmethod
    def build(cls, pauses: Mapping[str, Pause],
              members: Mapping[str, Iterable[str]] | None = None) -> PauseView:
        """From the pauses and, per paused group, its devices (unknown groups: none)."""
        queues, devices, groups = set(), set(), []
        for scope in pauses:
            kind, name = split(scope)
            if kind == "queue":
                queues.add(name)
            elif kind == "device":
                devices.add(name)
            elif kind == "group":
                groups.append(name)
        group_of: dict[str, str] = {}
        for group in sorted(groups):
            for device in (members or {}).get(group, ()):
                group_of.setdefault(device, group)
        everything = next((s for s in (HARD, GLOBAL) if s in pauses), None)
        return cls(dict(pauses), frozenset(queues), frozenset(devices), group_of, everything,
                   QUOTA in pauses)

    @classmethod
    def empty(cls) -> PauseView:
        return cls.build({})

    @property
    def groups(self) -> list[str]:
        return sorted(name for kind, name in map(split, self.pauses) if kind == "group")

    def match(self, queue: str, device_id: str) -> str | None:
        if self.everything is not None:
            return self.everything
        if self.quota:
            return QUOTA
        if queue in self.queues:
            return f"queue:{queue}"
        group = self.group_of.get(device_id)
        if group is not None:
            return f"group:{group}"
        if device_id in self.devices:
            return f"device:{device_id}"
        return None


# -- Redis: set, clear, list (sync for CLI and SDK, async for the master) ----------------


def _change(client: redis.Redis | redis.asyncio.Redis, keys: Keys, scope: str,
            value: str) -> Any:
    return client.eval(CHANGE, 1, keys.pauses, keys.pauses_channel, scope, value)


def _new(scope: str, reason: str, by: str | None) -> Pause:
    return Pause(scope, reason, by or by_default(), utcnow().isoformat())


def _old(scope: str, raw: bytes | None) -> Pause | None:
    return Pause.from_raw(scope, raw) if raw else None


def _listed(raw: Mapping[bytes, bytes]) -> dict[str, Pause]:
    pauses = [Pause.from_raw(k.decode(), v) for k, v in raw.items()]
    return {p.scope: p for p in sorted(pauses, key=lambda p: (rank(p.scope), p.scope))}


def pause_sync(client: redis.Redis, keys: Keys, scope: str, reason: str = "",
               by: str | None = None) -> Pause:
    """Set (or re-set, with a new reason) a pause; every master obeys it within 1 s."""
    pause = _new(scope, reason, by)
    _change(client, keys, scope, pause.to_json())
    return pause


def resume_sync(client: redis.Redis, keys: Keys, scope: str) -> Pause | None:
    """Lift one pause (exactly this scope: `global` never lifts `hard`). The pause
    lifted, or None if it was not set."""
    return _old(scope, _change(client, keys, scope, ""))


def list_sync(client: redis.Redis, keys: Keys) -> dict[str, Pause]:
    return _listed(client.hgetall(keys.pauses))


async def pause(client: redis.asyncio.Redis, keys: Keys, scope: str, reason: str = "",
                by: str | None = None) -> Pause:
    new = _new(scope, reason, by)
    await _change(client, keys, scope, new.to_json())
    return new


async def resume(client: redis.asyncio.Redis, keys: Keys, scope: str) -> Pause | None:
    return _old(scope, await _change(client, keys, scope, ""))


async def load(client: redis.asyncio.Redis, keys: Keys) -> dict[str, Pause]:
    raw: Awaitable[dict[bytes, bytes]] = client.hgetall(keys.pauses)  # type: ignore[assignment]
    return _listed(await raw)


# The protections' entry points: the drop-rate ladder sets the hard stop, the quota
# signal sets the quota pause; the quota probe (master/pauses.py) lifts it.


async def set_hard_stop(client: redis.asyncio.Redis, keys: Keys, reason: str,
                        by: str = "drop-rate") -> Pause:
    return await pause(client, keys, HARD, reason, by)


def set_hard_stop_sync(client: redis.Redis, keys: Keys, reason: str,
                       by: str = "drop-rate") -> Pause:
    return pause_sync(client, keys, HARD, reason, by)


async def set_quota(client: redis.asyncio.Redis, keys: Keys, reason: str,
                    by: str = "central-control") -> Pause:
    return await pause(client, keys, QUOTA, reason, by)


def set_quota_sync(client: redis.Redis, keys: Keys, reason: str,
                   by: str = "central-control") -> Pause:
    return pause_sync(client, keys, QUOTA, reason, by)


async def clear_quota(client: redis.asyncio.Redis, keys: Keys) -> Pause | None:
    return await resume(client, keys, QUOTA)


def clear_quota_sync(client: redis.Redis, keys: Keys) -> Pause | None:
    return resume_sync(client, keys, QUOTA)
