"""OutageLog and Backoff: an outage is logged once when it starts and once when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from loguru import logger

from sendscript.backoff import Backoff, OutageLog


class Captured:
    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def sink(self, message: object) -> None:
        record = message.record  # type: ignore[attr-defined]
        self.records.append((record["level"].name, record["message"]))

    def at(self, *levels: str) -> list[str]:
        return [text for level, text in self.records if level in levels]


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    handler = logger.add(captured.sink, level="DEBUG", format="{message}")
    yield captured
    logger.remove(handler)


def test_down_once_and_back_once(logs: Captured) -> None:
    outage = OutageLog("redis")
    for n in range(5):
        outage.failed(ConnectionError(f"refused {n}"))
    assert outage.failures == 5
    assert logs.at("WARNING") == [
        "redis: ConnectionError('refused 0'); retrying with backoff until it answers"]
    assert len(logs.at("DEBUG")) == 4, "the failures in between are quiet (debug only)"
    assert logs.at("INFO") == []

    outage.ok()
    outage.ok()
    [back] = logs.at("INFO")
    assert back.startswith("redis: recovered after 5 failed tries (")
    assert outage.failures == 0 and outage.since is None
    assert len(logs.at("WARNING")) == 1


def test_success_without_an_outage_says_nothing(logs: Captured) -> None:
    outage = OutageLog("mongo")
    outage.ok()
    assert logs.records == []


def test_a_second_outage_is_logged_again(logs: Captured) -> None:
    outage = OutageLog("pulsar")
    outage.failed(TimeoutError("a"))
    outage.ok()
    outage.failed(TimeoutError("b"))
    outage.failed(TimeoutError("c"))
    outage.ok()
    assert [m.split(";")[0] for m in logs.at("WARNING")] == [
        "pulsar: TimeoutError('a')", "pulsar: TimeoutError('b')"]
    assert [m.split(" (")[0] for m in logs.at("INFO")] == [
        "pulsar: recovered after 1 failed tries", "pulsar: recovered after 2 failed tries"]


def test_outage_duration_is_measured_from_the_first_failure(logs: Captured) -> None:
    outage = OutageLog("redis")
    outage.failed(OSError("x"))
    assert outage.since is not None
    outage.since -= 3.0  # as if the first failure were three seconds ago
    outage.failed(OSError("y"))
    outage.ok()
    [back] = logs.at("INFO")
    assert back.endswith("(3.0s)")


async def test_backoff_logs_each_what_once_and_counts_the_worst(logs: Captured) -> None:
    backoff = Backoff(base_s=0.001, cap_s=0.005)
    for _ in range(3):
        await backoff.failed("intake", ConnectionError("down"))
    await backoff.failed("sweeps", ConnectionError("down"))
    assert backoff.failures == 3
    assert [m.split(":")[0] for m in logs.at("WARNING")] == ["intake", "sweeps"]

    backoff.succeeded("intake")
    assert backoff.failures == 1
    backoff.succeeded("sweeps")
    backoff.succeeded("never-failed")
    assert backoff.failures == 0
    assert [m.split(":")[0] for m in logs.at("INFO")] == ["intake", "sweeps"]


async def test_backoff_sleeps_are_capped() -> None:
    backoff = Backoff(base_s=0.01, cap_s=0.02)
    started = time.monotonic()
    for _ in range(10):  # uncapped, the tenth alone would wait 5 s
        await backoff.failed("x", OSError("down"))
    assert time.monotonic() - started < 1.0
