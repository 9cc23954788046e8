"""Adaptive limits on a real Redis: a change is a compare-and-set (two masters seeing
the same 429s lower it once), the reservation script grants under the current value,
and a Retry-After hold stops every grant until it ends."""

from __future__ import annotations

import redis.asyncio

from sendscript import connect
from sendscript.adaptive import AdaptiveStore, Change, Proposal
from sendscript.limits import Ask, RateLimit, RateLimiter, window_use
from sendscript.settings import Settings

LIM = RateLimit("global", 20, 3_600_000, 2, 100)


async def test_changes_are_shared_compared_and_read_by_the_reservation(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    store, limiter = AdaptiveStore(redis_client, settings.keys), RateLimiter(
        redis_client, settings.keys)
    _, [state] = await store.read([LIM])
    assert state.value == 20.0 and state.version == 0
    down = Proposal(LIM, state.version, Change(10.0, "429 x3", True))
    # Two masters decided on the same version: one change applies.
    assert await store.write([down, down]) == [True, False]
    _, [state] = await store.read([LIM])
    assert (state.value, state.version, state.why) == (10.0, 1, "429 x3")
    assert state.down_at_ms > 0
    reply = await limiter.reserve([Ask(LIM, 50)])
    assert reply.grants[0].granted == 10 and reply.grants[0].max == 10
    # A hold: nothing granted until it ends, whatever is free.
    await limiter.reserve([Ask(LIM, 0, 10, reply.grants[0].grant)])
    assert await store.write([Proposal(LIM, 1, None, 60_000)]) == [False]
    held = await limiter.reserve([Ask(LIM, 5)])
    assert held.grants[0].granted == 0 and held.grants[0].hold_ms > held.now_ms + 59_000
    sync = connect.redis_sync(settings)
    try:
        view = window_use(sync, settings.keys, [LIM])["global"]
    finally:
        sync.close()
    assert view["current"] == 10.0 and view["why"] == "429 x3" and view["hold_s"] > 59


async def test_an_adaptive_limit_keeps_its_value_through_an_idle_spell(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    # The window's keys of a fixed limit go two durations after the last send; an
    # adaptive limit's value must outlast that, or the next burst starts over its
    # farm's capacity again.
    short = RateLimit("short", 20, 1000, 2, 100)
    fixed = RateLimit("fixed", 20, 1000)
    store, limiter = AdaptiveStore(redis_client, settings.keys), RateLimiter(
        redis_client, settings.keys)
    _, [state] = await store.read([short])
    assert await store.write([Proposal(short, state.version, Change(7.0, "429 x1", True))])
    await limiter.reserve([Ask(short, 1), Ask(fixed, 1)])
    keep = await redis_client.pttl(settings.keys.rate_limit("short"))
    assert keep > 3_600_000
    assert await redis_client.pttl(settings.keys.rate_limit_grants("short")) > 3_600_000
    assert 0 < await redis_client.pttl(settings.keys.rate_limit("fixed")) <= 2 * 1100
    _, [state] = await store.read([short])
    assert state.value == 7.0
