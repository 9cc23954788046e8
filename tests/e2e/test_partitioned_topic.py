"""Two consumer processes on a partitioned task-log topic, on an embedded broker of
this test's own: pulsar-lite partitions topics only broker-wide (`default_partitions`
in its config), so the session's broker, whose topics are not partitioned, is left
alone. Every result is applied once, and both consumers apply some."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pulsar
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers, PulsarServer
from sendscript.settings import Settings
from tests.e2e.test_consumer_crash import (
    assert_every_task_succeeded_once,
    consumer_entry,
    spec,
    start_consumer,
)
from tests.support import Inspect, Roles, unique_settings, wait_for

pytestmark = pytest.mark.e2e

PARTITIONS = 3


@pytest.fixture
def partitioned_broker(tmp_path: Path) -> Iterator[PulsarServer]:
    broker = PulsarServer(tmp_path / "partitioned", default_partitions=PARTITIONS)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def partitioned(servers: EmbeddedServers, partitioned_broker: PulsarServer) -> Settings:
    return unique_settings(servers, pulsar_url=partitioned_broker.url)


def partitions(settings: Settings) -> list[str]:
    client = pulsar.Client(settings.pulsar_url or "", operation_timeout_seconds=10)
    try:
        return list(client.get_topic_partitions(settings.task_log_topic))
    finally:
        client.close()


def test_two_consumers_on_a_partitioned_topic_apply_every_result_once(
    partitioned: Settings, tmp_path: Path,
) -> None:
    settings, n = partitioned, 300
    roles = Roles(settings, tmp_path / "logs")
    inspect = Inspect(settings)
    try:
        roles.simulator(run_ms=20)
        first = start_consumer(roles, inspect, "consumer-a")
        second = start_consumer(roles, inspect, "consumer-b")
        # The broker made the topic with its partitions when the first consumer named it.
        assert partitions(settings) == [f"{settings.task_log_topic}-partition-{i}"
                                        for i in range(PARTITIONS)]
        roles.master()
        with SendScriptClient(settings) as client:
            client.submit_many([spec(f"dev-{i % 30:02d}", i) for i in range(n)])
        wait_for(lambda: inspect.count("success") == n, 180, f"{n} successes", interval_s=0.5)
        assert first.running and second.running, roles.logs()
        wait_for(lambda: all((consumer_entry(inspect, c) or {}).get("saved", 0) > 0
                             for c in (first, second)), 20, "both consumers to have saved logs")
        assert_every_task_succeeded_once(settings, roles, inspect, n)

        def applied() -> list[int]:  # the heartbeats carry each process's counters
            return [(consumer_entry(inspect, c) or {}).get("applied", 0) for c in (first, second)]

        # Each result moved its task once in all: a result applied by both consumers
        # would count twice (the second's compare-and-set finds the task done).
        wait_for(lambda: sum(applied()) >= n, 20, "the consumers' counters")
        assert all(applied()) and sum(applied()) == n, applied()
    except BaseException:
        print(roles.logs())
        raise
    finally:
        roles.stop()
        inspect.close()
