"""Writes that must survive a Redis failover: `WAIT` for replicas after them.

Redis replicates asynchronously: a write the master acknowledged and died before
passing on is gone once Sentinel promotes a replica. With
SENDSCRIPT_REDIS_MIN_REPLICAS set, the writes that decide who runs a task (a device
lock) and that carry a task (an intake push) are followed by `WAIT n timeout` in the
same pipeline: one round trip, on the connection that wrote (WAIT counts the writes
of its own connection, so it cannot be sent on another one).

`WAIT` answers how many replicas acknowledged; fewer than asked is `NotReplicated`:
the write happened on the master, and it may or may not survive a failover. Callers
decide: a lock is released and its task held (nothing sent), a producer is told.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sendscript.settings import Settings


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """`WAIT replicas timeout_ms` after a write."""

    replicas: int
    timeout_ms: int

    @classmethod
    def of(cls, settings: Settings) -> ReplicaWait | None:
        """The settings' wait, or None where SENDSCRIPT_REDIS_MIN_REPLICAS is 0 (off)."""
        if settings.redis_min_replicas <= 0:
            return None
        return cls(settings.redis_min_replicas, settings.redis_wait_timeout_ms)

    def check(self, acked: Any, what: str) -> None:
        """Raise NotReplicated unless `acked` (WAIT's answer) reaches `replicas`."""
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.replicas:
            raise NotReplicated(what, int(acked), self)


class NotReplicated(RuntimeError):
    """A write the master accepted but fewer replicas than asked confirmed in time."""

    def __init__(self, what: str, acked: int, wait: ReplicaWait) -> None:
        super().__init__(
            f"{what}: written on the Redis master but confirmed by {acked} of the "
            f"{wait.replicas} replica(s) SENDSCRIPT_REDIS_MIN_REPLICAS asks for within "
            f"{wait.timeout_ms} ms: it may be lost if the master fails now")
        self.what = what
        self.acked = acked
        self.wait = wait
        self.task_ids: list[str] = []  # the stored tasks a producer's push carried

    def __str__(self) -> str:
        text = super().__str__()
        if self.task_ids:
            shown = ", ".join(self.task_ids[:5]) + (" ..." if len(self.task_ids) > 5 else "")
            text += (f"; task(s) {shown} are stored: do not submit them again, the "
                     "masters' orphan sweep pushes a stored task whose push was lost")
        return text


def push(client: Any, key: str, items: Sequence[str | bytes], wait: ReplicaWait | None,
         *, what: str, head: bool = False) -> Any:
    """LPUSH (RPUSH with head=True: the taking end) `items` onto `key`, then WAIT when
    asked to. Sync client: pushes and returns the list's length. Async client: returns
    the awaitable. Raises (or the awaitable raises) NotReplicated."""
    if not items:
        return None
    if wait is None:
        return client.rpush(key, *items) if head else client.lpush(key, *items)
    pipe = client.pipeline(transaction=False)
    (pipe.rpush if head else pipe.lpush)(key, *items)
    pipe.wait(wait.replicas, wait.timeout_ms)
    replies = pipe.execute(raise_on_error=False)
    if inspect.isawaitable(replies):
        return _checked(replies, wait, what)
    return _length(replies, wait, what)


async def _checked(replies: Any, wait: ReplicaWait, what: str) -> int:
    return _length(await replies, wait, what)


def _length(replies: list[Any], wait: ReplicaWait, what: str) -> int:
    length, acked = replies
    if isinstance(length, Exception):
        raise length
    wait.check(acked, what)
    return int(length)
