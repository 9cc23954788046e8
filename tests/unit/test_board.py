"""DeviceBoard: per-device queues, one task in flight per device, lock fences."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from master.board import DeviceBoard
from sendscript.models import Task

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
_ids = itertools.count(1)


def task(device: str, priority: int = 5, age_s: float = 0.0, task_id: str | None = None) -> Task:
    """A pending task; larger `age_s` = created earlier."""
    return Task(_id=task_id or f"t{next(_ids)}", device_id=device, script={"id": "s"},
                priority=priority, created_at=T0 - timedelta(seconds=age_s))


def board_with(*tasks: Task) -> DeviceBoard:
    board = DeviceBoard()
    for t in tasks:
        assert board.add(t)
    return board


def take(board: DeviceBoard) -> Task:
    t = board.next()
    assert t is not None
    return t


# -- ordering ----------------------------------------------------------------------------
def test_per_device_priority_desc_then_older_first() -> None:
    low = task("d", priority=1, age_s=100)
    high = task("d", priority=9, age_s=0)
    mid_new = task("d", priority=5, age_s=1)
    mid_old = task("d", priority=5, age_s=50)
    board = board_with(low, mid_new, high, mid_old)
    order = []
    for _ in range(4):
        t = take(board)
        order.append(t.id)
        board.finished("d")
    assert order == [high.id, mid_old.id, mid_new.id, low.id]
    assert board.next() is None


def test_same_priority_same_age_keeps_insertion_order() -> None:
    a, b, c = task("d"), task("d"), task("d")
    board = board_with(a, b, c)
    order = []
    for _ in range(3):
        order.append(take(board).id)
        board.finished("d")
    assert order == [a.id, b.id, c.id]


def test_across_devices_head_priority_then_oldest() -> None:
    a = task("A", priority=3, age_s=100)
    b = task("B", priority=7, age_s=1)
    c = task("C", priority=7, age_s=10)
    board = board_with(a, b, c)
    assert [take(board).id for _ in range(3)] == [c.id, b.id, a.id]
    assert board.next() is None


def test_across_devices_uses_current_head_after_higher_task_arrives() -> None:
    a = task("A", priority=6)
    b = task("B", priority=5)
    board = board_with(a, b)
    urgent = task("B", priority=10)
    board.add(urgent)
    assert take(board).id == urgent.id
    assert take(board).id == a.id
    assert board.next() is None  # B's other task waits for B


# -- one in flight per device -------------------------------------------------------------
def test_one_task_in_flight_per_device() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    assert take(board).id == t1.id
    assert board.next() is None
    assert board.devices["d"].inflight is t1
    board.finished("d")
    assert take(board).id == t2.id


def test_other_devices_go_while_one_is_in_flight() -> None:
    t1, t2, t3 = task("A", priority=9), task("A", priority=8), task("B", priority=1)
    board = board_with(t1, t2, t3)
    assert take(board).id == t1.id
    assert take(board).id == t3.id
    assert board.next() is None


# -- sent / freed and fences ---------------------------------------------------------------
def test_sent_holds_device_until_freed_with_same_fence() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.sent("d", 5)
    assert board.next() is None
    assert board.freed("d", 4) is False  # an older lock of the device
    assert board.next() is None
    assert board.freed("d", 5) is True
    assert take(board).id == t2.id


def test_freed_with_newer_fence_frees_held_device() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.sent("d", 5)
    assert board.freed("d", 9) is True
    assert take(board).id == t2.id


def test_freed_before_sent_leaves_device_free() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    assert board.freed("d", 7) is False  # still in flight: not free yet
    assert board.next() is None
    board.sent("d", 7)
    assert board.devices["d"].held_fence is None
    assert take(board).id == t2.id


def test_older_freed_before_sent_still_holds() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.freed("d", 6)
    board.sent("d", 7)
    assert board.next() is None
    assert board.freed("d", 7) is True
    assert take(board).id == t2.id


def test_repeated_old_freed_event_does_not_free_a_newer_hold() -> None:
    t1, t2, t3 = task("d", age_s=3), task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2, t3)
    take(board)
    board.sent("d", 5)
    assert board.freed("d", 5)
    assert take(board).id == t2.id
    board.sent("d", 6)
    assert board.freed("d", 5) is False  # duplicate delivery of the first event
    assert board.next() is None
    assert board.freed("d", 6) is True
    assert take(board).id == t3.id


def test_freed_for_unknown_device_is_ignored() -> None:
    board = DeviceBoard()
    assert board.freed("nobody", 3) is False
    assert board.devices == {}


def test_freed_on_free_device_reports_no_change() -> None:
    board = board_with(task("d"))
    assert board.freed("d", 1) is False
    assert board.next() is not None


# -- busy / lock_gone ------------------------------------------------------------------------
def test_busy_blocks_until_freed_and_keeps_task_first() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.busy(t1)
    assert board.contains(t1.id)
    assert board.queued == 2
    assert board.next() is None
    assert board.waiting_on_locks() == ["d"]
    assert board.freed("d", 123) is True
    assert take(board).id == t1.id


def test_busy_blocks_until_lock_gone() -> None:
    t1 = task("d")
    board = board_with(t1)
    take(board)
    board.busy(t1)
    assert board.next() is None
    assert board.lock_gone("d") is True
    assert take(board).id == t1.id


def test_lock_gone_frees_a_held_device() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.sent("d", 4)
    assert board.lock_gone("d") is True
    assert take(board).id == t2.id


def test_lock_gone_ignored_while_in_flight() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    assert board.lock_gone("d") is False
    assert board.next() is None
    assert board.lock_gone("unknown") is False


# -- errors -----------------------------------------------------------------------------------
def test_failed_to_start_cools_down_until_wake() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.failed_to_start(t1)
    assert board.next() is None
    assert board.freed("d", 99) is False  # a lock event does not end a cool-down
    assert board.next() is None
    assert board.waiting_on_locks() == []
    board.wake("d")
    assert take(board).id == t1.id


def test_wake_on_device_not_cooling_changes_nothing() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.wake("d")
    assert board.next() is None
    board.wake("unknown")
    assert "unknown" not in board.devices


def test_lost_with_task_puts_it_back_first() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.lost(t1, "d")
    assert take(board).id == t1.id


def test_lost_without_task_frees_device_for_next() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    take(board)
    board.lost(None, "d")
    assert take(board).id == t2.id
    assert not board.contains(t1.id)


def test_put_back_goes_ahead_of_equal_queued_peers() -> None:
    # Same priority and creation time: only the put-back order can decide.
    t1, t2, t3 = task("d"), task("d"), task("d")
    board = board_with(t1, t2)
    take(board)
    board.add(t3)
    board.lost(t1, "d")
    assert [take(board).id, *_rest(board)] == [t1.id, t2.id, t3.id]


def test_put_back_respects_higher_priority_peer() -> None:
    t1 = task("d", priority=5)
    board = board_with(t1)
    take(board)
    urgent = task("d", priority=9)
    board.add(urgent)
    board.lost(t1, "d")
    assert take(board).id == urgent.id


def test_put_back_of_queued_task_is_a_no_op() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    board.put_back(t2)
    assert board.queued == 2
    assert [take(board).id, *_rest(board)] == [t1.id, t2.id]


def _rest(board: DeviceBoard) -> list[str]:
    out = []
    for device_id in list(board.devices):
        board.finished(device_id)
    while (t := board.next()) is not None:
        out.append(t.id)
        board.finished(t.device_id)
    return out


# -- duplicates, drain, views -----------------------------------------------------------------
def test_add_refuses_duplicates_queued_or_in_flight() -> None:
    t1 = task("d")
    board = DeviceBoard()
    assert board.add(t1) is True
    assert board.add(t1) is False
    assert board.queued == 1
    take(board)
    assert board.add(t1) is False
    assert board.queued == 0
    assert board.next() is None


def at_attempt(t: Task, attempt: int) -> Task:
    """The same task as Mongo holds it later: pending again after `attempt` attempts."""
    return t.model_copy(update={"attempt": attempt})


def test_add_of_a_newer_attempt_replaces_a_stale_queued_copy() -> None:
    # Two masters held the task (a push the Redis failover kept, a dead master's
    # hand-back); the other one ran attempt 1, which failed and was retried: its fire
    # here must not be refused for the copy of attempt 0 still queued, which can only
    # go stale (its claim names attempt 0).
    t = task("d")
    board = board_with(t)
    assert board.add(at_attempt(t, 1)) is False  # queued already: replaced, not added
    assert board.queued == 1
    assert take(board).attempt == 1
    assert board.add(t) is False  # an older copy never replaces a newer one
    board.finished("d")
    assert board.next() is None


def test_add_of_a_newer_attempt_while_a_stale_copy_is_in_flight_goes_next() -> None:
    t = task("d")
    board = board_with(t)
    take(board)  # attempt 0 in flight: its claim will find attempt 1 and answer stale
    assert board.add(at_attempt(t, 1)) is False
    assert board.add(at_attempt(t, 1)) is False
    board.finished("d")
    again = take(board)
    assert (again.id, again.attempt) == (t.id, 1)
    board.finished("d")
    assert board.next() is None


@pytest.mark.parametrize("ending", ["busy", "failed_to_start", "lost"])
def test_a_put_back_keeps_the_newer_attempt_that_came_in_flight(ending: str) -> None:
    t = task("d")
    board = board_with(t)
    take(board)
    board.add(at_attempt(t, 2))
    if ending == "lost":
        board.lost(t, "d")
    else:
        getattr(board, ending)(t)
        board.lock_gone("d")
        board.wake("d")
    assert take(board).attempt == 2
    assert board.queued == 0


def test_same_attempt_in_flight_is_not_queued_twice() -> None:
    t = task("d")
    board = board_with(t)
    take(board)
    assert board.add(t) is False
    board.sent("d", 7)
    board.freed("d", 7)
    assert board.next() is None


def test_drain_takes_every_queued_task_and_empties_board() -> None:
    a1, a2, b1 = task("A", age_s=2), task("A", age_s=1), task("B")
    board = board_with(a1, a2, b1)
    assert take(board).id == a1.id  # in flight: not drained
    drained = board.drain()
    assert {t.id for t in drained} == {a2.id, b1.id}
    assert board.queued == 0
    assert not board.contains(a2.id)
    assert list(board.queued_tasks()) == []
    assert board.next() is None
    assert set(board.devices) == {"A"}  # the in-flight device is still known
    board.finished("A")
    assert board.devices == {}
    assert board.next() is None


def test_waiting_on_locks_lists_held_and_blocked_devices_with_work() -> None:
    board = board_with(
        task("held", age_s=2), task("held", age_s=1),
        task("blocked", age_s=2), task("blocked", age_s=1),
        task("held-empty"),
        task("inflight", age_s=2), task("inflight", age_s=1),
        task("queued", priority=0),
    )
    dispatched = {t.device_id: t for t in (take(board) for _ in range(4))}
    assert set(dispatched) == {"held", "blocked", "held-empty", "inflight"}
    board.sent("held", 1)
    board.sent("held-empty", 2)
    board.busy(dispatched["blocked"])
    assert sorted(board.waiting_on_locks()) == ["blocked", "held"]
    assert board.held_devices == 4  # held, held-empty, blocked, inflight


def test_idle_devices_are_forgotten() -> None:
    t1 = task("d")
    board = board_with(t1)
    take(board)
    board.finished("d")
    assert board.devices == {}
    t2 = task("d")
    board.add(t2)
    take(board)
    board.sent("d", 3)
    assert "d" in board.devices and board.held_devices == 1
    board.freed("d", 3)
    assert board.devices == {}
    assert board.held_devices == 0


# -- queue caps: a capped queue's device is skipped, not lost -------------------------------
def qtask(device: str, queue: str, priority: int = 5, age_s: float = 0.0) -> Task:
    t = task(device, priority=priority, age_s=age_s)
    t.queue = queue
    return t


def test_cap_skips_a_device_without_losing_it() -> None:
    a, b = qtask("A", "vip", priority=9), qtask("B", "vip", priority=8)
    board = DeviceBoard(caps={"vip": 1})
    board.add(a)
    board.add(b)
    assert take(board) is a
    assert board.next() is None
    assert board.contains(b.id)
    assert board.running_by_queue["vip"] == 1
    board.finished("A")
    assert board.running_by_queue["vip"] == 0
    assert take(board) is b


def test_capped_queue_does_not_block_other_queues() -> None:
    a, b = qtask("A", "vip", priority=9), qtask("B", "vip", priority=8)
    c = qtask("C", "default", priority=1)
    board = board_with_caps({"vip": 1}, a, b, c)
    assert take(board) is a
    assert take(board) is c  # B is skipped, C of another queue goes
    assert board.next() is None
    board.finished("A")
    assert take(board) is b


def test_cap_counts_a_sent_task_until_its_device_is_freed() -> None:
    a, b = qtask("A", "vip"), qtask("B", "vip")
    board = board_with_caps({"vip": 1}, a, b)
    take(board)
    board.sent("A", 5)
    assert board.next() is None
    assert board.freed("A", 5) is True
    assert take(board) is b


def test_cap_slot_freed_when_free_event_came_before_sent() -> None:
    a, b = qtask("A", "vip"), qtask("B", "vip")
    board = board_with_caps({"vip": 1}, a, b)
    take(board)
    board.freed("A", 5)
    board.sent("A", 5)
    assert board.running_by_queue["vip"] == 0
    assert take(board) is b


@pytest.mark.parametrize(
    ("ending", "then"),
    [("busy", "B"), ("failed_to_start", "B"), ("lost", "A"), ("lost_none", "B")],
)
def test_cap_slot_freed_by_every_ending(ending: str, then: str) -> None:
    # After `lost` with the task, A's task is back first and free to go again.
    a, b = qtask("A", "vip"), qtask("B", "vip")
    board = board_with_caps({"vip": 1}, a, b)
    take(board)
    if ending == "busy":
        board.busy(a)
    elif ending == "failed_to_start":
        board.failed_to_start(a)
    elif ending == "lost":
        board.lost(a, "A")
    else:
        board.lost(None, "A")
    assert board.running_by_queue["vip"] == 0
    assert take(board).device_id == then
    assert board.next() is None  # the cap holds again


def test_cap_of_two_allows_two_devices() -> None:
    ts = [qtask(d, "bulk") for d in ("A", "B", "C")]
    board = board_with_caps({"bulk": 2}, *ts)
    assert {take(board).device_id, take(board).device_id} == {"A", "B"}
    assert board.next() is None


def test_no_cap_means_no_limit() -> None:
    ts = [qtask(f"d{i}", "bulk") for i in range(5)]
    board = board_with_caps({"other": 1}, *ts)
    assert len({take(board).id for _ in range(5)}) == 5


def board_with_caps(caps: dict[str, int], *tasks: Task) -> DeviceBoard:
    board = DeviceBoard(caps=caps)
    for t in tasks:
        assert board.add(t)
    return board


# -- remove ----------------------------------------------------------------------------------
def test_remove_takes_a_queued_task_off() -> None:
    t1, t2, t3 = task("d", age_s=3), task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2, t3)
    assert board.remove(t2.id) is t2
    assert not board.contains(t2.id)
    assert board.queued == 2
    assert [take(board).id, *_rest(board)] == [t1.id, t3.id]


def test_remove_head_lets_the_next_one_go() -> None:
    t1, t2 = task("d", age_s=2), task("d", age_s=1)
    board = board_with(t1, t2)
    assert board.remove(t1.id) is t1
    assert take(board) is t2


def test_remove_last_task_forgets_device() -> None:
    t1 = task("d")
    board = board_with(t1)
    assert board.remove(t1.id) is t1
    assert board.devices == {}
    assert board.next() is None


def test_remove_unknown_or_in_flight_is_none() -> None:
    t1 = task("d")
    board = board_with(t1)
    assert board.remove("nope") is None
    take(board)
    assert board.remove(t1.id) is None


def test_stale_ready_entry_does_not_lend_priority_to_a_lower_head() -> None:
    urgent, low = task("A", priority=9), task("A", priority=1)
    mid = task("B", priority=5)
    board = board_with(urgent, low)
    assert take(board) is urgent
    board.lost(urgent, "A")  # back at A's head, announced ready
    assert take(board) is urgent
    board.finished("A")  # A's head is now the low task
    board.add(mid)
    assert take(board) is mid
    assert take(board) is low


def test_ready_counts_free_devices_with_a_task_not_busy_ones() -> None:
    board = board_with(task("a"), task("a"), task("b"), task("c"))
    assert (board.queued, board.ready) == (4, 3)
    first = take(board)  # its device is in flight: its second task cannot go
    assert (board.queued, board.ready) == (3, 2)
    board.sent(first.device_id, 7)
    assert board.ready == 2  # held by our lock until the fence is freed
    assert board.freed(first.device_id, 7)
    assert board.ready == 3
    while board.next() is not None:
        pass
    assert board.ready == 0
