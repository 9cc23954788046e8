"""The Pulsar client options on the embedded broker: the consumer's subscription
with its dead-letter policy sends a log nacked past the redelivery cap to the
dead-letter topic; a multi-broker service URL connects."""

from __future__ import annotations

import time

import pulsar

from sendscript import connect
from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings


def test_a_log_nacked_past_the_cap_goes_to_the_dead_letters(settings: Settings) -> None:
    settings.pulsar_max_redeliveries = 2
    url = settings.pulsar_url or ""
    client = pulsar.Client(url, **connect.pulsar_kwargs(settings),
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    try:
        dead = client.subscribe(settings.redelivery_dlq_topic, "check",
                                initial_position=pulsar.InitialPosition.Earliest)
        consumer = client.subscribe(
            settings.task_log_topic, settings.task_log_subscription,
            consumer_type=pulsar.ConsumerType.Shared, negative_ack_redelivery_delay_ms=100,
            initial_position=pulsar.InitialPosition.Earliest,
            dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(
                settings.pulsar_max_redeliveries, settings.redelivery_dlq_topic))
        producer = client.create_producer(settings.task_log_topic)
        producer.send(b'{"poison": true}')
        deliveries, got = 0, None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline and deliveries <= 10:
            try:
                msg = consumer.receive(timeout_millis=200)
                deliveries += 1
                consumer.negative_acknowledge(msg)
            except pulsar.Timeout:
                pass
            try:
                got = dead.receive(timeout_millis=50)
            except pulsar.Timeout:
                pass
        assert got is not None and got.data() == b'{"poison": true}'
        assert deliveries == settings.pulsar_max_redeliveries + 1
    finally:
        client.close()


def test_a_service_url_may_list_several_brokers(servers: EmbeddedServers,
                                                 settings: Settings) -> None:
    port = servers["pulsar"].port
    # The first broker does not answer: the client goes on to the next.
    url = f"pulsar://127.0.0.1:9,127.0.0.1:{port}"
    client = pulsar.Client(url, **connect.pulsar_kwargs(settings),
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    try:
        producer = client.create_producer(settings.task_log_topic + "-multi")
        producer.send(b"x")
    finally:
        client.close()
