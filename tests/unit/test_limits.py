"""Rate limits: the setting's syntax, and the book of tokens the gate spends (pure)."""

from __future__ import annotations

import itertools

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
NOW_MS = 1_000_000_000_250
SPEND_MS = 100


def book(*limits: RateLimit, tick_s: float = 0.05) -> tuple[LimitBook, list[int]]:
    woken: list[int] = []
    b = LimitBook({lim.name: lim for lim in limits}, tick_s, lambda: woken.append(1))
    return b, woken


def reply(asks: list[Ask], granted: list[int], used: list[int], now_ms: int = NOW_MS,
          frees_in_ms: int = 750, hold_ms: int = 0) -> Reservation:
    """What the script answers: each grant's spending window ends SPEND_MS from now;
    the oldest counted grant stops counting `frees_in_ms` from now."""
    return Reservation(now_ms, [
        Granted(f"{n}:{g}" if g else "", g, u, a.limit.max, now_ms + SPEND_MS,
                now_ms + frees_in_ms, hold_ms)
        for n, (a, g, u) in enumerate(zip(asks, granted, used, strict=True), start=1)])


def ask(limit: RateLimit, want: int, back: int = 0, grant: str = "",
        b: LimitBook | None = None) -> Ask:
    return Ask(limit, want, back, grant, b.spend_ms() if b else 105)


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
    assert asks == [ask(G, 3)]  # two ticks (and no round trip yet) to spend them in
    b.apply(asks, reply(asks, [3], [3]), 10.0, 10.002)
    assert g.spend_until == pytest.approx(10.001 + SPEND_MS / 1000 - 0.001)
    assert [b.take([g], f"t{i}", 10.01) for i in range(3)] == [None, None, None]
    assert g.tokens == 0 and g.taken == 3 and g.held == 3
    # Held again: the next ask may go one tick after the last one.
    lacking = b.take([g], "t3", 10.02)
    assert lacking is not None
    assert lacking[1] == pytest.approx(10.05 - 10.02 + MIN_MARGIN_S + 2 * 0.002)
    assert b.next_wake(10.02) == pytest.approx(10.05)
    # What was spent since the last ask is asked for again with the new demand.
    assert b.plan(10.05) == [ask(G, 4, b=b)]


def test_a_task_needs_a_token_of_every_limit_and_takes_all_or_none() -> None:
    b, _ = book(G, Q)
    g, q = b.states["global"], b.states["queue:bulk"]
    asks = [Ask(G, 4), Ask(Q, 1)]
    b.apply(asks, reply(asks, [4, 1], [4, 1]), 1.0, 1.0)
    assert b.take([g, q], "a", 1.01) is None
    lacking = b.take([g, q], "b", 1.01)
    assert lacking is not None and lacking[0] is q
    assert g.tokens == 3 and q.tokens == 0  # the global token was not taken
    assert q.demand == {"b"} and not g.demand
    assert b.take([g], "c", 1.01) is None  # a task of another queue needs global only
    # While the queue's limit is used up, its tasks ask nothing of the global limit.
    asks = [Ask(Q, 1)]
    b.apply(asks, reply(asks, [0], [2]), 1.02, 1.02)
    assert q.exhausted and q.tokens == 0
    while g.tokens:
        assert b.take([g], "other", 1.02) is None
    assert not g.exhausted
    lacking = b.take([g, q], "d", 1.02)
    assert lacking is not None and lacking[0] is q
    assert q.demand == {"b", "d"} and not g.demand


def test_a_used_up_limit_is_asked_for_again_only_when_a_grant_stops_counting() -> None:
    b, _ = book(G)
    g = b.states["global"]
    asks = [Ask(G, 5)]
    # Another master took 3 of the 5: we get 2 and the limit is used up; its oldest
    # grant stops counting 0.75 s after the reply (half the round trip late).
    b.apply(asks, reply(asks, [2], [5]), 1.0, 1.01)
    assert g.exhausted and g.tokens == 2
    assert g.spend_until == pytest.approx(1.005 + SPEND_MS / 1000 - 0.005)
    assert g.refresh_at == pytest.approx(1.005 + 0.75 + 0.005 + 0.001 + YIELD_S * 2 / 5)
    assert b.take([g], "a", 1.02) is None and b.take([g], "b", 1.02) is None
    lacking = b.take([g], "c", 1.2)
    assert lacking is not None
    assert lacking[1] == pytest.approx(g.refresh_at - 1.2 + MIN_MARGIN_S + 2 * 0.01)
    assert b.next_wake(1.2) == pytest.approx(g.refresh_at)
    assert b.plan(1.5) == []  # nothing to ask while it is used up
    assert g.demand == {"c"}
    asks = b.plan(g.refresh_at)
    assert asks == [ask(G, 3, b=b)]  # the held task, and the two spent
    b.apply(asks, reply(asks, [3], [3], now_ms=NOW_MS + 760), 1.76, 1.762)
    assert g.grant == "1:3" and not g.exhausted and g.tokens == 3


def test_tokens_lapse_with_their_spending_window_and_a_new_grant_replaces_them() -> None:
    b, _ = book(G)
    g = b.states["global"]
    asks = [Ask(G, 5)]
    b.apply(asks, reply(asks, [5], [5]), 1.0, 1.0)
    assert g.tokens == 5 and g.spend_until == pytest.approx(1.1)
    lacking = b.take([g], "late", 1.1)
    assert lacking is not None and g.tokens == 0
    b.apply(asks, reply(asks, [2], [2]), 2.0, 2.0)
    b.take([g], "x", 2.0)
    asks = b.plan(2.06)  # the held task and the spent one; the unspent token goes back
    assert asks == [ask(G, 2, 1, "1:2", b)]
    b.apply(asks, reply(asks, [2], [2]), 2.06, 2.06)
    assert b.next_wake(2.2) == 2.2  # lapsed unspent: given back at once
    assert b.plan(2.2) == [ask(G, 0, 2, "1:2", b)] and g.tokens == 0


def test_idle_tokens_go_back_for_the_other_masters() -> None:
    b, _ = book(RateLimit("global", 50, 10_000))
    g = b.states["global"]
    asks = [Ask(g.limit, 10)]
    b.apply(asks, reply(asks, [10], [10]), 1.0, 1.0)
    assert b.take([g], "a", 1.01) is None
    assert b.next_wake(1.02) == pytest.approx(1.01 + IDLE_S)
    assert b.plan(1.05) == []
    assert b.plan(1.2) == [ask(g.limit, 0, 9, "1:10", b)]  # lapsed after 0.1 s
    b.apply(asks, reply(asks, [10], [10], now_ms=NOW_MS + 2000), 3.0, 3.0)
    b.spend_ms = lambda: 105  # type: ignore[method-assign]
    g.spend_until = 10.0  # a spending window longer than IDLE_S
    assert b.take([g], "a", 3.01) is None
    asks = b.plan(3.01 + IDLE_S)
    assert asks == [ask(g.limit, 0, 9, "1:10", b)]
    assert g.tokens == 0  # not spent while they are on their way back
    assert b.next_wake(2.0) is None


def test_asks_never_exceed_the_limit_and_a_failure_slows_the_held_tasks() -> None:
    b, _ = book(Q)
    q = b.states["queue:bulk"]
    for i in range(50):
        b.take([q], f"t{i}", 0.0)
    asks = b.plan(0.0)
    assert asks == [ask(Q, 2)]
    b.failed()
    lacking = b.take([q], "x", 0.1)
    assert lacking is not None and lacking[1] == FAILED_RETRY_S
    asks = b.plan(0.1)
    b.apply(asks, reply(asks, [1], [1]), 0.1, 0.9)  # a slow reply (0.8 s)
    assert not b.failing and b.spend_ms() == 1705  # later asks outlive the round trip
    lacking = b.take([q], "z", 0.9)  # its grant lapsed on the way: asks again soon
    assert lacking is not None and lacking[1] == pytest.approx(MIN_MARGIN_S + MAX_MARGIN_S)


def test_release_all_gives_back_every_unspent_token() -> None:
    b, _ = book(G, Q)
    asks = [Ask(G, 5), Ask(Q, 2)]
    b.apply(asks, reply(asks, [5, 2], [5, 2]), 1.0, 1.0)
    b.take([b.states["global"], b.states["queue:bulk"]], "a", 1.0)
    assert b.release_all(1.01) == [ask(G, 0, 4, "1:5", b), ask(Q, 0, 1, "2:2", b)]
    assert b.release_all(1.01) == []


def test_a_retry_after_holds_the_limit_until_it_ends() -> None:
    b, _ = book(G)
    g = b.states["global"]
    asks = [Ask(G, 5)]
    b.apply(asks, reply(asks, [0], [0], hold_ms=NOW_MS + 2000), 1.0, 1.0)
    assert g.exhausted and g.refresh_at == pytest.approx(3.001)
    lacking = b.take([g], "a", 1.5)
    assert lacking is not None and lacking[1] >= 1.5
    assert b.plan(2.0) == []  # nothing asked of Redis while held
    b.apply([Ask(G, 5)], reply([Ask(G, 5)], [5], [5]), 3.01, 3.01)
    g.hold(4.0)  # a 429's Retry-After seen here: the tokens in hand go unspent
    assert g.tokens == 0 and b.take([g], "b", 3.5) is not None


class FakeLog:
    """The reservation script's rule, in memory: what Redis would answer at time t."""

    def __init__(self) -> None:
        self.grants: dict[str, tuple[int, int]] = {}  # member -> (spend end ms, count)
        self.seq = 0

    def reserve(self, asks: list[Ask], t: float) -> Reservation:
        now_ms = round(t * 1000)
        out = []
        for a in asks:
            d = a.limit.duration_ms
            self.grants = {m: v for m, v in self.grants.items() if v[0] > now_ms - d}
            if a.back and a.back_grant in self.grants:
                end, n = self.grants.pop(a.back_grant)
                if n > a.back:
                    self.grants[a.back_grant] = (end, n - a.back)
            used = sum(n for _, n in self.grants.values())
            grant = max(0, min(a.want, a.limit.max - used))
            member = ""
            if grant:
                self.seq += 1
                member = f"{self.seq}:{grant}"
                self.grants[member] = (now_ms + a.spend_ms, grant)
            frees = min((e for e, _ in self.grants.values()), default=-d) + d
            out.append(Granted(member, grant, used + grant, a.limit.max,
                               now_ms + a.spend_ms, frees, 0))
        return Reservation(now_ms, out)


def test_competing_masters_share_the_limit_in_every_interval_and_take_turns() -> None:
    lim = RateLimit("global", 10, 1000)
    redis = FakeLog()
    books = [LimitBook({"global": lim}, 0.05) for _ in range(2)]
    spent: list[list[float]] = [[], []]
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
                spent[i].append(t)
        due = b.next_wake(t)
        assert due is not None
        wake[i] = max(due, t + 0.0001)
    every = sorted(spent[0] + spent[1])
    for k, t in enumerate(every):  # no second holds more than the limit
        assert sum(1 for u in every[k:] if u < t + 1.0) <= 10, every
    steady = [t for t in every if 2 <= t < 12]
    assert len(steady) >= 80  # the limit is used (a spending window's worth is lost)
    share = sum(1 for t in spent[0] if 2 <= t < 12) / len(steady)
    assert 0.3 <= share <= 0.7, (spent[0], spent[1])
