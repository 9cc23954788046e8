"""Rate limits at dispatch: a gate that spends tokens its loop reserves in Redis.

Naming: one noun per concern; `sendscript/limits.py` holds its state and rule, shared by
every role, and `master/limits.py` (this module) the master part that drives it.

Every limit (`sendscript.limits`: global, per queue, per device group) counts
tokens in a sliding window in Redis, shared by all masters. The gate never calls
Redis: it spends tokens this master has reserved (`LimitBook.take`, O(limits of
the task)). A task needs a token of each limit that applies to it (global, its
queue's, its device's groups') and takes all of them or none. Without one it is
held (`Hold`: queued, no attempt used, nothing logged as an error) and the limit
notes the demand; the loop then reserves tokens for every limit with demand in
one script call, at most every `rate_limit_tick_s`, and the held devices ask
again just after the reply is due. A limit Redis reports used up (or held by a
Retry-After) is asked for again only when its oldest grant stops counting (or the
hold ends), and its tasks wait until then.

Granted tokens are spent within their spending window (`spend_ms`: two ticks and
two round trips) or lapse; tokens nobody here asked for during `IDLE_S` are given
back sooner, so that another master may use them. When masters compete for a
used-up limit, each asks again later by `YIELD_S` times the share of the last
grants it got: the one left without asks first, so over time they take turns
rather than the quickest taking everything. Times are Redis server time: each
reply maps them onto this process's monotonic clock, conservatively by half the
round trip (tokens stop a little before their spending window ends; a used-up
limit is asked for again a little after a grant stops counting).

Ordinary limiting raises no Incident: it is the service working as configured.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis.asyncio
from pymongo.asynchronous.collection import AsyncCollection

from master.bus import GO, Hold, Subscription, Verdict
from master.events import MasterStopping
from sendscript.backoff import Backoff, every
from sendscript.groups import devices_of
from sendscript.limits import Ask, RateLimit, RateLimiter, Reservation, parse_limits
from sendscript.models import Task
from sendscript.settings import Settings

IDLE_S = 0.5  # tokens neither spent nor asked for this long go back to the others
MIN_MARGIN_S = 0.005  # held devices ask again this long after a reply is due, at least
MAX_MARGIN_S = 0.1  # and at most this much more (a slow reply: they ask once more)
FAILED_RETRY_S = 1.0  # while Redis does not answer, held devices ask this often
GROUPS_RETRY_S = 1.0  # until the limited groups' devices are loaded
IDLE_WAIT_S = 1.0  # the loop's longest sleep when nothing is due
# A master that took a used-up window's tokens asks for the next one up to this much
# later (in proportion to its share), so that masters left without go first.
YIELD_S = 0.01


@dataclass
class LimitState:
    """One limit as this master sees it."""

    limit: RateLimit
    grant: str = ""  # the Redis grant the tokens belong to
    tokens: int = 0  # reserved here in `grant`, not yet spent
    spend_until: float = 0.0  # monotonic: the spending window has surely not ended
    refresh_at: float = 0.0  # monotonic: a grant has surely stopped counting by this
    exhausted: bool = False  # every token of the sliding window is taken, or held
    used: int = 0  # the sliding window's tokens taken by all masters, at the last reply
    granted: int = 0  # of them, granted to this master by the last reply
    max_now: int = 0  # the max in force (an adaptive limit's current value)
    hold_until: float = 0.0  # monotonic: a Retry-After holds the limit until then
    lapsed: tuple[str, int] | None = None  # a grant's tokens that lapsed unspent
    demand: set[str] = field(default_factory=set)  # tasks held for want of a token
    spent: int = 0  # tokens spent since the last ask
    active_at: float = -math.inf  # the last grant or spend
    held: int = 0  # hold verdicts in all (report)
    taken: int = 0  # tokens spent in all (report)

    def __post_init__(self) -> None:
        self.max_now = self.max_now or self.limit.max

    def roll(self, now: float) -> None:
        """Tokens lapse at the end of their spending window; a used-up limit is asked
        again once a grant stops counting."""
        if now >= self.spend_until and self.tokens:
            # Never spent: they go back with the next ask, so that they stop counting.
            self.lapsed, self.tokens = (self.grant, self.tokens), 0
        if self.exhausted and now >= self.refresh_at:
            self.exhausted = False

    def hold(self, until: float) -> None:
        """A Retry-After: nothing of this limit is spent here before `until`."""
        self.tokens = 0
        self.hold_until = max(self.hold_until, until)
        self.exhausted = True
        self.refresh_at = max(self.refresh_at, self.hold_until)


class LimitBook:
    """The tokens of every limit: spent by the gate, asked for by the loop. Pure:
    times are monotonic seconds passed in."""

    def __init__(self, limits: dict[str, RateLimit], tick_s: float,
                 wake: Callable[[], None] = lambda: None, allowance_s: float = 0.0) -> None:
        self.states = {name: LimitState(limit) for name, limit in limits.items()}
        self.tick_s = tick_s
        self.allowance_s = allowance_s  # dispatch to POST: counted, never spent in
        self.wake = wake  # a limit got its first demand: the loop looks again when to ask
        self.last_ask_at = -math.inf
        self.rtt = 0.0  # of the last reservation
        self.failing = False
        self.reservations = 0

    # -- the gate's side ---------------------------------------------------------------
    def take(self, states: list[LimitState], task_id: str,
             now: float) -> tuple[LimitState, float] | None:
        """One token of each limit, all or none: None, or (a limit lacking one, the
        seconds after which the task should ask again)."""
        for s in states:
            s.roll(now)
        lacking = [s for s in states if s.tokens <= 0]
        if not lacking:
            for s in states:
                s.tokens -= 1
                s.spent += 1
                s.taken += 1
                s.active_at = now
            return None
        # While one of them is used up, asking the others for tokens would only keep
        # them from other tasks (and masters) until that window ends.
        used_up = [s for s in lacking if s.exhausted]
        first = False
        for s in used_up or lacking:
            first = first or not s.demand
            s.demand.add(task_id)
        for s in lacking:
            s.held += 1
        if first:
            self.wake()
        retry, worst = max((self.retry_in(s, now), i) for i, s in enumerate(lacking))
        return lacking[worst], retry

    def retry_in(self, s: LimitState, now: float) -> float:
        if self.failing:
            return FAILED_RETRY_S
        margin = MIN_MARGIN_S + min(2 * self.rtt, MAX_MARGIN_S)
        if s.exhausted:
            return max(0.0, s.refresh_at - now) + margin
        return max(0.0, self.last_ask_at + self.tick_s - now) + margin

    # -- the loop's side -----------------------------------------------------------------
    def next_wake(self, now: float) -> float | None:
        """When the loop has something to ask Redis (None: nothing until woken)."""
        at: float | None = None
        for s in self.states.values():
            s.roll(now)
            if s.demand:
                due = s.refresh_at if s.exhausted else max(now, self.last_ask_at + self.tick_s)
            elif s.lapsed is not None:
                due = now
            elif s.tokens > 0:
                due = s.active_at + IDLE_S
            else:
                continue
            at = due if at is None else min(at, due)
        return at

    def plan(self, now: float) -> list[Ask]:
        """What to ask for now: tokens for the held demand (and as many as were spent
        since the last ask, for the tasks to come), and idle tokens back."""
        asks: list[Ask] = []
        for s in self.states.values():
            s.roll(now)
            want = back = 0
            grant = s.grant
            if s.demand and not s.exhausted:
                want = max(0, min(s.max_now, len(s.demand) + s.spent))
                back, s.tokens = s.tokens, 0  # one grant at a time: the rest go back
                s.demand.clear()
                s.spent = 0
            elif not s.demand and s.tokens > 0 and now - s.active_at >= IDLE_S:
                back, s.tokens = s.tokens, 0  # not ours to spend once asked back
            if not back and s.lapsed is not None:
                grant, back = s.lapsed
            s.lapsed = None
            if want or back:
                asks.append(Ask(s.limit, want, back, grant if back else "",
                                self.spend_ms()))
        if asks:
            self.last_ask_at = now
        return asks

    def release_all(self, now: float) -> list[Ask]:
        """Every unspent token back (the master stops)."""
        asks = []
        for s in self.states.values():
            s.roll(now)
            if s.tokens > 0:
                asks.append(Ask(s.limit, 0, s.tokens, s.grant, self.spend_ms()))
                s.tokens = 0
        return asks

    def spend_ms(self) -> int:
        """The spending window to ask for: two ticks and two round trips, so that
        granted tokens outlive the reply's way back and the held tasks' next look;
        and the allowance for a dispatched task to reach central-control."""
        return round(1000 * (2 * self.tick_s + 2 * self.rtt + self.allowance_s)) + 5

    def apply(self, asks: list[Ask], reply: Reservation, sent_at: float,
              answered_at: float) -> None:
        """The reply of a reservation sent at `sent_at` and answered at `answered_at`."""
        self.failing = False
        self.reservations += 1
        self.rtt = max(0.0, answered_at - sent_at)
        mid, half = (sent_at + answered_at) / 2, self.rtt / 2
        def local(server_ms: int) -> float:
            return mid + (server_ms - reply.now_ms) / 1000

        for ask, got in zip(asks, reply.grants, strict=True):
            s = self.states[ask.limit.name]
            s.max_now = got.max or s.max_now
            s.granted = got.granted  # the share of the last grant decides the turn
            if got.granted:
                s.grant, s.tokens = got.grant, got.granted  # what was left went back
                s.spend_until = local(got.spend_end_ms) - self.allowance_s - half
                s.active_at = answered_at
            s.used = got.used
            s.exhausted = got.used >= s.max_now or got.hold_ms > 0
            if got.hold_ms:
                s.hold_until = max(s.hold_until, local(got.hold_ms) + half)
                s.refresh_at = s.hold_until + 0.001
            elif s.exhausted:
                s.refresh_at = (local(got.frees_ms) + half + 0.001
                                + YIELD_S * min(1.0, s.granted / max(1, s.max_now)))
            s.roll(answered_at)

    def failed(self) -> None:
        """The reservation did not answer: its asks count for nothing; tasks wait."""
        self.failing = True


class RateLimits:
    """The gate and its loop: reservations, and the limited groups' devices."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis,
                 groups: AsyncCollection) -> None:
        self.settings = settings
        self.limits = parse_limits(settings.rate_limits)
        self.groups = groups
        self.limiter = RateLimiter(client, settings.keys)
        self._wake = asyncio.Event()
        self.book = LimitBook(self.limits, settings.rate_limit_tick_s, self._wake.set,
                              settings.rate_limit_send_allowance_s)
        states = self.book.states
        self._global = states.get("global")
        self._queues = {s.limit.target: s for s in states.values() if s.limit.kind == "queue"}
        self._group_names = [s.limit.target for s in states.values() if s.limit.kind == "group"]
        # device -> its groups' limits; None until the first load.
        self._by_device: dict[str, list[LimitState]] | None = None if self._group_names else {}
        self.groups_held = 0
        self.gate: RateLimits | None = self if self.limits else None  # no limit, no gate

    def subscriptions(self) -> list[Subscription]:
        return [(MasterStopping, lambda _: self._wake.set())] if self.limits else []

    # -- the gate --------------------------------------------------------------------------
    def admit(self, task: Task, now: datetime) -> Verdict:
        if self._by_device is None:
            self.groups_held += 1
            return Hold("rate limit: device groups not loaded yet", GROUPS_RETRY_S)
        states = self.states_of(task)
        if not states:
            return GO
        lacking = self.book.take(states, task.id, time.monotonic())
        if lacking is None:
            return GO
        state, retry_s = lacking
        return Hold(f"rate limit {state.limit.name}", retry_s)

    def states_of(self, task: Task) -> list[LimitState]:
        """The limits a task needs a token of: global, its queue's, its groups'."""
        states = [self._global] if self._global is not None else []
        if (queue := self._queues.get(task.queue)) is not None:
            states.append(queue)
        states.extend((self._by_device or {}).get(task.device_id, ()))
        return states

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not self.limits:
            return
        parts = [self._reserve(stop)]
        if self._group_names:
            parts.append(every(stop, self.settings.rate_limit_groups_refresh_s,
                               "rate limit groups", self.load_groups))
        await asyncio.gather(*parts)

    async def _reserve(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while not stop.is_set():
            now = time.monotonic()
            due = self.book.next_wake(now)
            wait = IDLE_WAIT_S if due is None else due - now
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            asks = self.book.plan(now)
            if not asks:
                continue
            try:
                await self._ask(asks)
                backoff.succeeded("rate limit reservation")
            except Exception as exc:
                self.book.failed()
                await backoff.failed("rate limit reservation", exc, stop)
        await self._give_back()

    async def _ask(self, asks: list[Ask]) -> None:
        sent_at = time.monotonic()
        reply = await asyncio.wait_for(self.limiter.reserve(asks), self.settings.redis_timeout_s)
        self.book.apply(asks, reply, sent_at, time.monotonic())

    async def _give_back(self) -> None:
        """A stopping master's unspent tokens, for the others (best effort)."""
        asks = self.book.release_all(time.monotonic())
        if asks:
            try:
                await self._ask(asks)
            except Exception:  # they lapse with their window
                pass

    async def load_groups(self) -> None:
        """device -> the limits of its groups, from `device_groups`."""
        docs = await asyncio.wait_for(
            self.groups.find({"_id": {"$in": self._group_names}}, {"devices": 1}).to_list(None),
            self.settings.mongo_timeout_s)
        by_device: dict[str, list[LimitState]] = {}
        for name, devices in devices_of(docs).items():
            state = self.book.states[f"group:{name}"]
            for device in set(devices):
                by_device.setdefault(device, []).append(state)
        self._by_device = by_device

    def report(self) -> dict[str, Any]:
        states = self.book.states.values()
        return {
            "limits": {s.limit.name: {
                "rule": s.limit.rule, "tokens": s.tokens, "window_used": s.used,
                "held": s.held, "spent": s.taken, "max": s.max_now,
            } for s in states},
            "held": sum(s.held for s in states) + self.groups_held,
            "reservations": self.book.reservations,
            "groups_loaded": self._by_device is not None,
        }
