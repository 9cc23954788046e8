"""The pure part of reconciling held tasks: a task counts as off the board only once
it was missing on looks at least the grace apart; and what the board says it holds."""

from __future__ import annotations

from master.board import DeviceBoard
from master.reconcile import Suspects
from sendscript.models import Task


def test_a_task_is_sure_only_after_the_grace_missing_on_every_look() -> None:
    s = Suspects()
    assert s.look(["a", "b"], now=100.0, grace_s=30) == []
    assert s.look(["a", "b"], now=120.0, grace_s=30) == []
    assert s.look(["a", "b", "c"], now=130.0, grace_s=30) == ["a", "b"]
    # b was found on the board on one look: it starts over.
    assert s.look(["a", "c"], now=140.0, grace_s=30) == ["a"]
    assert s.look(["a", "b", "c"], now=160.0, grace_s=30) == ["a", "c"]
    s.forget(["a", "c"])
    assert s.look(["a", "b"], now=161.0, grace_s=30) == []
    assert s.since == {"a": 161.0, "b": 160.0}


def test_no_grace_is_sure_at_the_first_look() -> None:
    assert Suspects().look(["x"], now=5.0, grace_s=0) == ["x"]


def test_the_board_holds_queued_in_flight_and_following_copies() -> None:
    board = DeviceBoard()
    first = Task(_id="t1", device_id="d1", script={"id": "s"})
    queued = Task(_id="t2", device_id="d1", script={"id": "s"})
    assert board.add(first) and board.add(queued)
    assert board.next() is first  # in flight now
    newer = first.model_copy(update={"attempt": 1})
    assert not board.add(newer)  # follows its in-flight copy
    assert board.holds("t1") and board.holds("t2") and not board.holds("t3")
    assert not board.contains("t1")  # not queued
    board.finished("d1")
    board.drain()
    assert not board.holds("t2")
