"""Backpressure: the water-mark state machine, and its announcements on the bus."""

from __future__ import annotations

import asyncio

import pytest

from master.backpressure import HIGH_WATER, Backpressure, Change, WaterMarks
from master.bus import Bus
from master.events import Incident, TasksQueued, TasksWithdrawn
from sendscript.settings import Settings


def test_closes_at_high_water_and_reopens_only_at_low_water() -> None:
    marks = WaterMarks(high=50, low=10)
    assert marks.observe(49) is None and marks.open
    assert marks.observe(50) is Change.CLOSED and not marks.open
    # Between the marks nothing changes, going down or up: no flapping at the edge.
    for count in (60, 30, 11, 40, 49, 11):
        assert marks.observe(count) is None and not marks.open
    assert marks.observe(10) is Change.OPENED and marks.open
    assert marks.observe(30) is None and marks.open
    assert marks.observe(70) is Change.CLOSED
    assert marks.closings == 2
    assert marks.peak == 70


def test_each_change_is_reported_once() -> None:
    marks = WaterMarks(high=5, low=2)
    changes = [marks.observe(n) for n in (5, 6, 7, 5, 2, 1, 0, 3)]
    assert [c for c in changes if c] == [Change.CLOSED, Change.OPENED]


def test_room_bounds_one_take_to_what_fits_below_the_mark() -> None:
    marks = WaterMarks(high=50, low=10)
    assert marks.room(0, 200) == 50  # a take never brings more than the mark holds
    assert marks.room(10, 20) == 20  # far from the mark: a full batch
    assert marks.room(45, 200) == 5
    assert marks.room(49, 200) == 1
    marks.observe(50)
    assert marks.room(50, 200) == 0  # closed: nothing
    assert marks.room(10, 200) == 0  # still closed until observed at low water
    marks.observe(10)
    assert marks.room(10, 200) == 40


def test_open_past_the_mark_still_takes_one() -> None:
    """An overshoot observed while open (a fan-out) closes at the next observation;
    room never says a negative number of items."""
    marks = WaterMarks(high=50, low=10)
    assert marks.room(80, 200) == 1
    assert marks.observe(80) is Change.CLOSED
    assert marks.room(80, 200) == 0


def test_zero_high_water_turns_it_off() -> None:
    marks = WaterMarks(high=0, low=0)
    assert not marks.enabled
    assert all(marks.observe(n) is None for n in (0, 10**6, 0))
    assert marks.open
    assert marks.room(10**6, 200) == 200


@pytest.mark.parametrize(("high", "low"), [(10, 10), (10, 20), (-1, 0), (10, -1)])
def test_marks_that_make_no_sense_are_refused(high: int, low: int) -> None:
    with pytest.raises(ValueError, match="SENDSCRIPT_"):
        WaterMarks(high=high, low=low)


# -- on the bus ------------------------------------------------------------------------

class Held:
    """The count the master would read (board queued + delay heap), set by the test."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n


def wired(high: int = 50, low: int = 10) -> tuple[Backpressure, Bus, Held, list[Incident]]:
    bus, held, incidents = Bus(), Held(), []
    bus.subscribe(Incident, incidents.append)
    settings = Settings(master_id="m1", high_water=high, low_water=low)
    backpressure = Backpressure(settings, bus, held)
    bus.attach(backpressure)
    return backpressure, bus, held, incidents


def test_events_close_and_reopen_with_one_incident_each_way() -> None:
    bp, bus, held, incidents = wired()
    held.n = 50
    bus.emit(TasksQueued([]))
    assert not bp.open.is_set()
    held.n = 60
    bus.emit(TasksQueued([]))  # still above: no second announcement
    held.n = 11
    bus.emit(TasksWithdrawn([], "test"))
    assert not bp.open.is_set()
    held.n = 10
    bus.emit(TasksWithdrawn([], "test"))
    assert bp.open.is_set()
    assert [(i.kind, i.key, i.active) for i in incidents] == [
        (HIGH_WATER, "m1", True), (HIGH_WATER, "m1", False)]
    report = bp.report()
    assert report["state"] == "open" and report["throttled_times"] == 1
    assert report["peak_held"] == 60 and report["high_water"] == 50


async def test_wait_open_returns_when_reopened_or_stopped() -> None:
    bp, bus, held, _ = wired()
    stop = asyncio.Event()
    held.n = 50
    waiting = asyncio.create_task(bp.wait_open(stop))
    await asyncio.sleep(0)
    assert not waiting.done() and bp.report()["state"] == "throttled"
    held.n = 5
    bus.emit(TasksQueued([]))
    assert await asyncio.wait_for(waiting, 1) is True

    held.n = 80
    waiting = asyncio.create_task(bp.wait_open(stop))
    await asyncio.sleep(0)
    assert not waiting.done()
    stop.set()  # a throttled intake still notices the stop
    assert await asyncio.wait_for(waiting, 1) is False
