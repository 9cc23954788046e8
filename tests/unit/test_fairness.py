"""Fair turns between flows (batches, queues) at one priority; priority still wins."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta

from master.board import DeviceBoard, flow_of
from master.fairness import FairReady
from sendscript.models import Task

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
_ids = itertools.count(1)


def task(device: str, *, batch: str | None = None, queue: str = "default", priority: int = 5,
         age_s: float = 0.0) -> Task:
    return Task(_id=f"t{next(_ids)}", device_id=device, script={"id": "s"}, priority=priority,
                batch_id=batch, queue=queue, created_at=T0 - timedelta(seconds=age_s))


def drain(board: DeviceBoard, n: int) -> list[Task]:
    out = []
    for _ in range(n):
        t = board.next()
        assert t is not None
        out.append(t)
    return out


def test_singles_behind_a_huge_fanout_start_within_a_few_dispatches() -> None:
    board = DeviceBoard()
    for i in range(20_000):  # pushed first, so older than every single task
        board.add(task(f"fan-{i}", batch="b1", age_s=10))
    for i in range(20):
        board.add(task(f"idle-{i}"))
    taken = drain(board, 40)
    singles = [t for t in taken if t.batch_id is None]
    assert len(singles) == 20  # every other dispatch
    assert Counter(flow_of(t) for t in taken) == {"batch:b1": 20, "queue:default": 20}


def test_priority_wins_over_fair_turns() -> None:
    board = DeviceBoard()
    for i in range(10):
        board.add(task(f"fan-{i}", batch="b1", priority=9))
    for i in range(5):
        board.add(task(f"single-{i}", priority=5))
    taken = drain(board, 15)
    assert [t.priority for t in taken] == [9] * 10 + [5] * 5


def test_within_a_flow_oldest_first() -> None:
    board = DeviceBoard()
    for i in range(5):
        board.add(task(f"d{i}", age_s=i))  # d4 is the oldest
    assert [t.device_id for t in drain(board, 5)] == ["d4", "d3", "d2", "d1", "d0"]


def test_queue_weights_share_the_turns() -> None:
    board = DeviceBoard(weights={"fast": 3.0})
    for i in range(300):
        board.add(task(f"f{i}", queue="fast"))
        board.add(task(f"s{i}", queue="slow"))
    shares = Counter(t.queue for t in drain(board, 200))
    assert shares["fast"] == 150 and shares["slow"] == 50


def test_three_batches_take_turns() -> None:
    board = DeviceBoard()
    for b in ("a", "b", "c"):
        for i in range(4):
            board.add(task(f"{b}{i}", batch=b, age_s={"a": 30, "b": 20, "c": 10}[b]))
    order = [t.batch_id for t in drain(board, 12)]
    assert order == ["a", "b", "c"] * 4


def test_a_late_flow_does_not_get_a_burst_for_its_idle_past() -> None:
    board = DeviceBoard()
    for i in range(100):
        board.add(task(f"a{i}", batch="a"))
    drain(board, 50)  # flow a alone for a while
    for i in range(10):
        board.add(task(f"b{i}", batch="b"))
    order = [t.batch_id for t in drain(board, 20)]
    assert order.count("b") == 10 and order.count("a") == 10  # alternate, no catch-up run


def test_stale_entries_are_skipped() -> None:
    ready = FairReady()
    ready.push("f", (-5, 1.0, 1), "d1")
    ready.push("f", (-5, 2.0, 2), "d2")
    ready.push("g", (-5, 0.0, 3), "d3")
    gone = {"d1", "d3"}
    popped = ready.pop(lambda key, device: device not in gone)
    assert popped is not None and popped[2] == "d2"
    assert ready.pop(lambda key, device: device not in gone) is None
    assert len(ready) == 0


def test_higher_priority_arrival_in_a_listed_flow_goes_first() -> None:
    ready = FairReady()
    ready.push("f", (-5, 1.0, 1), "d1")
    ready.push("g", (-5, 1.0, 2), "d2")
    ready.push("f", (-9, 2.0, 3), "d3")
    first = ready.pop(lambda key, device: True)
    assert first is not None and first[2] == "d3"
