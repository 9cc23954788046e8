"""When the ready queue was last drained (master/queue_drain.py): pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from master.queue_drain import QueueDrain

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def test_an_empty_queue_is_drained_now() -> None:
    drain = QueueDrain()
    assert drain.observe(at(0), seq=10, waiting=0) == at(0)
    assert drain.observe(at(5), seq=10, waiting=0) == at(5)


def test_a_new_leader_knows_nothing_until_what_waited_is_taken() -> None:
    drain = QueueDrain()
    assert drain.observe(at(0), seq=100, waiting=50) is None
    assert drain.observe(at(5), seq=149, waiting=80) is None  # one of them still waits
    # All 50 taken (by then more wait): drained as of the first reading, not later.
    assert drain.observe(at(10), seq=150, waiting=90) == at(0)
    # The next mark was set at the same reading: 90 more to take from 150.
    assert drain.observe(at(15), seq=200, waiting=60) == at(0)
    assert drain.observe(at(20), seq=240, waiting=30) == at(10)


def test_a_deep_queue_that_never_empties_keeps_the_moment_behind() -> None:
    drain = QueueDrain()
    drain.observe(at(0), seq=0, waiting=0)
    for s in range(1, 60):  # 1,000,000 waiting, 100 taken a reading
        assert drain.observe(at(s * 5), seq=s * 100, waiting=1_000_000) == at(0)


def test_a_counter_that_went_back_is_marked_again() -> None:
    drain = QueueDrain()
    assert drain.observe(at(0), seq=5000, waiting=10) is None
    # Redis lost its data: the counter starts over, and 5010 would never come.
    assert drain.observe(at(5), seq=3, waiting=10) is None
    assert drain.observe(at(10), seq=13, waiting=4) == at(5)
