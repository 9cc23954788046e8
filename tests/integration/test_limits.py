"""Rate limits on a real Redis (and Mongo for groups): the reservation script never
hands out more than a window allows to all callers together, and two masters' gates
with their loops stay within the limit in every window."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.bus import Go, Hold
from master.limits import RateLimits
from sendscript import connect
from sendscript.limits import Ask, RateLimit, RateLimiter, window_use
from sendscript.models import Task
from sendscript.settings import Settings
from sendscript.store import GROUPS

HOUR = RateLimit("global", 10, 3_600_000)


def task(n: int, device: str | None = None, queue: str = "default") -> Task:
    return Task(id=f"t{n}", device_id=device or f"dev-{n}", script={"id": "s"}, queue=queue,
                created_at=datetime.now(UTC))


async def test_concurrent_reservations_never_exceed_the_limit(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    other = connect.redis_async(settings)
    try:
        a, b = RateLimiter(redis_client, settings.keys), RateLimiter(other, settings.keys)
        replies = await asyncio.gather(*[lim.reserve([Ask(HOUR, 1)])
                                         for _ in range(20) for lim in (a, b)])
        assert sum(r.grants[0].granted for r in replies) == 10
        assert max(r.grants[0].used for r in replies) == 10
        grant = next(r.grants[0].grant for r in replies if r.grants[0].granted)
        # Unspent tokens given back leave their grant and can be taken again; a grant
        # that is gone (or never was) gives nothing back.
        back = await a.reserve([Ask(HOUR, 0, 4, grant)])
        assert back.grants[0].used == 9  # the grant held one token
        stale = await b.reserve([Ask(HOUR, 0, 4, "999999:4")])
        assert stale.grants[0].used == 9
        again = await b.reserve([Ask(HOUR, 10)])
        assert again.grants[0].granted == 1 and again.grants[0].used == 10
        assert again.grants[0].frees_ms > again.now_ms + 3_599_000  # an hour after
        # One call for many limits; a changed duration starts a count of its own.
        both = await a.reserve([Ask(HOUR, 5), Ask(RateLimit("queue:bulk", 3, 60_000), 5),
                                Ask(RateLimit("global", 10, 1_800_000), 2)])
        assert [g.granted for g in both.grants] == [0, 3, 2]
        sync = connect.redis_sync(settings)
        try:
            use = window_use(sync, settings.keys, [RateLimit("queue:bulk", 3, 60_000)])
            assert use["queue:bulk"]["used"] == 3 and 59 < use["queue:bulk"]["left_s"] <= 61
        finally:
            sync.close()
    finally:
        await other.aclose()


async def test_no_interval_of_the_duration_holds_twice_the_limit_at_a_window_edge(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    """The burst a fixed window lets through: the limit used up just before a window
    edge (Redis time, a multiple of the duration) and again just after it. Sliding,
    the second burst waits until the first stops counting."""
    limit = RateLimit("global", 20, 500)
    limiter = RateLimiter(redis_client, settings.keys)
    t = await redis_client.time()
    now_ms = t[0] * 1000 + t[1] // 1000
    edge = (now_ms // 500 + 2) * 500  # a fixed window's edge, at least 0.5 s ahead
    await asyncio.sleep(max(0.0, (edge - 40 - now_ms) / 1000))
    granted: list[tuple[int, int]] = []  # (server ms, tokens)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        reply = await limiter.reserve([Ask(limit, 20, spend_ms=10)])
        if reply.grants[0].granted:
            granted.append((reply.now_ms, reply.grants[0].granted))
        await asyncio.sleep(0.005)
    assert granted and granted[0][0] < edge  # the first burst came before the edge
    # Tokens of a grant are spent within its 10 ms: any 500 ms holds at most 20 if
    # grants whose spending windows are within 500 ms of each other sum to 20.
    for at, _ in granted:
        near = sum(n for t_ms, n in granted if at <= t_ms < at + 500 + 10)
        assert near <= 20, granted
    assert sum(n for _, n in granted) >= 40  # and it did pass more bursts, later


async def drive(gate: RateLimits, tasks: list[Task], gone: list[tuple[float, str]],
                holds: Counter[str]) -> None:
    """Ask the gate as the dispatcher would: a held task asks again after retry_s."""
    due = {t.id: 0.0 for t in tasks}
    by_id = {t.id: t for t in tasks}
    while due:
        now = time.monotonic()
        for task_id in [i for i, at in due.items() if at <= now]:
            verdict = gate.admit(by_id[task_id], datetime.now(UTC))
            if isinstance(verdict, Go):
                gone.append((time.monotonic(), task_id))
                del due[task_id]
            else:
                assert isinstance(verdict, Hold) and verdict.reason == "rate limit global"
                assert 0 < verdict.retry_s <= 1.0  # about a 200 ms window at most
                holds[task_id] += 1
                due[task_id] = now + verdict.retry_s
        if due:
            await asyncio.sleep(max(0.001, min(due.values()) - time.monotonic()))


async def test_two_masters_stay_within_the_limit_in_every_window(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    s = settings.model_copy(update={"rate_limits": {"global": "10/200ms"}})
    other = connect.redis_async(settings)
    stop = asyncio.Event()
    gates = [RateLimits(s, client, db[GROUPS]) for client in (redis_client, other)]
    loops = [asyncio.create_task(g.run(stop)) for g in gates]
    gone: list[tuple[float, str]] = []
    holds: Counter[str] = Counter()
    try:
        await asyncio.wait_for(asyncio.gather(
            drive(gates[0], [task(i) for i in range(60)], gone, holds),
            drive(gates[1], [task(i) for i in range(60, 120)], gone, holds)), 60)
    finally:
        stop.set()
        for g in gates:
            g._wake.set()
        await asyncio.gather(*loops)
        await other.aclose()
    assert len(gone) == 120 and len({t for _, t in gone}) == 120
    # Both gates run in this process: one clock, so any 200 ms can be checked.
    assert max_in_any_interval([t for t, _ in gone], 0.2) <= 10
    assert gone[-1][0] - gone[0][0] >= 11 * 0.2  # 120 tasks at 10 a window
    assert sum(holds.values()) > 0
    reports = [g.report() for g in gates]
    assert sum(r["held"] for r in reports) == sum(holds.values())
    assert sum(r["limits"]["global"]["spent"] for r in reports) == 120
    assert all(r["reservations"] >= 1 for r in reports)


async def test_group_and_queue_limits_apply_to_their_tasks_only(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    await db[GROUPS].insert_one({"_id": "rack-7", "devices": ["r1", "r2"]})
    s = settings.model_copy(update={"rate_limits": {"group:rack-7": "1/1h",
                                                    "queue:bulk": "2/1h"}})
    stop = asyncio.Event()
    gate = RateLimits(s, redis_client, db[GROUPS])
    now = datetime.now(UTC)
    held = gate.admit(task(1, "r1"), now)
    assert isinstance(held, Hold) and "not loaded" in held.reason  # never unlimited by mistake
    loop = asyncio.create_task(gate.run(stop))
    try:
        await _until(lambda: gate.report()["groups_loaded"], 10, "the groups to load")
        assert isinstance(gate.admit(task(3, "free"), now), Go)  # no limit applies
        verdicts = await _admit_until_go(gate, [task(1, "r1"), task(2, "r2")])
        assert len([v for v in verdicts.values() if isinstance(v, Go)]) == 1
        left = next(v for v in verdicts.values() if isinstance(v, Hold))
        assert left.reason == "rate limit group:rack-7"
        assert left.retry_s > 1  # the window is used up: wait for the next one
        # Queue limit: 2 of the bulk queue's tasks go, the third waits.
        bulk = await _admit_until_go(gate, [task(10 + i, queue="bulk") for i in range(3)],
                                     want=2)
        assert sum(isinstance(v, Go) for v in bulk.values()) == 2
        sync = connect.redis_sync(settings)
        try:
            use = window_use(sync, settings.keys, [RateLimit("group:rack-7", 1, 3_600_000),
                                                   RateLimit("queue:bulk", 2, 3_600_000)])
        finally:
            sync.close()
        assert use["group:rack-7"]["used"] == 1 and use["queue:bulk"]["used"] == 2
    finally:
        stop.set()
        gate._wake.set()
        await loop


def max_in_any_interval(times: list[float], length_s: float) -> int:
    """The most of `times` inside one interval [t, t + length) of any start."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= length_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def _admit_until_go(gate: RateLimits, tasks: list[Task],
                          want: int = 1) -> dict[str, object]:
    """Ask for each task until `want` of them went; the last verdict of each."""
    verdicts: dict[str, object] = {}
    while sum(isinstance(v, Go) for v in verdicts.values()) < want:
        for t in tasks:
            if not isinstance(verdicts.get(t.id), Go):
                verdicts[t.id] = gate.admit(t, datetime.now(UTC))
        await asyncio.sleep(0.02)
    return verdicts
