"""Following shared state that is announced on a Redis channel.

Pauses and benched devices live in Redis, changed by any process; a change is
announced on a channel. A master keeps a local view: it reloads right after
subscribing (a change made meanwhile is in one or the other), on every message
(one reload for a burst), and at least every `interval_s` in case a message was
lost; between waits it runs its own `tick`. A failure, or a reconnect, starts
over with backoff; a stop ends it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from sendscript.backoff import Backoff


async def follow(client: redis.asyncio.Redis, channel: str, stop: asyncio.Event, *,
                 what: str, interval_s: float, tick_s: float,
                 reload: Callable[[], Awaitable[Any]],
                 tick: Callable[[bool], Awaitable[Any]]) -> None:
    """Run until `stop`; `tick(reloaded)` follows every wait of at most `tick_s`."""
    backoff = Backoff(base_s=0.2, cap_s=5.0)
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            await reload()
            backoff.succeeded(what)
            due = time.monotonic() + interval_s
            while not stop.is_set():
                wait = min(tick_s, max(0.0, due - time.monotonic()))
                message = await pubsub.get_message(timeout=wait)
                reloaded = message is not None or time.monotonic() >= due
                if reloaded:
                    while message is not None:  # one reload for a burst of changes
                        message = await pubsub.get_message(timeout=0)
                    await reload()
                    due = time.monotonic() + interval_s
                await tick(reloaded)
        except Exception as exc:
            await backoff.failed(what, exc, stop)
        finally:
            try:
                await pubsub.aclose()
            except Exception:
                pass
