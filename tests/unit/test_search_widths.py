"""How wide the task search's next window of created_at is (console/search.py)."""

from __future__ import annotations

from datetime import timedelta

from console.search import EMPTY_GROWTH, MAX_GROWTH, Widths

MINUTE = timedelta(minutes=1)


def test_empty_stretches_widen_slowly() -> None:
    w = Widths()
    assert w.next(MINUTE, 0, 51, took_ms=1.0, left_ms=240) == MINUTE * EMPTY_GROWTH


def test_the_match_rate_sizes_the_next_window() -> None:
    w = Widths()
    # 10 found in a minute, 41 still wanted: about 6 minutes more at that rate
    nxt = w.next(MINUTE, 10, 41, took_ms=5.0, left_ms=240)
    assert MINUTE * 4 < nxt < MINUTE * 8


def test_the_time_left_caps_the_width() -> None:
    w = Widths()
    # no match in a window that took 100 ms: 100 ms left allows half as wide, at most
    assert w.next(MINUTE * 10, 0, 51, took_ms=100.0, left_ms=100) == MINUTE * 5


def test_growth_is_bounded_both_ways() -> None:
    w = Widths()
    assert w.next(MINUTE, 0, 51, took_ms=5.0, left_ms=10_000) == MINUTE * MAX_GROWTH
    w = Widths()
    assert w.next(MINUTE, 50, 1, took_ms=5.0, left_ms=240) == MINUTE / 2


def test_an_idle_stretch_is_crossed_in_capped_steps_then_doubling() -> None:
    from console.search import EMPTY_CAP, IDLE_SPAN

    w = Widths()
    width, crossed = MINUTE, timedelta(0)
    while crossed + width < IDLE_SPAN:
        crossed += width
        width = w.next(width, 0, 51, took_ms=1.0, left_ms=200)
        assert width <= EMPTY_CAP
    assert width == EMPTY_CAP
    for _ in range(3):  # idle past IDLE_SPAN: the tasks may have ended
        width = w.next(width, 0, 51, took_ms=1.0, left_ms=200)
    assert width == EMPTY_CAP * 8


def test_read_a_device_at_a_time_an_empty_window_grows_fully() -> None:
    from console.search import EACH_DEVICE_GROWTH

    # 50 reads of nothing: the fixed cost of a read is taken out (took_ms ~0), and
    # the next window is as wide as the growth allows, not an idle step.
    w = Widths(each_device=True)
    assert w.next(MINUTE, 0, 51, took_ms=0.5, left_ms=10_000) == MINUTE * EACH_DEVICE_GROWTH
    w = Widths()
    assert w.next(MINUTE, 0, 51, took_ms=0.5, left_ms=10_000) == MINUTE * EMPTY_GROWTH
