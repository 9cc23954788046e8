"""select_worker: which worker gets a device's task."""

from __future__ import annotations

from dataclasses import dataclass, field

from master.balancer import select_worker


@dataclass
class Worker:
    name: str
    load: int = 0
    capacity: int = 4
    devices: dict[str, int] = field(default_factory=dict)

    def device_load(self, device_id: str) -> int:
        return self.devices.get(device_id, 0)


def test_none_when_there_are_no_workers() -> None:
    assert select_worker([], "d") is None


def test_none_when_all_workers_are_full() -> None:
    workers = [Worker("a", load=4), Worker("b", load=2, capacity=2)]
    assert select_worker(workers, "d") is None


def test_least_loaded_when_no_worker_holds_the_device() -> None:
    workers = [Worker("a", load=3), Worker("b", load=1), Worker("c", load=2)]
    assert select_worker(workers, "d") is workers[1]


def test_prefers_worker_without_the_device_even_if_more_loaded() -> None:
    workers = [
        Worker("a", load=1, devices={"d": 1}),
        Worker("b", load=3, devices={"x": 3}),
    ]
    assert select_worker(workers, "d") is workers[1]


def test_full_worker_is_skipped_even_if_least_loaded_choice() -> None:
    workers = [Worker("a", load=2, capacity=2), Worker("b", load=3, capacity=10)]
    assert select_worker(workers, "d") is workers[1]


def test_all_hold_device_then_fewest_tasks_of_device() -> None:
    workers = [
        Worker("a", load=1, devices={"d": 2}),
        Worker("b", load=3, devices={"d": 1}),
    ]
    assert select_worker(workers, "d") is workers[1]


def test_tie_on_device_tasks_broken_by_load() -> None:
    workers = [
        Worker("a", load=3, devices={"d": 1}),
        Worker("b", load=2, devices={"d": 1}),
        Worker("c", load=1, devices={"d": 2}),
    ]
    assert select_worker(workers, "d") is workers[1]


def test_untouched_worker_must_have_room() -> None:
    workers = [
        Worker("full", load=4, capacity=4),
        Worker("holder", load=1, devices={"d": 1}),
    ]
    assert select_worker(workers, "d") is workers[1]


def test_equal_choice_is_the_first_listed() -> None:
    workers = [Worker("a", load=1), Worker("b", load=1)]
    assert select_worker(workers, "d") is workers[0]
