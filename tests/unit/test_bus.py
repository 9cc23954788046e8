"""The master's event seam: delivery, isolation of failing subscribers, gates."""

from __future__ import annotations

from datetime import timedelta

from master.bus import GO, Bus, Drop, Go, Hold, Verdict
from master.events import DeviceFreed, TasksTaken
from master.expiry import EXPIRED, Expiry
from sendscript.models import Task, utcnow
from sendscript.settings import Settings


def task(**fields: object) -> Task:
    return Task.model_validate({"_id": "t1", "device_id": "d1", "script": {"id": "s"},
                                **fields})


def test_events_reach_subscribers_of_their_type_in_order() -> None:
    bus = Bus()
    seen: list[str] = []
    bus.subscribe(TasksTaken, lambda e: seen.append(f"a:{e.source}"))
    bus.subscribe(TasksTaken, lambda e: seen.append(f"b:{e.source}"))
    bus.subscribe(DeviceFreed, lambda e: seen.append(f"free:{e.device_id}"))
    bus.emit(TasksTaken([task()], "intake"))
    bus.emit(DeviceFreed("d9", 7, "event"))
    assert seen == ["a:intake", "b:intake", "free:d9"]
    assert bus.emitted == {"TasksTaken": 1, "DeviceFreed": 1}


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    bus = Bus()
    seen: list[int] = []

    def broken(_: TasksTaken) -> None:
        raise RuntimeError("bug in a subscriber")

    bus.subscribe(TasksTaken, broken)
    bus.subscribe(TasksTaken, lambda e: seen.append(len(e.tasks)))
    bus.emit(TasksTaken([task(), task(_id="t2")], "intake"))
    assert seen == [2]


class Fixed:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.asked = 0

    def admit(self, task: Task, now: object) -> Verdict:
        self.asked += 1
        return self.verdict


class Broken:
    def admit(self, task: Task, now: object) -> Verdict:
        raise ValueError("gate bug")


def test_no_gate_means_go() -> None:
    assert isinstance(Bus().admit(task(), utcnow()), Go)


def test_the_first_gate_that_does_not_say_go_decides() -> None:
    bus = Bus()
    first, hold, drop = Fixed(GO), Fixed(Hold("paused", 0.5)), Fixed(Drop("expired"))
    for gate in (first, hold, drop):
        bus.add_gate(gate)
    verdict = bus.admit(task(), utcnow())
    assert verdict == Hold("paused", 0.5)
    assert (first.asked, hold.asked, drop.asked) == (1, 1, 0)


def test_a_failing_gate_holds_the_task_rather_than_sending_it() -> None:
    bus = Bus()
    bus.add_gate(Broken())
    after = Fixed(GO)
    bus.add_gate(after)
    verdict = bus.admit(task(), utcnow())
    assert isinstance(verdict, Hold)
    assert after.asked == 0


def test_expiry_gate_drops_a_task_past_its_deadline_only() -> None:
    bus = Bus()
    settings = Settings(queue_max_wait={"bulk": 60})
    bus.add_gate(Expiry(settings, bus, None, None, None).gate)  # type: ignore[arg-type]
    now = utcnow()
    assert isinstance(bus.admit(task(expire_at=now + timedelta(seconds=5)), now), Go)
    assert bus.admit(task(expire_at=now - timedelta(seconds=1)), now) == Drop(EXPIRED)
    stale = task(queue="bulk", run_at=now - timedelta(seconds=61))
    assert bus.admit(stale, now) == Drop(EXPIRED)
    fresh = task(queue="bulk", run_at=now - timedelta(seconds=59))
    assert isinstance(bus.admit(fresh, now), Go)
