"""One task, from device lock to central-control, as a worker runs it.

lock device (fence) -> CAS pending->running, attempt+1 -> insert exec record ->
POST central-control -> CAS running->sent. A POST that provably never left
(central-control unreachable) undoes the attempt instead: the record goes, the
task is pending again with its attempt counter as before, the lock is released.
An answer that says central-control's quota is exhausted is undone the same way
(outcome `quota`), and so is a 429 while an adaptive rate limit is set (outcome
`throttled`: the limit lowers and holds for the answer's Retry-After; a held task
uses no attempt). A task whose deadline (`TaskHandle.deadline`: its expire_at or
its queue's max_wait) has passed is not sent: checked before the lock and again
right before the POST; past it, the task becomes `expired` (a claimed one loses
its record and gets its attempt counter back: nothing was sent) and the answer is
`expired`.
Each Mongo and Redis step is coalesced across the tasks the worker holds at once
(group commit), so a busy worker pays one round trip per step per batch, not per
task.

Every Mongo step here may run twice with the effect of once (a compare-and-set, a
claim read back by its token, a record inserted under its minted id), so through a
Mongo failover each is retried in place (sendscript/failover.py) for up to
SENDSCRIPT_MONGO_FAILOVER_S: the task keeps its lock and its attempt, and nothing is
sent before the claim and the record are known to be stored.

What a worker leaves behind tells how far it got, so that the master recovers a
dead worker's task at once when it provably was not sent:
- the fence it took is said to the master (`on_locked`, a `TaskLocked` on the
  pipe) before the claim;
- the exec record is the pre-send marker: it is inserted last before the POST,
  with nothing in between but local checks. No record for the claimed attempt
  (`task.record_id`) means no POST left; a record means one may have.

The leader's sweeps take for a dead worker's leftovers a lock that no open record
holds for `orphan_lock_grace_s` (released) and a task running without its record
for `running_stuck_s` (pending again). A live worker slower than that between its
lock and its record (a Mongo failover ridden out in place, a starved CPU) may have
lost both (or its lock's TTL may have run out), and another worker may hold the
device: so a worker that reaches the POST later than `send_window_s` (half the
shortest of the lock margin and those graces) after asking for the lock does not
send; the attempt is undone (pending, attempt counter as before, outcome `error`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis.asyncio
from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from sendscript import tracing
from sendscript.backoff import OutageLog
from sendscript.failover import ride_out
from sendscript.fencing import MongoEpochs
from sendscript.ipc import TaskDone, TaskHandle
from sendscript.locks import DeviceLocks, lock_owner
from sendscript.models import ExecRecord, utcnow
from sendscript.replicas import ReplicaWait
from sendscript.retry import decide, failure_cas
from sendscript.settings import Settings
from sendscript.status import RecordStatus, TaskStatus, record_sent, task_cas
from sendscript.store import Claim, RecordStore, TaskStore
from worker.batching import Coalescer, Lane
from worker.central import THROTTLED, CentralClient, CentralError

# Test-only crash points, for the recovery tests: the variable names a file holding
# "<point> <device_id>" (points: CRASH_POINTS). The first worker to reach that point
# with a task for that device removes the file and SIGKILLs itself there. A file
# "<that path>.hold-<point>-<device_id>" parks the first worker to reach that point
# with a task for that device instead: it renames the file to "<name>.held" and waits
# there (its loop still running) until the file is removed, or it is killed with its
# master's process group. Unset in production; nothing reads the files then.
CRASH_POINT_ENV = "SENDSCRIPT_TEST_CRASH_POINT"
CRASH_POINTS = ("before-record", "before-send", "after-send")


SEND_WINDOW_SHARE = 0.5  # of the shortest of the margin and the sweeps' graces


def send_window_s(settings: Settings) -> float:
    """How long after asking for its lock a worker may still send: half the shortest
    of the lock's margin (its TTL is the task's timeout plus that margin) and the
    sweeps' graces (the orphaned-lock one frees a lock no record holds, the
    stuck-running one takes back a task running without its record). The other half
    is for the two processes' clocks and the POST's own way. A grace of 0 (that
    sweep never waits) leaves the others to bound it."""
    bounds = [b for b in (settings.lock_margin_s, settings.orphan_lock_grace_s,
                          settings.running_stuck_s) if b > 0]
    return SEND_WINDOW_SHARE * min(bounds)


async def crash_point(point: str, device_id: str) -> None:
    parked = _reach(point, device_id)
    # Polled, not awaited on an event: the test that removes the file is another process.
    while parked is not None and _exists(parked):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _reach(point: str, device_id: str) -> str | None:
    """SIGKILL here if the crash file names this point and device; the file to wait
    on if a hold file does; else None."""
    path = os.environ.get(CRASH_POINT_ENV)
    if not path:
        return None
    hold = f"{path}.hold-{point}-{device_id}"
    try:
        os.rename(hold, f"{hold}.held")  # one worker parks: whoever renames it first
        return f"{hold}.held"
    except OSError:
        pass
    try:
        with open(path) as f:
            wanted = f.read().split()
        if wanted != [point, device_id]:
            return None
        os.unlink(path)  # one crash: whoever removes it first
    except OSError:
        return None
    os.kill(os.getpid(), signal.SIGKILL)
    return None


class ScriptHandler:
    def __init__(
        self,
        *,
        redis_client: redis.asyncio.Redis,
        db: AsyncDatabase,
        central: CentralClient,
        settings: Settings,
        worker_name: str,
        on_locked: Callable[[str, int], None] | None = None,
    ) -> None:
        keys = settings.keys
        self.on_locked = on_locked  # tells the master the fence taken (task id, fence)
        self.settings = settings
        self.worker_name = worker_name
        self.lock_margin_s = settings.lock_margin_s
        self.central = central
        self.tasks = TaskStore(db)
        self.records = RecordStore(db)
        self.failover_s = settings.mongo_failover_s
        # Fences from an epoch kept in Mongo: they keep rising across Redis data loss.
        # With min replicas, a lock not confirmed by them is released and the acquire
        # raises: the task is answered `error` (held, no attempt used) below.
        locks = DeviceLocks(redis_client, keys, MongoEpochs(db, settings.key_prefix),
                            ReplicaWait.of(settings))
        self._acquire = Coalescer(locks.acquire_many)
        self._release = Coalescer(self._release_batch)
        self._locks = locks
        # One Mongo statement of this worker at a time (worker/batching.py: Lane).
        mongo = Lane()
        self._claim = Coalescer(self._claim_batch, lane=mongo)
        self._insert = Coalescer(self._insert_batch, lane=mongo)
        self._mark_sent = Coalescer(self._mark_sent_batch, lane=mongo)
        # Best-effort writes after a step that counts: their failures say "down" once.
        self.writes = OutageLog("worker: bookkeeping writes")
        self.adaptive = any(v.partition("~")[1] for v in settings.rate_limits.values())
        self.send_window_s = send_window_s(settings)

    async def handle(self, h: TaskHandle) -> TaskDone:
        if not tracing.ON or not h.trace:
            return await self._handle(h, None)
        # One span an attempt, child of the task's context: the POST carries it to
        # central-control and the exec record keeps it for the result's span.
        span = tracing.start("sendscript.send", h.trace, {
            "sendscript.task_id": h.task_id, "sendscript.device_id": h.device_id,
            "sendscript.attempt": h.attempt + 1, "sendscript.queue": h.queue,
            "sendscript.worker": self.worker_name})
        try:
            done = await self._handle(h, tracing.carrier(span))
        except BaseException as exc:
            tracing.end(span, error=repr(exc))
            raise
        tracing.end(span, {"sendscript.outcome": done.outcome,
                           "http.response.status_code": done.status,
                           "sendscript.send_s": done.send_s},
                    error=done.error if done.outcome in ("failed", "error") else None)
        return done

    async def _handle(self, h: TaskHandle, trace: dict[str, str] | None) -> TaskDone:
        if h.attempt > h.max_retries:
            return await self._exhausted(h)
        if self._past_deadline(h):
            return await self._expire_pending(h)
        asked = time.monotonic()  # the lock's TTL runs from no earlier than this
        try:
            # Named as the lock's owner: recovery then knows whose lock it is.
            fence = await self._acquire((h.device_id, self._lock_ttl_ms(h),
                                         lock_owner(h.task_id, self.worker_name)))
        except Exception as exc:
            return self._done(h, "error", error=f"lock: {exc!r}")
        if not fence:
            return self._done(h, "busy")
        if self.on_locked is not None:
            self.on_locked(h.task_id, fence)
        try:
            record_id = await self._claim(Claim(h.task_id, h.attempt, self.worker_name))
        except Exception as exc:
            await self._release_quietly(h.device_id, fence)
            return self._done(h, "error", error=f"claim: {exc!r}")
        if record_id is None:
            await self._release_quietly(h.device_id, fence)
            return self._done(h, "stale")
        attempt = h.attempt + 1
        await crash_point("before-record", h.device_id)
        started = utcnow()
        record = ExecRecord(
            _id=record_id, task_id=h.task_id, attempt=attempt, device_id=h.device_id,
            lock_value=fence, worker=self.worker_name, started_at=started,
            deadline=h.deadline, trace=trace,
        )
        try:
            stored = await self._insert(record)
        except Exception as exc:
            return await self._unclaim(h, fence, attempt, record_id, f"record: {exc!r}")
        if not stored:  # another record holds this attempt or our record's id: a
            # recovery that took the attempt as never sent (master/recovery.py)
            return await self._unclaim(h, fence, attempt, record_id,
                                       "record exists for this attempt")
        if self._past_deadline(h):  # the steps above may have taken a while
            return await self._undo(h, fence, attempt, record_id, TaskStatus.EXPIRED,
                                    self._expired_reason(h), "expired")
        await crash_point("before-send", h.device_id)
        if (held := time.monotonic() - asked) > self.send_window_s:
            reason = (f"not sent: {held:.1f}s since the device lock was asked for, past "
                      f"the {self.send_window_s:g}s within which its TTL and the sweeps "
                      "leave it alone")
            logger.warning("task {} on {}: {}", h.task_id, h.device_id, reason)
            return await self._undo(h, fence, attempt, record_id, TaskStatus.PENDING, reason,
                                    "error")
        posted = time.monotonic()
        try:
            await self.central.send_script(
                device_id=h.device_id, task_id=h.task_id, record_id=record_id, script=h.script,
                trace=trace,
            )
            await crash_point("after-send", h.device_id)
        except CentralError as exc:
            seen = {"send_s": time.monotonic() - posted, "status": exc.status,
                    "retry_after_s": exc.retry_after_s}
            if self.adaptive and exc.status == THROTTLED:
                done = await self._undo(h, fence, attempt, record_id, TaskStatus.PENDING,
                                        str(exc), "throttled")
                # The limit answers a 429 here; it says nothing of central-control's health.
                return done.model_copy(update=seen)
            if self._is_quota(exc):
                logger.warning("task {}: central-control quota exhausted: {}", h.task_id, exc)
                return await self._undo(h, fence, attempt, record_id, TaskStatus.PENDING,
                                        str(exc), "quota")
            if exc.never_sent:
                return await self._unsent(h, fence, attempt, record_id, exc)
            if not exc.maybe_sent:
                return await self._send_failed(h, fence, attempt, record_id, exc)
            # The device may be running it: keep the lock and wait for its result,
            # as for a send that was accepted (the result timeout covers silence).
            logger.warning("task {}: {}; treated as sent, device {} stays locked",
                           h.task_id, exc, h.device_id)
            note: str | None = str(exc)
            central_ok = False  # a read timeout or a dropped answer: central is unwell
        else:
            note = None
            central_ok = True
        try:
            await self._mark_sent((h.task_id, attempt, record_id, note))
            self.writes.ok()
        except Exception as exc:
            # Sent is sent: the device will report, and the consumer applies a
            # result to a task still marked running.
            self.writes.failed(f"task {h.task_id} sent but not marked sent: {exc!r}")
        return self._done(h, "sent", attempt=attempt, fence=fence, central_ok=central_ok
                          ).model_copy(update={"send_s": time.monotonic() - posted})

    def _past_deadline(self, h: TaskHandle) -> bool:
        return h.deadline is not None and utcnow() >= h.deadline

    def _expired_reason(self, h: TaskHandle) -> str:
        when = h.deadline.isoformat() if h.deadline else "?"
        return f"expired: not sent by its deadline {when} (checked at the worker)"

    def _is_quota(self, exc: CentralError) -> bool:
        s = self.settings
        return ((s.central_quota_status is not None and exc.status == s.central_quota_status)
                or (exc.code is not None and exc.code in s.central_quota_codes))

    def _lock_ttl_ms(self, h: TaskHandle) -> int:
        return int((h.timeout_s + self.lock_margin_s) * 1000)

    def _done(self, h: TaskHandle, outcome: str, *, attempt: int | None = None,
              fence: int | None = None, error: str | None = None,
              run_at: datetime | None = None, central_ok: bool | None = None) -> TaskDone:
        return TaskDone(task_id=h.task_id, device_id=h.device_id, outcome=outcome,
                        attempt=h.attempt if attempt is None else attempt,
                        fence=fence, error=error, run_at=run_at, central_ok=central_ok)

    async def _claim_batch(self, claims: list[Claim]) -> list[str | None]:
        return await self.tasks.claim_many(claims, utcnow(), self.failover_s)

    async def _insert_batch(self, records: list[ExecRecord]) -> list[bool]:
        return await self.records.insert_many(records, self.failover_s)

    async def _cas(self, flt: dict[str, Any], update: dict[str, Any]) -> bool:
        """A compare-and-set, through a failover (a second run matches nothing)."""
        return await ride_out(lambda: self.tasks.cas(flt, update), self.failover_s)

    async def _mark_sent_batch(self, items: list[tuple[str, int, str, str | None]]) -> list[None]:
        # One time for the batch (its sends ended within a loop tick): the updates are
        # then alike and run as one statement per collection (store.merged_writes).
        now = utcnow()
        task_updates = [
            task_cas(task_id, TaskStatus.RUNNING, TaskStatus.SENT, now, attempt=attempt,
                     extra_filter={"record_id": record_id})
            for task_id, attempt, record_id, _ in items
        ]
        record_updates = [record_sent(record_id, now, note) for _, _, record_id, note in items]
        await ride_out(lambda: self.tasks.run_updates(task_updates), self.failover_s)
        await ride_out(lambda: self.records.run_updates(record_updates), self.failover_s)
        return [None] * len(items)

    async def _release_batch(self, releases: list[tuple[str, int]]) -> list[None]:
        await self._locks.release_many(releases)
        return [None] * len(releases)

    async def _release_quietly(self, device_id: str, fence: int) -> None:
        try:
            await self._release((device_id, fence))
        except Exception as exc:  # the lock's TTL frees the device in the end
            self.writes.failed(f"lock of {device_id} (fence {fence}) not released: {exc!r}")

    async def _unclaim(self, h: TaskHandle, fence: int, attempt: int, record_id: str,
                       error: str) -> TaskDone:
        """Nothing was sent: give the task back as pending for another attempt. Only
        our own claim (its record id): a recovery may have given the attempt back
        already, and a new claim of the same attempt number is someone else's."""
        try:
            await self._cas(*task_cas(
                h.task_id, TaskStatus.RUNNING, TaskStatus.PENDING, utcnow(), attempt=attempt,
                extra_filter={"record_id": record_id}, set_={"last_error": error},
            ))
        except Exception as exc:
            # The sweeps give back a task stuck running with no send behind it.
            self.writes.failed(f"task {h.task_id} left running after {error}: {exc!r}")
        await self._release_quietly(h.device_id, fence)
        return self._done(h, "error", attempt=attempt, error=error)

    async def _unsent(
        self, h: TaskHandle, fence: int, attempt: int, record_id: str, exc: CentralError
    ) -> TaskDone:
        """The request never left: the attempt did not happen, so undo it."""
        done = await self._undo(h, fence, attempt, record_id, TaskStatus.PENDING, str(exc),
                                "unsent")
        return done.model_copy(update={"central_ok": False if exc.sick else None})

    async def _undo(self, h: TaskHandle, fence: int, attempt: int, record_id: str,
                    to: TaskStatus, error: str, outcome: str) -> TaskDone:
        """Nothing reached the device: the attempt did not happen, so undo it and leave
        the task `to` (pending again, or expired) with its attempt counter as before.

        The record goes first: its (task_id, attempt) is unique, and a record left
        behind would refuse the next claim of this attempt number. If the task's
        compare-and-set then fails, the task stays running with no record, which
        the stuck-running sweep gives back (at the cost of one attempt)."""
        try:
            await ride_out(lambda: self.records.col.delete_one(
                {"_id": record_id, "status": str(RecordStatus.RUNNING)}), self.failover_s)
            await self._cas(*task_cas(
                h.task_id, TaskStatus.RUNNING, to, utcnow(), attempt=attempt,
                extra_filter={"record_id": record_id}, inc={"attempt": -1},
                set_={"last_error": error}, unset=("record_id", "worker"),
            ))
        except Exception as err:
            self.writes.failed(f"task {h.task_id} not sent ({error}) and not undone: {err!r}")
            await self._release_quietly(h.device_id, fence)
            return self._done(h, "error", attempt=attempt, error=f"undo: {err!r}")
        await self._release_quietly(h.device_id, fence)
        return self._done(h, outcome, error=error)

    async def _expire_pending(self, h: TaskHandle) -> TaskDone:
        """Past its deadline before the lock: pending -> expired, nothing else to undo."""
        reason = self._expired_reason(h)
        try:
            changed = await self._cas(*task_cas(
                h.task_id, TaskStatus.PENDING, TaskStatus.EXPIRED, utcnow(), attempt=h.attempt,
                set_={"last_error": reason},
            ))
        except Exception as exc:
            return self._done(h, "error", error=f"expire: {exc!r}")
        return self._done(h, "expired" if changed else "stale", error=reason)

    async def _send_failed(
        self, h: TaskHandle, fence: int, attempt: int, record_id: str, exc: CentralError
    ) -> TaskDone:
        """Central-control did not take it: record why, then retry later or fail."""
        now = utcnow()
        policy = self.settings.retry_policy(h.max_retries, h.queue, h.retry_base_s)
        decision = decide(policy, attempt, exc.retryable, str(exc), now)
        try:
            await ride_out(lambda: self.records.finish(
                record_id, RecordStatus.FAILED, now, str(exc)), self.failover_s)
            await self._cas(*failure_cas(h.task_id, [TaskStatus.RUNNING], attempt, decision,
                                              now, master=self.settings.master_id))
        except Exception as err:
            self.writes.failed(f"task {h.task_id} failed ({exc}) but not recorded: {err!r}")
        await self._release_quietly(h.device_id, fence)
        central_ok = False if exc.sick else None
        if decision.retry:
            return self._done(h, "retry", attempt=attempt, error=decision.reason,
                              run_at=decision.run_at, central_ok=central_ok)
        return self._done(h, "failed", attempt=attempt, error=decision.reason,
                          central_ok=central_ok)

    async def _exhausted(self, h: TaskHandle) -> TaskDone:
        reason = f"attempts exhausted ({h.attempt} of {h.max_retries + 1})"
        try:
            await self._cas(*task_cas(
                h.task_id, TaskStatus.PENDING, TaskStatus.FAILED, utcnow(), attempt=h.attempt,
                set_={"last_error": reason},
            ))
        except Exception as exc:
            return self._done(h, "error", error=f"fail: {exc!r}")
        return self._done(h, "failed", error=reason)
