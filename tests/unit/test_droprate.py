"""The drop-rate ladder's levels, pure."""

from __future__ import annotations

from master.droprate import (
    DropLadder,
    LadderPolicy,
    Level,
    Window,
    describe,
    is_drop,
    is_finished,
)

POLICY = LadderPolicy(min_volume=100, degrade_at=0.10, open_at=0.15, hard_stop_at=0.20,
                      recover_ratio=0.8)


def test_too_little_volume_is_not_judged() -> None:
    ladder = DropLadder(POLICY)
    assert ladder.update(99, 99) == (Level.OK, Level.OK)
    assert ladder.rate is None


def test_each_threshold_is_a_level() -> None:
    for dropped, level in [(9, Level.OK), (10, Level.DEGRADE), (15, Level.OPEN),
                           (20, Level.HARD_STOP), (100, Level.HARD_STOP)]:
        ladder = DropLadder(POLICY)
        assert ladder.update(100, dropped) == (Level.OK, level), dropped


def test_climbs_one_step_at_a_time_or_straight_up() -> None:
    ladder = DropLadder(POLICY)
    assert ladder.update(200, 24) == (Level.OK, Level.DEGRADE)
    assert ladder.update(200, 30) == (Level.DEGRADE, Level.OPEN)
    assert ladder.update(200, 45) == (Level.OPEN, Level.HARD_STOP)


def test_a_level_is_left_only_below_its_share_of_the_threshold() -> None:
    ladder = DropLadder(POLICY)
    ladder.update(100, 16)
    assert ladder.level is Level.OPEN
    assert ladder.update(100, 13) == (Level.OPEN, Level.OPEN)  # 13 % >= 0.8 * 15 %
    assert ladder.update(100, 11) == (Level.OPEN, Level.DEGRADE)
    assert ladder.update(100, 9) == (Level.DEGRADE, Level.DEGRADE)  # 9 % >= 0.8 * 10 %
    assert ladder.update(100, 7) == (Level.DEGRADE, Level.OK)


def test_falls_straight_down_and_resets_when_the_window_empties() -> None:
    ladder = DropLadder(POLICY)
    ladder.update(100, 30)
    assert ladder.update(100, 1) == (Level.HARD_STOP, Level.OK)
    ladder.update(100, 30)
    assert ladder.update(10, 10) == (Level.HARD_STOP, Level.OK)


def test_a_drop_is_a_task_that_will_never_run() -> None:
    assert is_drop("expired", None)
    # Failed for good after a last attempt that central-control's trouble ended.
    assert is_drop("failed", False)
    # Refused for good by central-control (a 4xx): answered, not dropped.
    assert not is_drop("failed", None)
    # An attempt that will be retried is no drop, whatever ended it.
    assert not is_drop("retry", False) and not is_drop("retry", None)
    assert not is_drop("sent", True) and not is_drop("sent", False)


def test_a_retry_has_not_left_the_masters_hands() -> None:
    assert [o for o in ("sent", "failed", "expired", "retry", "stale", "error")
            if is_finished(o)] == ["sent", "failed", "expired"]


def test_the_description_never_reads_more_drops_than_tasks() -> None:
    assert describe(Window(438, 30, 100), 30 / 438, POLICY, 60) == (
        "30 of 438 tasks dropped in 60s (7%)")
    # Too little volume to judge: said so, not "N of 0 tasks dropped".
    text = describe(Window(0, 0, 100), None, POLICY, 60)
    assert text == "0 task(s) finished in 60s, fewer than 100 to judge (0 dropped)"
    assert " of 0 " not in text

