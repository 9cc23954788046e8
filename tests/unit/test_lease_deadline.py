"""The leader lease's local deadline (pure): renewals count by the monotonic clock."""

from __future__ import annotations

from master.leadership import LeaseDeadline, token_of

LEASE, MARGIN = 10.0, 2.5


def term() -> LeaseDeadline:
    return LeaseDeadline(LEASE, MARGIN)


def test_the_deadline_counts_from_when_the_renewal_started() -> None:
    t = term()
    assert t.renewed(started=100.0, answered=100.4, value="m#1")
    assert t.deadline == 100.0 + LEASE - MARGIN
    assert t.leading(107.4) and not t.leading(107.5)


def test_a_renewal_answered_after_the_deadline_does_not_count() -> None:
    t = term()
    assert t.renewed(100.0, 100.1, "m#1")
    # Started in time (107.0 < 107.5), answered after the deadline it was to extend.
    assert not t.renewed(started=107.0, answered=107.6, value="m#1")
    assert not t.leading(107.6) and t.deadline is None
    # The key still held our value: the next renewal in time resumes the same term.
    assert t.value == "m#1"
    assert t.renewed(108.0, 108.1, "m#1") and t.leading(108.1)


def test_a_first_hold_slower_than_the_lease_less_the_margin_does_not_count() -> None:
    t = term()
    assert not t.renewed(started=0.0, answered=LEASE - MARGIN, value="m#1")
    assert not t.leading(LEASE - MARGIN)


def test_taken_by_another_steps_down_and_forgets_the_term() -> None:
    t = term()
    assert t.renewed(0.0, 0.1, "m#1")
    assert not t.renewed(1.0, 1.1, None)
    assert t.value is None and not t.leading(1.1)


def test_a_pause_past_the_deadline_ends_leadership_without_asking() -> None:
    clock = [50.0]
    t = term()
    assert t.renewed(clock[0], clock[0] + 0.01, "m#3")
    clock[0] += 60.0  # SIGSTOP, SIGCONT: the monotonic clock ran on
    assert not t.leading(clock[0])
    assert t.remaining(clock[0]) == 0.0


def test_renewals_in_time_keep_leading_indefinitely() -> None:
    t = term()
    now = 0.0
    for _ in range(100):
        assert t.renewed(now, now + 0.05, "m#7")
        now += (LEASE - MARGIN) / 3
        assert t.leading(now)


def test_the_token_is_the_number_after_the_last_hash() -> None:
    assert token_of("host#a#42") == 42
    assert token_of("host") is None and token_of(None) is None and token_of("h#x") is None
