"""Which workers are hung (gunicorn's worker timeout). Pure logic.

A worker is hung when its event loop cannot run (its pipe heartbeat, sent every
`heartbeat_interval_s` from that loop, has been silent too long) or when a task
has been in its hands longer than any legitimate run of the handler can take (a
send that never returns: a central-control that trickles its answer defeats the
read timeout, which bounds each read, not the exchange). The pool kills a hung
worker and recovers its tasks as a dead worker's.

The task limit is derived from the timeouts of the handler's steps, so that a
slow but healthy worker is never killed: every call is assumed to end within its
configured timeout, and a group-committed step may wait for the batch ahead of
it (twice the call's timeout).
"""

from __future__ import annotations

from dataclasses import dataclass

from sendscript.ipc import heartbeat_interval_s
from sendscript.settings import Settings

BOOT_S = 60.0  # a worker that has not said it is online may be importing on a busy host


@dataclass(frozen=True)
class Limits:
    silence_s: float  # heartbeat silence of an online worker
    boot_s: float  # silence before it is online
    task_s: float  # one task in the worker's hands
    check_s: float  # how often the pool looks
    # Silent this long (a few missed beats), a worker gets no new tasks until it
    # speaks again: nobody may be reading its pipe, and a master writing a large
    # task into a full pipe would block its whole loop.
    quiet_s: float


def handle_budget_s(s: Settings) -> float:
    """The longest a legitimate `ScriptHandler.handle` can take with these timeouts.

    lock (Redis) -> claim (Mongo) -> record (Mongo) -> send (connect + answer) ->
    the longest ending: mark sent (two Mongo writes), a refusal recorded (two Mongo
    writes and a lock release), or an unsent attempt undone (the same)."""
    redis, mongo = 2 * s.redis_timeout_s, 2 * s.mongo_timeout_s  # coalesced: a batch ahead
    send = s.central_connect_timeout_s + s.central_timeout_s
    before = redis + mongo + mongo
    after = 2 * mongo + redis
    return before + send + after


def limits(s: Settings) -> Limits:
    """The limits these settings give; ValueError if a configured one is too short."""
    budget = handle_budget_s(s)
    if s.worker_task_timeout_s and s.worker_task_timeout_s <= budget:
        raise ValueError(
            f"SENDSCRIPT_WORKER_TASK_TIMEOUT_S={s.worker_task_timeout_s:g} would kill healthy "
            f"workers: a task may legitimately take up to {budget:g}s with the configured "
            "central-control, Mongo and Redis timeouts (set it higher, or 0 to derive it)")
    return Limits(
        silence_s=s.worker_timeout_s,
        boot_s=max(s.worker_timeout_s, BOOT_S),
        task_s=s.worker_task_timeout_s or budget,
        check_s=min(1.0, s.worker_timeout_s / 4),
        quiet_s=3 * heartbeat_interval_s(s.worker_timeout_s),
    )


def responsive(now: float, last_seen: float, limits: Limits) -> bool:
    """Whether a worker has spoken recently enough to be handed tasks."""
    return now - last_seen <= limits.quiet_s


def hung_reason(
    now: float, *, online: bool, last_seen: float, oldest_task: tuple[str, float] | None,
    limits: Limits,
) -> str | None:
    """Why a worker counts as hung, or None. Times are monotonic seconds;
    `oldest_task` is (task id, when it was handed over)."""
    silent = now - last_seen
    limit = limits.silence_s if online else limits.boot_s
    if silent > limit:
        state = "" if online else " before coming online"
        return f"no heartbeat for {silent:.1f}s{state} (limit {limit:g}s): its loop is blocked"
    if oldest_task is not None:
        task_id, since = oldest_task
        held = now - since
        if held > limits.task_s:
            return (f"task {task_id} in its hands for {held:.1f}s (limit {limits.task_s:g}s): "
                    "a step that never returns")
    return None
