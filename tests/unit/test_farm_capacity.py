"""The simulated farm's hidden capacity: a sliding window of accepted sends, 429 with a
Retry-After above it."""

from __future__ import annotations

import time

from sendscript.dev.simulator import Farm, FarmConfig


def body(i: int) -> dict[str, str]:
    return {"deviceId": f"d{i}", "taskId": f"t{i}", "recordId": f"r{i}", "script": "s"}


def test_no_capacity_never_throttles() -> None:
    farm = Farm(FarmConfig())
    assert all(farm.accept(body(i))[0] == 200 for i in range(200))
    assert farm.over_capacity(time.time()) is None


def test_sends_above_capacity_in_any_window_get_429_with_retry_after() -> None:
    farm = Farm(FarmConfig(capacity=5))
    answers = [farm.accept(body(i)) for i in range(8)]
    assert [status for status, _, _ in answers] == [200] * 5 + [429] * 3
    assert all(payload["retry_after_s"] == 1.0 for _, payload, _ in answers[5:])
    assert farm.counters["throttled"] == 3 and farm.counters["accepted"] == 5
    assert [t.task_id for t in farm.throttles] == ["t5", "t6", "t7"]
    # The window slides: room again once the oldest accept is a window old, not before.
    first = farm.window[0]
    assert farm.over_capacity(first + 0.999) is not None
    assert farm.over_capacity(first + 1.0) is None


def test_capacity_and_retry_after_change_while_running() -> None:
    farm = Farm(FarmConfig(capacity=2, retry_after_s=3))
    statuses = [farm.accept(body(i))[0] for i in range(3)]
    assert statuses == [200, 200, 429] and farm.throttles[0].retry_after_s == 3
    farm.config = FarmConfig(capacity=4)
    assert [farm.accept(body(i))[0] for i in range(3, 6)] == [200, 200, 429]


def test_retry_after_is_the_wait_for_room_in_whole_seconds() -> None:
    farm = Farm(FarmConfig(capacity=0.4, capacity_window_s=2.5))  # 1 a window
    farm.window.append(100.0)
    assert farm.over_capacity(100.2) == 3.0  # 2.3 s to room: rounded up
    assert farm.over_capacity(102.2) == 1.0
    assert farm.over_capacity(102.5) is None
