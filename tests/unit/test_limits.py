"""Rate limits: the setting's syntax, and the book of tokens the gate spends (pure)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from pydantic import ValidationError

from master.limits import (
    FAILED_RETRY_S,
    IDLE_S,
    MAX_MARGIN_S,
    MIN_MARGIN_S,
    YIELD_S,
    LimitBook,
)
from sendscript.limits import Ask, Granted, RateLimit, Reservation, parse_limits
from sendscript.settings import Settings

# -- syntax ------------------------------------------------------------------------------


def test_parse_the_three_kinds_and_duration_units() -> None:
    limits = parse_limits("global=20/1s, queue:bulk=5/2s,group:rack-7=1/s,queue:x=3/500ms,"
                          "queue:y=100/1.5m,queue:z=7/2h,queue:w=9/3")
    assert limits["global"] == RateLimit("global", 20, 1000)
    assert limits["queue:bulk"] == RateLimit("queue:bulk", 5, 2000)
    assert limits["group:rack-7"] == RateLimit("group:rack-7", 1, 1000)
    assert limits["queue:x"].duration_ms == 500
    assert limits["queue:y"].duration_ms == 90_000
    assert limits["queue:z"].duration_ms == 7_200_000
    assert limits["queue:w"].duration_ms == 3000
    assert limits["queue:bulk"].kind == "queue" and limits["queue:bulk"].target == "bulk"
    assert limits["group:rack-7"].target == "rack-7"
    assert [limits[n].rule for n in ("global", "queue:x", "queue:y", "queue:z")] == [
        "20/1s", "3/500ms", "100/90s", "7/2h"]


@pytest.mark.parametrize("text, why", [
    ("global=0/1s", "max must be"),
    ("global=20", "MAX/DURATION"),
    ("global=20/1d", "MAX/DURATION"),
    ("global=-1/1s", "MAX/DURATION"),
    ("global=1/5ms", "duration must be"),
    ("global=1/25h", "duration must be"),
    ("glob=1/1s", "global, queue:NAME or group:NAME"),
    ("global:x=1/1s", "global takes no name"),
    ("queue:=1/1s", "queue name"),
    ("group:a b=1/1s", "group name"),
    ("global", "NAME=MAX/DURATION"),
    ("global=1/1s,global=2/1s", "given twice"),
])
def test_bad_limits_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_limits(text)
    with pytest.raises(ValidationError, match=why):
        Settings(rate_limits=text)


def test_settings_keep_the_limits_in_a_form_that_goes_through_the_environment() -> None:
    s = Settings(rate_limits="global=20/s,group:rack-7=1/1000ms")
    assert s.rate_limits == {"global": "20/1s", "group:rack-7": "1/1s"}
    env = s.to_env()["SENDSCRIPT_RATE_LIMITS"]
    assert Settings(rate_limits=env).rate_limits == s.rate_limits
    assert Settings(rate_limits='{"queue:bulk": "5/2s"}').rate_limits == {"queue:bulk": "5/2s"}
    assert Settings().rate_limits == {}


# -- the book ------------------------------------------------------------------------------

G = RateLimit("global", 5, 1000)
Q = RateLimit("queue:bulk", 2, 1000)
NOW_MS = 1_000_000_000_250  # a quarter into window 1_000_000_000 of a 1 s limit
W = NOW_MS // 1000


def book(*limits: RateLimit, tick_s: float = 0.05) -> tuple[LimitBook, list[int]]:
    woken: list[int] = []
    b = LimitBook({lim.name: lim for lim in limits}, tick_s, lambda: woken.append(1))
    return b, woken


def reply(asks: list[Ask], granted: list[int], used: list[int],
          now_ms: int = NOW_MS) -> Reservation:
    return Reservation(now_ms, [Granted(now_ms // a.limit.duration_ms, g, u)
                                for a, g, u in zip(asks, granted, used, strict=True)])


def test_a_task_without_a_token_is_held_and_its_demand_asked_for_in_one_batch() -> None:
    b, woken = book(G)
    g = b.states["global"]
    for i in range(3):
        lacking = b.take([g], f"t{i}", 10.0)
        assert lacking is not None and lacking[0] is g
        assert lacking[1] == pytest.approx(MIN_MARGIN_S)  # never asked: ask at once
    assert woken == [1]  # the first demand wakes the loop; the rest wait for its pass
    assert b.next_wake(10.0) == 10.0
    asks = b.plan(10.0)
    assert asks == [Ask(G, 3, 0, -1)]
    b.apply(asks, reply(asks, [3], [3]), 10.0, 10.002)
    assert [b.take([g], f"t{i}", 10.01) for i in range(3)] == [None, None, None]
    assert g.tokens == 0 and g.taken == 3 and g.held == 3
    # Held again: the next ask may go one tick after the last one.
    lacking = b.take([g], "t3", 10.02)
    assert lacking is not None
    assert lacking[1] == pytest.approx(10.05 - 10.02 + MIN_MARGIN_S + 2 * 0.002)
    assert b.next_wake(10.02) == pytest.approx(10.05)
    # What was spent since the last ask is asked for again with the new demand.
    assert b.plan(10.05) == [Ask(G, 4, 0, W)]


def test_a_task_needs_a_token_of_every_limit_and_takes_all_or_none() -> None:
    b, _ = book(G, Q)
    g, q = b.states["global"], b.states["queue:bulk"]
    asks = [Ask(G, 4), Ask(Q, 1)]
    b.apply(asks, reply(asks, [4, 1], [4, 1]), 1.0, 1.0)
    assert b.take([g, q], "a", 1.1) is None
    lacking = b.take([g, q], "b", 1.1)
    assert lacking is not None and lacking[0] is q
    assert g.tokens == 3 and q.tokens == 0  # the global token was not taken
    assert q.demand == {"b"} and not g.demand
    assert b.take([g], "c", 1.1) is None  # a task of another queue needs global only
    # While the queue's window is used up, its tasks ask nothing of the global limit.
    asks = [Ask(Q, 1)]
    b.apply(asks, reply(asks, [0], [2]), 1.2, 1.2)
    assert q.exhausted and q.tokens == 0
    while g.tokens:
        assert b.take([g], "other", 1.2) is None
    assert not g.exhausted
    lacking = b.take([g, q], "d", 1.2)
    assert lacking is not None and lacking[0] is q
    assert q.demand == {"b", "d"} and not g.demand


def test_a_used_up_window_is_asked_for_again_only_when_the_next_begins() -> None:
    b, _ = book(G)
    g = b.states["global"]
    asks = b.plan(0.0) or [Ask(G, 5)]
    # Another master took 3 of the 5: we get 2 and the window is used up. The reply
    # came 0.25 s into the window, so it ends 0.75 s later (half the round trip early).
    b.apply(asks, reply(asks, [2], [5]), 1.0, 1.01)
    assert g.exhausted and g.tokens == 2
    assert g.spend_until == pytest.approx(1.005 + 0.75 - 0.005)
    # Asked for again just after the next window begins, later by our share of this one.
    assert g.refresh_at == pytest.approx(1.005 + 0.75 + 0.005 + 0.001 + YIELD_S * 2 / 5)
    assert b.take([g], "a", 1.1) is None and b.take([g], "b", 1.1) is None
    lacking = b.take([g], "c", 1.2)
    assert lacking is not None
    assert lacking[1] == pytest.approx(g.refresh_at - 1.2 + MIN_MARGIN_S + 2 * 0.01)
    assert b.next_wake(1.2) == pytest.approx(g.refresh_at)
    assert b.plan(1.5) == []  # nothing to ask while the window is used up
    assert g.demand == {"c"}
    asks = b.plan(g.refresh_at)
    assert asks == [Ask(G, 3, 0, W)]  # the held task, and the two spent
    b.apply(asks, reply(asks, [3], [3], now_ms=(W + 1) * 1000 + 2), 1.76, 1.762)
    assert g.window == W + 1 and not g.exhausted and g.tokens == 3


def test_tokens_lapse_with_their_window() -> None:
    b, _ = book(G)
    g = b.states["global"]
    asks = [Ask(G, 5)]
    b.apply(asks, reply(asks, [5], [5]), 1.0, 1.0)
    assert g.tokens == 5 and g.spend_until == pytest.approx(1.75)
    lacking = b.take([g], "late", 1.75)
    assert lacking is not None and g.tokens == 0
    # A reply for a newer window never adds to an older window's tokens.
    b.apply(asks, reply(asks, [1], [1]), 1.0, 1.0)
    asks2 = [Ask(G, 1)]
    b.apply(asks2, reply(asks2, [1], [2], now_ms=(W + 1) * 1000), 1.8, 1.8)
    assert g.window == W + 1 and g.tokens == 1


def test_idle_tokens_go_back_for_the_other_masters() -> None:
    b, _ = book(RateLimit("global", 50, 10_000))
    g = b.states["global"]
    asks = [Ask(g.limit, 10)]
    b.apply(asks, reply(asks, [10], [10]), 1.0, 1.0)
    assert b.take([g], "a", 1.1) is None
    assert b.next_wake(1.2) == pytest.approx(1.1 + IDLE_S)
    assert b.plan(1.1 + IDLE_S / 2) == []
    asks = b.plan(1.1 + IDLE_S)
    assert asks == [Ask(g.limit, 0, 9, NOW_MS // 10_000)]
    assert g.tokens == 0  # not spent while they are on their way back
    assert b.next_wake(2.0) is None


def test_asks_never_exceed_the_limit_and_a_failure_slows_the_held_tasks() -> None:
    b, _ = book(Q)
    q = b.states["queue:bulk"]
    for i in range(50):
        b.take([q], f"t{i}", 0.0)
    asks = b.plan(0.0)
    assert asks == [Ask(Q, 2, 0, -1)]
    b.failed()
    lacking = b.take([q], "x", 0.1)
    assert lacking is not None and lacking[1] == FAILED_RETRY_S
    asks = b.plan(0.1)
    b.apply(asks, reply(asks, [1], [1], now_ms=W * 1000), 0.1, 0.9)  # a slow reply (0.8 s)
    assert not b.failing and q.tokens == 1
    assert b.take([q], "y", 0.9) is None
    lacking = b.take([q], "z", 0.9)  # asks again soon, not two round trips later
    assert lacking is not None and lacking[1] == pytest.approx(MIN_MARGIN_S + MAX_MARGIN_S)


def test_release_all_gives_back_every_unspent_token() -> None:
    b, _ = book(G, Q)
    asks = [Ask(G, 5), Ask(Q, 2)]
    b.apply(asks, reply(asks, [5, 2], [5, 2]), 1.0, 1.0)
    b.take([b.states["global"], b.states["queue:bulk"]], "a", 1.0)
    assert b.release_all(1.1) == [Ask(G, 0, 4, W), Ask(Q, 0, 1, W)]
    assert b.release_all(1.1) == []


class FakeWindows:
    """The reservation script's rule, in memory: what Redis would answer at time t."""

    def __init__(self) -> None:
        self.hashes: dict[str, tuple[int, int, int]] = {}  # name -> (duration, window, used)

    def reserve(self, asks: list[Ask], t: float) -> Reservation:
        now_ms = round(t * 1000)
        grants = []
        for a in asks:
            d, w = a.limit.duration_ms, now_ms // a.limit.duration_ms
            dur, win, used = self.hashes.get(a.limit.name, (0, -1, 0))
            used = used if (dur, win) == (d, w) else 0
            if a.back and a.back_window == w:
                used = max(0, used - a.back)
            grant = max(0, min(a.want, a.limit.max - used))
            self.hashes[a.limit.name] = (d, w, used + grant)
            grants.append(Granted(w, grant, used + grant))
        return Reservation(now_ms, grants)


def test_competing_masters_fill_every_window_and_take_turns() -> None:
    lim = RateLimit("global", 10, 1000)
    redis = FakeWindows()
    books = [LimitBook({"global": lim}, 0.05) for _ in range(2)]
    spent: list[Counter[int]] = [Counter(), Counter()]
    ids = itertools.count()
    wake = [0.0, 0.0003]
    while min(wake) < 12.0:
        i = 0 if wake[0] <= wake[1] else 1
        t, b = wake[i], books[i]
        state = b.states["global"]
        asks = b.plan(t)
        if asks:
            b.apply(asks, redis.reserve(asks, t), t, t)
        for _ in range(30):  # more tasks than the limit wait on each master
            if b.take([state], f"task-{next(ids)}", t) is None:
                spent[i][state.window] += 1
        due = b.next_wake(t)
        assert due is not None
        wake[i] = max(due, t + 0.0001)
    windows = range(2, 12)  # whole windows, after both masters have started
    assert [spent[0][w] + spent[1][w] for w in windows] == [10] * len(windows)
    share = sum(spent[0][w] for w in windows) / (10 * len(windows))
    assert 0.3 <= share <= 0.7, (spent[0], spent[1])
