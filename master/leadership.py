"""The leader lease, fenced: one master at a time runs the singleton duties.

The lease is the Redis key `{prefix}:leader`, holding `{holder}#{token}`. The token
is a fencing number: `INCR {prefix}:leader:token` at every acquisition (never at a
renewal), so each term of leadership has its own, higher than every earlier one.

Two guards keep an old leader (paused past its lease, or cut off from Redis) from
acting while another leads:

- **A local deadline** (`LeaseDeadline`, pure): a renewal counts only if it
  answered before the deadline it extends, and the new deadline is counted from
  when the renewal *started*, by the monotonic clock, less a margin
  (`MARGIN_SHARE` of the lease): `started + lease - margin`. Redis started the
  key's TTL after we sent the request, so our deadline falls before the key can
  lapse there, by at least the margin (clock rates apart by less than that).
  `is_leading()` is False from the deadline on, whatever Redis would say: the
  duties read it before each step and stop. A process paused past its deadline
  wakes with `is_leading()` False (the monotonic clock ran on while it was
  stopped), before any timer of its own fires a duty.
- **A fence where the duties write** (`LeaderLease.guard` and `FENCED_PUSH`):
  every destructive write of a duty (retention deletes, orphan requeues, result
  timeouts, the recovery of a dead master's work, orphaned-lock releases, the
  counts' rebuild) is preceded by `guard()`: the local deadline must not have
  passed, and a Redis read must find the lease key still holding our token.
  Pushes to the ready list are fenced atomically instead: one Lua script checks
  the key and pushes. What that promises, precisely:

  * A Redis push by a duty happens only while the lease key holds our token (the
    check and the push are one script).
  * A Mongo write (or a lock release) is sent only after, at most one await
    earlier, Redis said our token still held and our deadline had not passed.
    A process paused *between* that check and the write's send would send that
    one write late: check-then-write cannot close that gap (only a transaction
    over a fence document could, which the embedded server does not offer). That
    write is a compare-and-set naming the state it expects (status and attempt,
    or still due for retention), so it acts on nothing another master has moved
    meanwhile; and the next write finds the fence closed.

  A refused write raises `NotLeading`, counted (`fenced_refusals`) and logged
  ("fenced write refused"); the duty stops there and the master steps down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio
from loguru import logger

from sendscript.backoff import stopped_within
from sendscript.settings import Settings

# Of the lease, the part by which our local deadline falls before Redis's TTL.
MARGIN_SHARE = 0.25
# Renewals per (lease - margin): a lost round trip or two still leaves one in time.
RENEWALS_PER_TERM = 3

# KEYS[1] the lease key, KEYS[2] the token counter.
# ARGV[1] holder id, ARGV[2] lease ms, ARGV[3] the value we hold ('' if none).
# Renew if the key holds our value; take it with a new token if it is free.
# Answers the value held after the call, or false when another holds it.
HOLD = """
local value = redis.call('GET', KEYS[1])
if value and value == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return value
end
if not value then
  local token = redis.call('INCR', KEYS[2])
  value = ARGV[1] .. '#' .. token
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return value
end
return false
"""
# KEYS[1] the lease key; ARGV[1] our value. Deletes it only if still ours.
LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the lease key, KEYS[2] a list; ARGV[1] our value, ARGV[2..] items.
# LPUSH the items only while the lease holds our value; -1 when it does not.
FENCED_PUSH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('LPUSH', KEYS[2], unpack(ARGV, 2))
"""


class Fence(Protocol):
    """What a leader's duty checks where it writes (`LeaderLease` is one)."""

    async def guard(self, what: str) -> None: ...

    async def push(self, what: str, key: str, items: list[str]) -> int: ...


class NotLeading(RuntimeError):
    """A duty's write refused: this master no longer holds the lease it started with."""


def token_of(value: str | None) -> int | None:
    """The fencing token in a lease value `{holder}#{token}`."""
    if not value or "#" not in value:
        return None
    try:
        return int(value.rsplit("#", 1)[1])
    except ValueError:
        return None


@dataclass
class LeaseDeadline:
    """Whether we lead now, by our own monotonic clock (pure: the caller passes times)."""

    lease_s: float
    margin_s: float
    deadline: float | None = None
    value: str | None = None  # `{holder}#{token}` of the term we hold

    def renewed(self, started: float, answered: float, value: str | None) -> bool:
        """A hold that started at `started` answered `value` (None: held by another)
        at `answered`. True if we lead after it."""
        late = self.deadline is not None and answered > self.deadline
        new_deadline = started + self.lease_s - self.margin_s
        if value is None or late or answered >= new_deadline:
            self.deadline = None
            # A late renewal of our own value keeps the value: the key still holds
            # it, so the next renewal on time resumes the same term.
            self.value = value if value is not None and value == self.value else None
            return False
        self.deadline = new_deadline
        self.value = value
        return True

    def leading(self, now: float) -> bool:
        return self.deadline is not None and now < self.deadline

    def remaining(self, now: float) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - now)

    def lost(self) -> None:
        self.deadline = None
        self.value = None


class LeaderLease:
    def __init__(self, client: redis.asyncio.Redis, key: str, holder: str,
                 lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.token_key = f"{key}:token"
        self.holder = holder
        self.lease_ms = int(lease_s * 1000)
        self.term = LeaseDeadline(lease_s, lease_s * MARGIN_SHARE)
        self.clock = clock
        self.redis = client
        self._hold = client.register_script(HOLD)
        self._let_go = client.register_script(LET_GO)
        self._push = client.register_script(FENCED_PUSH)
        self._was_leading = False
        self.fenced_refusals = 0
        self.stepped_down = 0

    @property
    def leading(self) -> bool:
        return self.is_leading()

    @property
    def token(self) -> int | None:
        return token_of(self.term.value) if self.is_leading() else None

    def is_leading(self) -> bool:
        """The read-only view other parts are handed: is this master the leader now
        (by its local deadline)?"""
        leading = self.term.leading(self.clock())
        if self._was_leading and not leading:
            self._note(False, "its local deadline passed")
        return leading

    def _note(self, leading: bool, why: str) -> None:
        if leading != self._was_leading:
            if leading:
                logger.info("took leadership of the singleton duties ({}, token {})",
                            self.holder, token_of(self.term.value))
            else:
                self.stepped_down += 1
                logger.warning("stepped down from leadership ({}): {}", self.holder, why)
        self._was_leading = leading

    async def hold(self) -> bool:
        """Renew the lease, or take it if free; True if we lead after the call."""
        started = self.clock()
        try:
            raw = await self._hold(keys=[self.key, self.token_key],
                                   args=[self.holder, self.lease_ms, self.term.value or ""])
        except Exception:
            # No answer: our deadline stands; it passes on its own if this goes on.
            self._note(self.term.leading(self.clock()), "renewal failed")
            raise
        value = raw.decode() if isinstance(raw, bytes) else (raw or None)
        held = self.term.renewed(started, self.clock(), value)
        why = ("another master holds the lease" if value is None
               else "a renewal answered after the local deadline")
        self._note(held, why)
        return held

    async def run(self, stop: asyncio.Event) -> None:
        """Renew every (lease - margin) / RENEWALS_PER_TERM; let go when stopping."""
        interval = (self.term.lease_s - self.term.margin_s) / RENEWALS_PER_TERM
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.hold(), timeout=interval)
            except Exception as exc:
                logger.debug("leader lease not renewed: {!r}", exc)
            if await stopped_within(stop, interval):
                break
        try:
            await self.let_go()
        except Exception as exc:
            logger.debug("leader lease not released: {!r}", exc)

    async def let_go(self) -> None:
        value = self.term.value
        if value is not None:
            self.term.lost()
            self._note(False, "stopping")
            await self._let_go(keys=[self.key], args=[value])

    # -- the fence ------------------------------------------------------------------------
    async def guard(self, what: str) -> None:
        """Right before a duty's write: raise NotLeading unless our deadline has not
        passed and the lease key still holds our token."""
        value = self.term.value
        if value is None or not self.is_leading():
            self._refuse(what, "the local deadline passed")
        current = await self.redis.get(self.key)
        if current is None or current.decode() != value or not self.is_leading():
            self.term.lost()
            self._refuse(what, f"the lease holds {current!r}, not our {value!r}")

    async def push(self, what: str, key: str, items: list[str]) -> int:
        """LPUSH `items` to `key` only while the lease holds our token (one script)."""
        value = self.term.value
        if value is None or not self.is_leading():
            self._refuse(what, "the local deadline passed")
        pushed = int(await self._push(keys=[self.key, key], args=[value, *items]))
        if pushed < 0:
            self.term.lost()
            self._refuse(what, "the lease no longer holds our token")
        return pushed

    def _refuse(self, what: str, why: str) -> None:
        self.fenced_refusals += 1
        logger.warning("fenced write refused ({}): {}", what, why)
        self._note(False, why)
        raise NotLeading(f"{what}: {why}")

    def report(self) -> dict[str, object]:
        return {"leader": self.is_leading(), "leader_token": self.token,
                "fenced_refusals": self.fenced_refusals, "stepped_down": self.stepped_down}


def leader_lease(settings: Settings, client: redis.asyncio.Redis) -> LeaderLease:
    return LeaderLease(client, f"{settings.keys.prefix}:leader", settings.master_id,
                       settings.leader_lease_s)
