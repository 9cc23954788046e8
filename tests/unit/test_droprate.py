"""The drop-rate ladder's levels, pure."""

from __future__ import annotations

from master.droprate import DropLadder, LadderPolicy, Level

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
