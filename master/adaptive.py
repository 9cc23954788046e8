"""Adaptive rate limits: the master part that moves them from the workers' answers.

The rule and the shared state are `sendscript.adaptive`; the limits' tokens are
`master.limits`. Every answer for a task under adaptive limits is noted against
those limits: a 429 (outcome `throttled`, its Retry-After), the send's latency. A
429 holds the limits here at once for its Retry-After (this master spends no more
of their tokens; the others stop within their spending window, when the
reservation script refuses them). Every `rate_limit_adapt_tick_s`, or at once on a
429, the loop reads the limits' state from Redis (one call), decides each with the
pure rule and proposes the changes and holds (one call, compare-and-set: two
masters that saw the same 429s lower it once). What it last did to each limit is
in `report()` (status, console, `/metrics` read the shared value from Redis).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import Subscription
from master.events import MasterStopping, TaskAnswered
from master.limits import LimitState, RateLimits
from sendscript.adaptive import (
    AdaptiveStore,
    AdaptParams,
    Proposal,
    Signals,
    decide,
    hold_ms,
)
from sendscript.backoff import Backoff
from sendscript.settings import Settings


@dataclass
class Seen:
    """One adaptive limit's answers since the loop last looked."""

    throttled: int = 0
    retry_after_s: float | None = None
    latency_sum: float = 0.0
    latency_n: int = 0
    held_at_look: int = 0  # the limit's hold count when the loop last looked

    def signals(self, held_now: int) -> Signals:
        mean = self.latency_sum / self.latency_n if self.latency_n else None
        return Signals(self.throttled, self.retry_after_s, mean, held_now - self.held_at_look)


@dataclass
class AdaptiveLimits:
    settings: Settings
    client: redis.asyncio.Redis
    limits: RateLimits
    seen: dict[str, Seen] = field(default_factory=dict)
    moves: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.params = AdaptParams(s.rate_limit_adapt_decrease, s.rate_limit_adapt_step,
                                  s.rate_limit_adapt_latency_s)
        self.store = AdaptiveStore(self.client, s.keys)
        self.states = {name: st for name, st in self.limits.book.states.items()
                       if st.limit.adaptive}
        self.seen = {name: Seen() for name in self.states}
        self._wake = asyncio.Event()

    def subscriptions(self) -> list[Subscription]:
        if not self.states:
            return []
        return [(TaskAnswered, self._on_answer), (MasterStopping, lambda _: self._wake.set())]

    def _on_answer(self, event: TaskAnswered) -> None:
        done = event.answer
        adaptive = [st for st in self.limits.states_of(event.task) if st.limit.adaptive]
        for st in adaptive:
            seen = self.seen[st.limit.name]
            if done.outcome == "throttled":
                seen.throttled += 1
                if done.retry_after_s is not None:
                    seen.retry_after_s = max(seen.retry_after_s or 0.0, done.retry_after_s)
                    st.hold(time.monotonic() + done.retry_after_s)
            elif done.send_s is not None:
                seen.latency_sum += done.send_s
                seen.latency_n += 1
        if adaptive and done.outcome == "throttled":
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        if not self.states:
            return
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while not stop.is_set():
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.rate_limit_adapt_tick_s)
            except TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(self.look(), self.settings.redis_timeout_s)
                backoff.succeeded("adaptive limits")
            except Exception as exc:
                await backoff.failed("adaptive limits", exc, stop)

    async def look(self) -> None:
        """Decide every adaptive limit from what was seen; propose changes and holds."""
        names = list(self.states)
        now_ms, current = await self.store.read([self.states[n].limit for n in names])
        proposals = []
        for name, state in zip(names, current, strict=True):
            st: LimitState = self.states[name]
            seen, self.seen[name] = self.seen[name], Seen(held_at_look=st.held)
            signals = seen.signals(st.held)
            change = decide(st.limit, state, signals, self.params, now_ms)
            hold = hold_ms(signals)
            if change is not None or hold:
                proposals.append(Proposal(st.limit, state.version, change, hold))
            st.max_now = int(state.value)
        if not proposals:
            return
        applied = await self.store.write(proposals)
        for p, ok in zip(proposals, applied, strict=True):
            if p.change is not None and ok and p.change.why != "climb" \
                    and not p.change.decreased:
                continue  # a curve anchored at the value it had: no move
            if p.change is not None and ok:
                logger.info("rate limit {}: {:.1f} -> {:.1f} ({})", p.limit.name,
                            self.states[p.limit.name].max_now, p.change.value, p.change.why)
                self.states[p.limit.name].max_now = int(p.change.value)
                self.moves[p.limit.name] = {"value": round(p.change.value, 3),
                                            "why": p.change.why, "at": time.time()}

    def report(self) -> dict[str, Any]:
        return {name: {"current": st.max_now, **self.moves.get(name, {})}
                for name, st in self.states.items()}
